"""Will my fine-tune fit? Memory for the model states of a training (or inference) run.

Pure Python, no torch: the numbers come from the checkpoint's metadata and the session's freeze
state. What is counted (see docs/memory-estimate.md for the formulas and the published numbers
they reproduce):

- weights: every model tensor (parameters and buffers) in the precision's weight dtype; only
  floating-point tensors are cast, integer/bool buffers (`num_batches_tracked`, `position_ids`)
  and complex tensors keep their stored dtype, as `module.to(dtype)` / `.half()` / `.float()` do;
- gradients: trainable parameters only, in the precision's gradient dtype;
- master weights: an fp32 copy of the trainable parameters (`*-mixed` precisions only);
- optimizer states: trainable parameters only, `states` tensors of the optimizer per parameter.

Quantized weights (quant.py) keep their real bytes (packed data and companions, never cast) and
count their logical parameters; they never train. `lora_inventory` builds the LoRA / QLoRA case:
a frozen base (quantized on the fly with a bitsandbytes scheme, or as stored) plus trainable
rank-r adapters on the target modules.

Tied parameters (one storage under two names) count once; frozen parameters need no gradient,
master copy or optimizer state. `total` is what a step leaves allocated; `peak` adds what the
optimizer step allocates and frees (measured on an H200, docs/memory-estimate.md), and is what
must fit. Activations, the CUDA context and allocator fragmentation are not included: the
estimate is a floor, and its notes say so.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

from ..checkpoint import (
    COMPLEX_DTYPES,
    DTYPE_ITEMSIZE,
    FLOATING_DTYPES,
    PARAMETER,
    Checkpoint,
    TensorRecord,
    can_require_grad,
    span_bytes,
)
from ..errors import MscopeError
from ..units import fmt_bytes, fmt_count

if TYPE_CHECKING:
    from .session import Session

PANEL_WIDTH = 38


class EstimateError(MscopeError):
    """An unknown precision or optimizer name."""


@dataclass(frozen=True, slots=True)
class Precision:
    """How a training precision stores each model state (None: the tensor's stored dtype)."""

    name: str
    weights: str | None  # dtype of floating-point parameters and buffers
    grads: str | None  # dtype of the gradients of trainable parameters
    master: bool  # an fp32 master copy of every trainable parameter
    states: str | None  # dtype of the optimizer states
    label: str  # short description for tables and the panel (<= 22 characters)
    description: str  # one line: what it is and which framework settings mean it


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision(
            "as-saved",
            None,
            None,
            False,
            None,
            "stored dtypes",
            "each tensor keeps its stored dtype; grads and optimizer states in the parameter's "
            "dtype (torch's default when you neither cast nor autocast)",
        ),
        Precision(
            "fp32",
            "float32",
            "float32",
            False,
            "float32",
            "fp32",
            "everything in float32 (model.float())",
        ),
        Precision(
            "amp",
            "float32",
            "float32",
            False,
            "float32",
            "fp32 + autocast",
            "torch.autocast: fp32 weights, grads and optimizer states; half copies made during "
            "the forward pass are transient (HF Trainer bf16=True/fp16=True, accelerate "
            "mixed_precision, Lightning precision='bf16-mixed'/'16-mixed')",
        ),
        Precision(
            "bf16-mixed",
            "bfloat16",
            "bfloat16",
            True,
            "float32",
            "bf16 + fp32 master",
            "bf16 weights and grads, fp32 master copy and fp32 optimizer states for trainable "
            "parameters (DeepSpeed bf16, Megatron; not Lightning's 'bf16-mixed', which is amp)",
        ),
        Precision(
            "fp16-mixed",
            "float16",
            "float16",
            True,
            "float32",
            "fp16 + fp32 master",
            "fp16 weights and grads, fp32 master copy and fp32 optimizer states for trainable "
            "parameters (DeepSpeed fp16, apex O2, Megatron; not Lightning's '16-mixed', which is "
            "amp)",
        ),
        Precision(
            "bf16",
            "bfloat16",
            "bfloat16",
            False,
            "bfloat16",
            "pure bf16",
            "everything in bfloat16, optimizer states too (model.to(torch.bfloat16), Lightning "
            "precision='bf16-true')",
        ),
        Precision(
            "fp16",
            "float16",
            "float16",
            False,
            "float16",
            "pure fp16",
            "everything in float16, optimizer states too (model.half(), Lightning "
            "precision='16-true'); numerically fragile for training",
        ),
    )
}

# Optimizer states per trainable parameter; "none" means inference: no grads, no states.
OPTIMIZERS: dict[str, int] = {"adamw": 2, "adam": 2, "sgd-momentum": 1, "sgd": 0, "none": 0}

# Temporaries of torch's default optimizer step on CUDA (the foreach implementation), per
# trainable parameter, in the state dtype: Adam/AdamW build sqrt(exp_avg_sq) for every parameter
# at once; SGD works in place. Measured on an H200 with torch 2.11 (docs/memory-estimate.md):
# the step peaks at exactly this much above the model states; `fused=True` needs none of it.
STEP_TEMPORARIES: dict[str, int] = {"adamw": 1, "adam": 1, "sgd-momentum": 0, "sgd": 0, "none": 0}

ACTIVATIONS_NOTE = "activations are not included (they grow with batch and sequence length)"
OVERHEAD_NOTE = (
    "the CUDA context, allocator fragmentation and temporary buffers are not included either"
)


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Bytes of model state for one precision and optimizer. `total` is their sum."""

    precision: str
    optimizer: str
    weights: int  # all parameters and buffers, tied ones once
    gradients: int  # trainable parameters only
    master_weights: int  # fp32 copy of trainable parameters (*-mixed only)
    optimizer_states: int  # trainable parameters only
    parameters: int  # parameter elements, tied ones once
    trainable: int  # trainable parameter elements
    buffers: int  # elements of buffers and plain tensors
    notes: tuple[str, ...] = ()
    step_scratch: int = 0  # freed again after the optimizer step (see STEP_TEMPORARIES)

    @property
    def total(self) -> int:
        """What stays allocated between steps (weights, grads, master copy, states)."""
        return self.weights + self.gradients + self.master_weights + self.optimizer_states

    @property
    def peak(self) -> int:
        """The most the optimizer step holds at once: what must fit on the GPU."""
        return self.total + self.step_scratch

    @property
    def training(self) -> bool:
        return self.optimizer != "none"

    @property
    def label(self) -> str:
        return f"{self.precision}, {'inference' if not self.training else self.optimizer}"

    def components(self, short: bool = False) -> list[tuple[str, int]]:
        """(label, bytes) for each non-zero part, in a fixed order (weights always listed).
        `short` labels are at most 7 characters: weights, grads, master, optim."""
        spec = PRECISIONS[self.precision]
        states = OPTIMIZERS[self.optimizer]
        if short:
            labels = ("weights", "grads", "master", "optim")
        else:
            labels = (
                f"weights{_dtype_tag(spec.weights)}",
                f"gradients{_dtype_tag(spec.grads)}",
                "master weights (fp32)",
                f"optimizer ({states}x{_short_dtype(spec.states)})",
            )
        parts = (self.weights, self.gradients, self.master_weights, self.optimizer_states)
        return [(label, n) for i, (label, n) in enumerate(zip(labels, parts)) if n or i == 0]


def _short_dtype(dtype: str | None) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", None: "stored"}.get(
        dtype, dtype or ""
    )


def _dtype_tag(dtype: str | None) -> str:
    return f" ({_short_dtype(dtype)})" if dtype else ""


def _check(precision: str, optimizer: str) -> tuple[Precision, int]:
    spec = PRECISIONS.get(precision)
    if spec is None:
        raise EstimateError(
            f"unknown precision {precision!r}", hint=f"choose one of {', '.join(PRECISIONS)}"
        )
    states = OPTIMIZERS.get(optimizer)
    if states is None:
        raise EstimateError(
            f"unknown optimizer {optimizer!r}", hint=f"choose one of {', '.join(OPTIMIZERS)}"
        )
    return spec, states


def _itemsize(dtype: str) -> int:
    return DTYPE_ITEMSIZE.get(dtype, 1)


def tensor_bytes(
    numel: int,
    dtype: str,
    trainable: bool,
    is_parameter: bool,
    precision: str = "fp32",
    optimizer: str = "adamw",
) -> tuple[int, int, int, int]:
    """(weights, gradients, master weights, optimizer states) bytes for one tensor."""
    spec, states = _check(precision, optimizer)
    return _tensor_bytes(numel, dtype, trainable, is_parameter, spec, states, optimizer != "none")


def _tensor_bytes(
    numel: int,
    dtype: str,
    trainable: bool,
    is_parameter: bool,
    spec: Precision,
    states: int,
    training: bool,
) -> tuple[int, int, int, int]:
    floating = dtype in FLOATING_DTYPES
    stored = _itemsize(dtype)
    # block-quantized (GGML) weights stay as stored, at their real bytes per value
    weights = numel * _itemsize(spec.weights) if floating and spec.weights else span_bytes(dtype, numel)
    if not (training and trainable and is_parameter and can_require_grad(dtype)):
        return weights, 0, 0, 0
    if not floating:  # complex: grads and states are the parameter's dtype, no master copy
        return weights, weights, 0, states * weights
    grads = numel * (_itemsize(spec.grads) if spec.grads else stored)
    master = numel * 4 if spec.master else 0
    optim = states * numel * (_itemsize(spec.states) if spec.states else stored)
    return weights, grads, master, optim


def _step_scratch(
    numel: int, dtype: str, grads: int, master: int, spec: Precision, optimizer: str
) -> int:
    """Bytes the optimizer step allocates and frees for one group of trainable tensors."""
    if not grads:  # frozen, inference, or a buffer
        return 0
    temporaries = STEP_TEMPORARIES[optimizer]
    if master:  # the step runs on the fp32 copy, with fp32 gradients made for it
        return master + temporaries * master
    state_size = (
        _itemsize(spec.states) if spec.states and dtype in FLOATING_DTYPES else _itemsize(dtype)
    )
    return temporaries * numel * state_size


# An inventory is the model reduced to what the estimate needs: element counts per
# (dtype, trainable, is_parameter). Building it once makes every estimate O(#dtypes).
# Two pseudo-dtypes carry quantized weights: KEPT_BYTES counts bytes kept as stored (packed
# data and companions: no cast, no gradient), LOGICAL_PARAMS the logical parameters they hold
# (counted as parameters, no bytes).
Inventory = Counter
KEPT_BYTES = "kept-bytes"
LOGICAL_PARAMS = "logical-params"


def inventory(source: Session | Checkpoint) -> Inventory:
    """Element counts per (dtype, trainable, is_parameter) for a Session (its freeze state) or
    a Checkpoint (trainable as saved). Tied tensors (one storage, same view) count once.

    A Session's is the checkpoint's with every parameter frozen (tallied once per checkpoint),
    then per dtype the elements that train now, moved over at C speed: the explorer re-estimates
    after every freeze, and the tally of 100k tensors was 100 ms of Python holding the GIL
    while the tree repainted."""
    if isinstance(source, Checkpoint):
        return _tally(source, lambda t: t.trainable)
    frozen, params = _frozen_tally(source)
    counts: Inventory = Counter(frozen)
    if params is None:  # the tally holds every parameter the session may train: its counts
        trained = source.trainable_by_dtype()
    else:
        trained = {dtype: source.trainable_elements(names, numels) for dtype, (names, numels) in params.items()}
    for dtype, n in trained.items():
        if n:
            counts[(dtype, False, True)] -= n
            counts[(dtype, True, True)] += n
    return +counts  # keys left at 0 (every parameter of a dtype trains) count nothing


def _tally(ckpt: Checkpoint, is_trainable, params: dict[str, list[TensorRecord]] | None = None) -> Inventory:
    """The inventory's one loop. `params` collects, per dtype, the parameters counted there."""
    counts: Inventory = Counter()
    for t in ckpt.model_tensors:
        if t.alias_of is not None:
            continue
        if t.quant is not None or t.companion_of is not None:
            counts[(KEPT_BYTES, False, False)] += t.nbytes
            if t.quant is not None:
                counts[(LOGICAL_PARAMS, False, True)] += t.quant.logical_numel
            continue
        is_param = t.kind == PARAMETER
        counts[(t.dtype, bool(is_param and is_trainable(t)), is_param)] += t.numel
        if params is not None and is_param:
            params.setdefault(t.dtype, []).append(t)
    return counts


# -- LoRA / QLoRA ---------------------------------------------------------------------------------
# Bytes bitsandbytes stores for a weight of n parameters and `rows` output rows, per scheme:
# 4-bit with double quantization (QLoRA's default, bnb_4bit_use_double_quant=True): n/2 packed,
# one uint8 absmax per 64 values, one fp32 absmax per 256 of those, the 16-entry fp32 code book
# and the 256-entry fp32 code book of the second quantization: 4 + 8/64 + 32/(64*256) = 4.127 bits
# per parameter (Dettmers et al. 2023, sec. 3 "Double Quantization"). LLM.int8: n int8 bytes and
# one fp32 scale per row (`SCB`).
BNB_SCHEMES = ("nf4", "fp4", "int8")


def bnb_bytes(scheme: str, n: int, rows: int) -> int:
    """Bytes bitsandbytes stores for one weight of `n` parameters and `rows` output rows."""
    if scheme == "int8":
        return n + 4 * rows
    if scheme in ("nf4", "fp4"):
        blocks = -(-n // 64)
        return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 16 * 4 + 256 * 4
    raise EstimateError(f"unknown quantization scheme {scheme!r}", hint=f"choose one of {', '.join(BNB_SCHEMES)}")


# Modules PEFT's `target_modules="all-linear"` leaves out, and bitsandbytes does not quantize:
# embeddings and the output head (matched on the module's last name).
NOT_LINEAR = ("embed", "wte", "wpe", "lm_head", "embed_out", "shared")


def is_linear_weight(module: str, shape: tuple[int, ...], dtype: str) -> bool:
    """A 2-D floating `weight` of a module that is not an embedding or the output head."""
    leaf = module.rpartition(".")[2]
    return len(shape) == 2 and dtype in FLOATING_DTYPES and not any(x in leaf for x in NOT_LINEAR)


@dataclass(frozen=True, slots=True)
class LoraPlan:
    """What a LoRA / QLoRA run adds to the base: adapters on `modules`, `adapter_params` trainable
    elements (A: r x in, B: out x r per module), and the base's bytes per quantization scheme."""

    rank: int
    targets: tuple[str, ...]  # module names (or last names) matched; () = all linear layers
    quantize: str | None
    modules: int
    adapter_params: int
    base_params: int
    base_quantized_bytes: dict[str, int]


def _targeted(module: str, targets: Sequence[str]) -> bool:
    if not targets:
        return True
    return any(module == t or module.endswith("." + t) for t in targets)


def lora_inventory(
    source: Session | Checkpoint, rank: int = 16, targets: Sequence[str] = (), quantize: str | None = None
) -> tuple[Inventory, LoraPlan]:
    """The inventory of a LoRA run (QLoRA with `quantize`): every base tensor frozen, each
    linear layer of the base quantized with the bitsandbytes scheme `quantize` (as bitsandbytes
    does: embeddings and the output head stay as they are), weights already quantized in the
    file kept as stored, and trainable adapters of rank `rank` on every targeted linear layer
    (PEFT matches `target_modules` as module names or their last parts; none = "all-linear").
    Adapters are counted as fp32 parameters, so the precision decides their dtypes."""
    if rank < 1:
        raise EstimateError(f"LoRA rank must be 1 or more, not {rank}")
    if quantize is not None and quantize not in BNB_SCHEMES:
        raise EstimateError(f"unknown quantization scheme {quantize!r}", hint=f"choose one of {', '.join(BNB_SCHEMES)}")
    ckpt = source if isinstance(source, Checkpoint) else source.ckpt
    targets = tuple(targets)
    counts: Inventory = Counter()
    adapters = modules = base_params = 0
    by_scheme: dict[str, int] = {}
    for t in ckpt.model_tensors:
        if t.alias_of is not None:
            continue
        if t.companion_of is not None:
            counts[(KEPT_BYTES, False, False)] += t.nbytes
            continue
        q = t.quant
        if q is not None:
            counts[(KEPT_BYTES, False, False)] += t.nbytes
            counts[(LOGICAL_PARAMS, False, True)] += q.logical_numel
            base_params += q.logical_numel
            by_scheme[q.scheme] = by_scheme.get(q.scheme, 0) + q.nbytes
            module, shape = q.logical_name.rpartition(".")[0], q.logical_shape
            linear = len(shape) == 2 and not any(x in module.rpartition(".")[2] for x in NOT_LINEAR)
        else:
            is_param = t.kind == PARAMETER
            module, shape = t.name.rpartition(".")[0], t.shape
            linear = is_param and t.name.endswith(".weight") and is_linear_weight(module, shape, t.dtype)
            if is_param:
                base_params += t.numel
            if linear and quantize is not None:
                size = bnb_bytes(quantize, t.numel, shape[0])
                counts[(KEPT_BYTES, False, False)] += size
                counts[(LOGICAL_PARAMS, False, True)] += t.numel
                by_scheme[quantize] = by_scheme.get(quantize, 0) + size
            else:
                counts[(t.dtype, False, is_param)] += t.numel
        if linear and _targeted(module, targets):
            modules += 1
            adapters += rank * (shape[0] + shape[1])
    if adapters:
        counts[("float32", True, True)] += adapters
    plan = LoraPlan(rank, targets, quantize, modules, adapters, base_params, by_scheme)
    return counts, plan


def lora_estimate_table(
    source: Session | Checkpoint,
    rank: int = 16,
    targets: Sequence[str] = (),
    quantize: str | None = None,
    precisions: Sequence[str] | None = None,
    optimizers: Sequence[str] | None = None,
) -> tuple[list[MemoryEstimate], LoraPlan]:
    """estimate_table for a LoRA / QLoRA run (see lora_inventory)."""
    counts, plan = lora_inventory(source, rank, targets, quantize)
    precisions = list(PRECISIONS) if precisions is None else list(precisions)
    optimizers = [o for o in OPTIMIZERS if o != "none"] if optimizers is None else list(optimizers)
    return [estimate(counts, p, o) for p in precisions for o in optimizers], plan
# Checkpoint -> (its inventory with every parameter frozen, dtype -> (names, numels) of the
# parameters a session may train). Records never change once read, so this is kept as long
# as the checkpoint lives.
_FROZEN: WeakKeyDictionary = WeakKeyDictionary()


def _frozen_tally(session: Session) -> tuple[Inventory, dict[str, tuple[list[str], list[int]]] | None]:
    """The params are None when they are exactly the ones the session can train (the usual case,
    with no parameter left out of the tally): the session's per-dtype counts, which the explorer's
    header shares, are then the ones to move over."""
    ckpt = session.ckpt
    cached = _FROZEN.get(ckpt)
    if cached is None:
        by_dtype: dict[str, list[TensorRecord]] = {}
        frozen = _tally(ckpt, lambda t: False, by_dtype)
        params: dict[str, tuple[list[str], list[int]]] | None = {}
        for dtype, records in by_dtype.items():
            records = [t for t in records if session.can_train(t.name)]
            if records:
                params[dtype] = ([t.name for t in records], [t.numel for t in records])
        # every tallied name trains under its own name, so equal counts mean equal sets
        if sum(len(names) for names, _ in params.values()) == len(session.trainable):
            params = None
        cached = _FROZEN[ckpt] = (frozen, params)
    return cached


def inventory_is_cheap(session: Session) -> bool:
    """True once the session's checkpoint has its frozen tally: an inventory is then a C-speed
    pass over the parameters (~5 ms for 100k tensors), cheap enough for the UI thread. The
    first one (~100 ms) builds the tally."""
    return session.ckpt in _FROZEN


def estimate(
    params: Iterable[tuple[int, str, bool, bool]] | Inventory,
    precision: str = "fp32",
    optimizer: str = "adamw",
) -> MemoryEstimate:
    """Memory for tensors given as (numel, dtype, trainable, is_parameter), each counted as
    given (deduplicate tied tensors first), or for an `inventory()`.

    `trainable` is honoured only for floating-point/complex parameters (torch's rule).
    """
    spec, states = _check(precision, optimizer)
    if isinstance(params, Counter):
        counts = params
    else:
        counts = Counter()
        for numel, dtype, trainable, is_param in params:
            counts[(dtype, bool(trainable and is_param), bool(is_param))] += int(numel)
    training = optimizer != "none"
    weights = grads = master = optim = scratch = 0
    n_params = n_trainable = n_buffers = 0
    cast_from: set[str] = set()
    complex_kept = False
    for (dtype, trainable, is_param), numel in counts.items():
        if dtype == KEPT_BYTES:  # quantized data: its bytes as stored, whatever the precision
            weights += numel
            continue
        if dtype == LOGICAL_PARAMS:
            n_params += numel
            continue
        trainable = trainable and can_require_grad(dtype)
        w, g, m, o = _tensor_bytes(numel, dtype, trainable, is_param, spec, states, training)
        weights += w
        grads += g
        master += m
        optim += o
        scratch += _step_scratch(numel, dtype, g, m, spec, optimizer)
        if is_param:
            n_params += numel
            n_trainable += numel if trainable else 0
        else:
            n_buffers += numel
        if numel and dtype in FLOATING_DTYPES and spec.weights and dtype != spec.weights:
            cast_from.add(dtype)
        if numel and dtype in COMPLEX_DTYPES:
            complex_kept = True
    notes = [ACTIVATIONS_NOTE, OVERHEAD_NOTE]
    if cast_from:
        notes.append(
            f"floating-point tensors stored as {', '.join(sorted(cast_from))} are counted as "
            f"{spec.weights}"
        )
    if complex_kept:
        notes.append("complex tensors keep their stored dtype")
    if training and not n_trainable:
        notes.append("nothing is trainable: no gradients or optimizer states")
    if precision == "amp" and training:
        notes.append("autocast's half-precision copies of weights are transient (not counted)")
    if scratch:
        notes.append(
            f"the optimizer step briefly needs {fmt_bytes(scratch)} more (step peak"
            f" {fmt_bytes(weights + grads + master + optim + scratch)}): "
            + "; ".join(
                (
                    [
                        f"torch's default {optimizer} step makes one temporary per parameter (fused=True avoids it)"
                    ]
                    if STEP_TEMPORARIES[optimizer]
                    else []
                )
                + (["fp32 gradients for the master weights"] if spec.master else [])
            )
        )
    if precision == "fp16" and training and n_trainable:
        notes.append("pure fp16 training (fp16 optimizer states) is numerically fragile")
    return MemoryEstimate(
        precision=precision,
        optimizer=optimizer,
        weights=weights,
        gradients=grads,
        master_weights=master,
        optimizer_states=optim,
        parameters=n_params,
        trainable=n_trainable,
        buffers=n_buffers,
        notes=tuple(notes),
        step_scratch=scratch,
    )


def estimate_for_session(
    session: Session | Checkpoint, precision: str = "fp32", optimizer: str = "adamw"
) -> MemoryEstimate:
    """The estimate for the session's current freeze state (or a checkpoint as saved)."""
    return estimate(inventory(session), precision, optimizer)


def estimate_table(
    session: Session | Checkpoint,
    precisions: Sequence[str] | None = None,
    optimizers: Sequence[str] | None = None,
) -> list[MemoryEstimate]:
    """One estimate per precision x optimizer (all of them by default), precision-major."""
    counts = inventory(session)
    precisions = list(PRECISIONS) if precisions is None else list(precisions)
    optimizers = list(OPTIMIZERS) if optimizers is None else list(optimizers)
    return [estimate(counts, p, o) for p in precisions for o in optimizers]


def fits(estimate: MemoryEstimate | int, free_bytes: int) -> tuple[bool, int]:
    """(fits, headroom): headroom = free - needed (the step peak), negative when it does not fit."""
    needed = estimate if isinstance(estimate, int) else estimate.peak
    headroom = int(free_bytes) - needed
    return headroom >= 0, headroom


# -- text for the explorer's panel (plain strings; `mscope estimate` renders its own in cli/) ------
def _row(label: str, value: str, width: int) -> str:
    room = width - len(value) - 1
    if len(label) > room:
        label = label[: max(room - 1, 0)] + "…" if room > 1 else ""
    return f"{label:<{room}} {value}" if room > 0 else value[-width:]


def fit_line(est: MemoryEstimate | int, free_bytes: int) -> str:
    """'fits: 3.1 GiB to spare (of 24.0 GiB free)' or 'does not fit: 1.2 GiB short (of ...)'."""
    ok, headroom = fits(est, free_bytes)
    if ok:
        return f"fits: {fmt_bytes(headroom)} to spare"
    return f"does not fit: {fmt_bytes(-headroom)} short"


def panel_lines(
    est: MemoryEstimate, free_bytes: int | None = None, width: int = PANEL_WIDTH
) -> list[str]:
    """A compact rendering for the side panel: every line at most `width` (38) columns."""
    title = f"{PRECISIONS[est.precision].label}, {est.optimizer if est.training else 'inference'}"
    lines = [title[:width].rstrip()]
    long_parts = est.components()
    fits_long = all(len(label) + len(fmt_bytes(n)) < width for label, n in long_parts)
    for label, nbytes in long_parts if fits_long else est.components(short=True):
        lines.append(_row(label, fmt_bytes(nbytes), width))
    lines.append(_row("total", fmt_bytes(est.total), width))
    if est.step_scratch:
        lines.append(_row("step peak", fmt_bytes(est.peak), width))
    if free_bytes is not None:
        lines.append(_row("free", fmt_bytes(free_bytes), width))
        lines.append(fit_line(est, free_bytes)[:width])
    lines.append(f"trains {fmt_count(est.trainable)} of {fmt_count(est.parameters)} params")
    lines.append("+ activations (not counted)")
    return [line[:width].rstrip() for line in lines]
