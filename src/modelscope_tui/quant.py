"""Quantized weights: which records together hold one logical weight, and in what scheme.

A quantized Linear is stored as packed data plus companions (scales, zero points, code books,
the quantizer's own state). Every view wants the same answer: one logical weight with its
logical shape and parameter count, its scheme, and its real bytes (packed data + companions, by
stored dtype), with the companions folded under it. `annotate` finds the groups once, when a
checkpoint is opened (readers.open_checkpoint), and marks the records: the packed record gets a
`QuantInfo` (`TensorRecord.quant`) and counts as a parameter of the logical size; each companion
names its weight (`TensorRecord.companion_of`) and counts only its bytes. Neither trains
(checkpoint.trains): quantized bases are frozen, adapters train on top of them (transformers
refuses to fine-tune "purely quantized models").

Layouts recognised (by names, dtypes and shapes; `config.json`'s `quantization_config`, when
the checkpoint's directory has one, names the method, bits, group and block sizes):
- bitsandbytes 4-bit (nf4 / fp4): `W` uint8 [n/2, 1] + `W.absmax`, `W.quant_map`,
  `W.quant_state.bitsandbytes__nf4` (the shape, as JSON bytes), `W.nested_absmax`, `W.nested_quant_map`
- bitsandbytes LLM.int8: `P.weight` int8 + `P.SCB`, `P.weight_format`
- GPTQ: `P.qweight` int32 [in*bits/32, out] + `P.qzeros`, `P.scales` [in/g, out], `P.g_idx`
- AWQ (GEMM): `P.qweight` int32 [in, out*bits/32] + `P.qzeros`, `P.scales`
- compressed-tensors: `P.weight_packed` + `P.weight_scale`, `P.weight_zero_point`, `P.weight_shape`,
  `P.weight_g_idx`, `P.weight_global_scale` (nvfp4 when packed in uint8 with fp8 scales)
- FP8: `P.weight` float8 + `P.weight_scale_inv` (block scales, DeepSeek-V3) or `P.weight_scale`
  (per tensor / channel / block)
- NVFP4 (ModelOpt): `P.weight` uint8 or F4 [out, in/2] + `P.weight_scale` fp8 [out, in/16], `P.weight_scale_2`
- MXFP4 (gpt-oss): `P.X_blocks` uint8 [..., in/32, 16] + `P.X_scales` (E8M0 as uint8 or F8_E8M0)
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .checkpoint import BLOCK_DTYPES, BUFFER, PARAMETER, Checkpoint, TensorRecord, prod

FP8_DTYPES = frozenset({"float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"})
MAX_CONFIG_BYTES = 4 << 20
MAX_STATE_BYTES = 4096  # a bitsandbytes quant_state is ~100 bytes of JSON
MAX_SKIPPED = 1024  # modules_to_not_convert / ignore entries used
INPUT_COMPANIONS = ("input_scale", "input_global_scale", "input_zero_point")


@dataclass(frozen=True, slots=True)
class QuantInfo:
    """One logical quantized weight (on its packed record: `TensorRecord.quant`)."""

    scheme: str  # "nf4", "gptq int4 g128", "fp8 e4m3 block 128", "mxfp4"...
    logical_name: str  # the weight's name in the unquantized model (`q_proj.weight`)
    logical_shape: tuple[int, ...]
    companions: tuple[str, ...]  # record names folded under the weight
    nbytes: int  # packed data plus companions, by stored dtype
    method: str  # bitsandbytes | gptq | awq | compressed-tensors | fp8 | nvfp4 | mxfp4

    @property
    def logical_numel(self) -> int:
        return prod(self.logical_shape)

    @property
    def leaf(self) -> str:
        return self.logical_name.rpartition(".")[2]

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "method": self.method,
            "logical_name": self.logical_name,
            "logical_shape": list(self.logical_shape),
            "logical_numel": self.logical_numel,
            "bytes": self.nbytes,
            "companions": list(self.companions),
        }


@dataclass(frozen=True, slots=True)
class QuantConfig:
    """What `quantization_config` says, reduced to what recognition uses."""

    method: str = ""
    bits: int | None = None
    group_size: int | None = None
    block: tuple[int, ...] | None = None
    skipped: tuple[str, ...] = ()  # modules_to_not_convert / ignore: left unquantized on purpose

    @classmethod
    def from_dict(cls, doc: Any) -> QuantConfig:
        if not isinstance(doc, dict):
            return cls()
        method = str(doc.get("quant_method") or "").lower()
        bits = _int(doc.get("bits") or doc.get("w_bit"))
        group = _int(doc.get("group_size") or doc.get("q_group_size"))
        block = doc.get("weight_block_size")
        block = tuple(b for b in map(_int, block) if b) if isinstance(block, list) else None
        for group_doc in (
            (doc.get("config_groups") or {}).values()
            if isinstance(doc.get("config_groups"), dict)
            else ()
        ):
            weights = group_doc.get("weights") if isinstance(group_doc, dict) else None
            if isinstance(weights, dict):
                bits = bits or _int(weights.get("num_bits"))
                group = group or _int(weights.get("group_size"))
                wb = weights.get("block_structure")
                if isinstance(wb, list) and not block:
                    block = tuple(b for b in map(_int, wb) if b) or None
                break
        skipped: list[str] = []
        for key in (
            "modules_to_not_convert",
            "llm_int8_skip_modules",
            "ignore",
            "ignored_layers",
            "exclude_modules",
        ):
            value = doc.get(key)
            if isinstance(value, list):
                skipped.extend(str(v) for v in value if isinstance(v, str))
        # The audit tests every plain weight against every entry: a config cannot make that
        # quadratic in its own size.
        return cls(method, bits, group, block or None, tuple(skipped[:MAX_SKIPPED]))

    def skips(self, module: str) -> bool:
        """Whether `module` was left unquantized on purpose: a compressed-tensors `re:` pattern,
        a glob (gpt-oss: `model.layers.*.self_attn`, mscope's glob rule), or a name that ends the
        module's (bitsandbytes matches `lm_head` anywhere in the name)."""
        from .patterns import glob_matches

        for entry in self.skipped:
            if entry.startswith("re:"):  # from the file: shape-checked like a user's regex
                rx = _skip_regex(entry[3:])
                if rx is not None and (rx.fullmatch(module) or rx.fullmatch(module + ".weight")):
                    return True
            elif glob_matches(module, entry) or module == entry or module.endswith("." + entry):
                return True
        return False


@functools.lru_cache(maxsize=256)
def _skip_regex(pattern: str) -> re.Pattern[str] | None:
    from .patterns import PatternError, compile_safe_regex

    try:
        return compile_safe_regex(pattern)
    except PatternError:
        return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def read_quant_config(ckpt: Checkpoint) -> tuple[QuantConfig | None, str | None]:
    """The checkpoint directory's `config.json` `quantization_config` (None when there is none),
    and a warning when the file is there but unusable."""
    from .errors import CorruptCheckpointError
    from .jsonfile import read_json_file

    if hasattr(ckpt.path, "url"):  # remote: what the reader fetched beside it (readers.remote)
        raw = ckpt.side_files.get("config.json")
        if raw is None:
            return None, None
        try:
            doc = json.loads(raw[: MAX_CONFIG_BYTES + 1].decode("utf-8")) if len(raw) <= MAX_CONFIG_BYTES else None
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            return None, f"config.json next to the checkpoint was not used: not valid JSON ({str(exc)[:80]})"
    else:
        base = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
        path = base / "config.json"
        if not path.is_file():
            return None, None
        try:
            doc = read_json_file(path, CorruptCheckpointError, "a model config", MAX_CONFIG_BYTES)
        except CorruptCheckpointError as exc:
            return None, f"config.json next to the checkpoint was not used: {exc.message}"
    if not isinstance(doc, dict):
        return None, None
    qc = doc.get("quantization_config")
    if qc is None:
        text = doc.get("text_config")
        qc = text.get("quantization_config") if isinstance(text, dict) else None
    if qc is None:
        return None, None
    return QuantConfig.from_dict(qc), None


def read_small(record: TensorRecord, limit: int = MAX_STATE_BYTES) -> bytes | None:
    """A small tensor's raw bytes from its local file (the bitsandbytes quant_state is JSON
    stored as a uint8 tensor); None when it is not a plain, local, uncompressed range."""
    s = record.storage
    if s is None or s.file is None or s.data_offset is None or s.compressed:
        return None
    if hasattr(s.file, "url"):  # remote: one request per quant_state would break the fetch budget
        return None
    size = record.nbytes
    start = s.data_offset + record.storage_offset * record.itemsize
    if (
        size > limit
        or not record.is_contiguous
        or (
            s.data_size is not None and record.storage_offset * record.itemsize + size > s.data_size
        )
    ):
        return None
    try:
        fd = os.open(s.file, os.O_RDONLY)
        try:
            data = os.pread(fd, size, start)
        finally:
            os.close(fd)
    except OSError:
        return None
    return data if len(data) == size else None


# ----------------------------------------------------------------------------------------------
# Recognition
# ----------------------------------------------------------------------------------------------
class _Groups:
    def __init__(
        self,
        tensors: list[TensorRecord],
        config: QuantConfig | None,
        reader: Callable[[TensorRecord], bytes | None],
    ):
        self.by_name = {t.name: t for t in tensors}
        self.config = config or QuantConfig()
        self.read = reader
        self.taken: set[str] = set()
        self.found: list[tuple[TensorRecord, QuantInfo]] = []

    def get(self, name: str) -> TensorRecord | None:
        t = self.by_name.get(name)
        return None if t is None or name in self.taken else t

    def add(
        self,
        primary: TensorRecord,
        scheme: str,
        method: str,
        logical_name: str,
        shape: tuple[int, ...],
        companion_names: list[str],
    ) -> None:
        companions = [
            c for c in (self.get(n) for n in companion_names) if c is not None and c is not primary
        ]
        nbytes = sum(t.nbytes for t in (primary, *companions) if t.alias_of is None)
        info = QuantInfo(
            scheme, logical_name, tuple(shape), tuple(c.name for c in companions), nbytes, method
        )
        self.taken.add(primary.name)
        self.taken.update(c.name for c in companions)
        self.found.append((primary, info))


def _bits_label(bits: int) -> str:
    return f"int{bits}"


def _group_label(inner: int, groups: int) -> str:
    if groups <= 1:
        return "channel"
    return f"g{inner // groups}" if inner % groups == 0 else f"{groups} groups"


def block_of(
    shape: tuple[int, ...], scale_shape: tuple[int, ...], hint: tuple[int, ...] | None
) -> tuple[int, ...] | None:
    """The block sizes that turn `shape` into `scale_shape` by ceiling division (the config's
    `weight_block_size` when it fits), or None."""
    if len(shape) < 2 or len(scale_shape) != len(shape):
        return None
    for block in (hint, (128, 128)):  # the config's, then the size every FP8 release uses
        if (
            block
            and len(block) == 2
            and all(-(-n // b) == s for n, b, s in zip(shape[-2:], block, scale_shape[-2:]))
        ):
            return block
    out = []
    for n, s in zip(shape[-2:], scale_shape[-2:]):
        choice = next((1 << k for k in range(0, 16) if s and -(-n // (1 << k)) == s), None)
        if choice is None:
            return None
        out.append(choice)
    return tuple(out)


def _fp8_name(dtype: str) -> str:
    return "fp8 e5m2" if "e5m2" in dtype else "fp8 e4m3"


TRIGGERS = frozenset({"SCB", "qweight", "weight_packed", "weight_scale_inv", "weight_scale"})


def recognise(
    tensors: list[TensorRecord],
    config: QuantConfig | None = None,
    reader: Callable[[TensorRecord], bytes | None] = read_small,
) -> list[tuple[TensorRecord, QuantInfo]]:
    """(packed record, its QuantInfo) for every quantized weight among `tensors` (one section's
    records, by name). Records are not changed; `annotate` applies the result."""
    # One pass finds the names that can start a layout; a plain checkpoint stops here (a
    # 100k-tensor state dict pays one rpartition and a set lookup per name).
    bnb4: list[TensorRecord] = []
    packed: list[tuple[str, str]] = []
    scaled: list[str] = []
    ggml: list[TensorRecord] = []
    for t in tensors:
        if t.dtype in BLOCK_DTYPES:  # GGUF: the type says it all (Q4_K, Q8_0...), no companions
            ggml.append(t)
            continue
        prefix, _, leaf = t.name.rpartition(".")
        if leaf in TRIGGERS:
            if leaf.startswith("weight_scale"):
                scaled.append(prefix)
            else:
                packed.append((prefix, leaf))
        elif leaf.endswith("_blocks") and len(leaf) > 7:
            packed.append((prefix, leaf))
        elif leaf.startswith("bitsandbytes__") and prefix.endswith(".quant_state"):
            bnb4.append(t)
    found = [(t, QuantInfo(t.dtype, t.name, tuple(t.shape), (), t.nbytes, "gguf")) for t in ggml]
    if not (bnb4 or packed or scaled):
        return found
    g = _Groups(tensors, config, reader)
    # From the most specific layout to the least, so a companion claimed by one is not read as
    # another's packed data (an FP8 `weight_scale` vs an NVFP4 one).
    for t in bnb4:
        _bnb4(g, t)
    for prefix, leaf in packed:
        if leaf == "SCB":
            _bnb8(g, prefix)
        elif leaf == "qweight":
            _gptq_awq(g, prefix)
        elif leaf == "weight_packed":
            _compressed(g, prefix)
        else:
            _mxfp4(g, prefix, leaf[:-7])
    for prefix in scaled:
        _scaled_weight(g, prefix)
    return found + g.found


def _bnb4(g: _Groups, state: TensorRecord) -> None:
    weight_name = state.name.rpartition(".")[0][: -len(".quant_state")]
    w = g.get(weight_name)
    if w is None:
        return
    kind = state.name.rpartition("__")[2]
    shape: tuple[int, ...] | None = None
    raw = g.read(state) if state.dtype == "uint8" and len(state.shape) == 1 else None
    if raw is not None:
        try:
            doc = json.loads(raw.decode("utf-8"))
            dims = doc.get("shape") if isinstance(doc, dict) else None
            if isinstance(dims, list) and 0 < len(dims) <= 8 and all(_int(d) for d in dims):
                shape = tuple(dims)
            kind = str(doc.get("quant_type") or kind) if isinstance(doc, dict) else kind
        except (ValueError, UnicodeDecodeError, AttributeError):
            shape = None
    packed = w.nbytes * 2  # two 4-bit values per byte, whatever dtype holds them (quant_storage)
    if shape is None or not (packed - 1 <= prod(shape) <= packed):
        shape = (packed,)
    extras = ["absmax", "quant_map", "nested_absmax", "nested_quant_map"]
    g.add(
        w,
        kind[:16],
        "bitsandbytes",
        weight_name,
        shape,
        [state.name, *(f"{weight_name}.{e}" for e in extras)],
    )


def _bnb8(g: _Groups, prefix: str) -> None:
    w = g.get(f"{prefix}.weight")
    if w is None or w.dtype != "int8":
        return
    g.add(w, "int8", "bitsandbytes", w.name, w.shape, [f"{prefix}.SCB", f"{prefix}.weight_format"])


def _gptq_awq(g: _Groups, prefix: str) -> None:
    q, scales = g.get(f"{prefix}.qweight"), g.get(f"{prefix}.scales")
    if q is None or scales is None or len(q.shape) != 2 or len(scales.shape) != 2:
        return
    zeros, gidx = g.by_name.get(f"{prefix}.qzeros"), g.by_name.get(f"{prefix}.g_idx")
    word = q.itemsize * 8  # 32 for int32 words
    out = scales.shape[1]
    method = g.config.method if g.config.method in ("gptq", "awq") else ""
    if not method:
        method = "gptq" if q.shape[1] == out else "awq"
    bits = g.config.bits
    if method == "awq":  # packed along the output dimension: [in, out * bits / 32]
        inner = q.shape[0]
        bits = bits or (q.shape[1] * word // out if out else None)
    else:  # packed along the input dimension: [in * bits / 32, out]
        if bits is None and zeros is not None and len(zeros.shape) == 2 and out:
            bits = zeros.shape[1] * word // out
        if bits is None and gidx is not None and gidx.shape and gidx.shape[0]:
            bits = q.shape[0] * word // gidx.shape[0]
        bits = bits or 4
        inner = gidx.shape[0] if gidx is not None and gidx.shape else q.shape[0] * word // bits
    if not bits or not inner or not out:
        return
    scheme = f"{method} {_bits_label(bits)} {_group_label(inner, scales.shape[0])}"
    g.add(
        q,
        scheme,
        method,
        f"{prefix}.weight",
        (out, inner),
        [f"{prefix}.qzeros", f"{prefix}.scales", f"{prefix}.g_idx"],
    )


def _compressed(g: _Groups, prefix: str) -> None:
    p = g.get(f"{prefix}.weight_packed")
    if p is None or len(p.shape) != 2:
        return
    scale = g.by_name.get(f"{prefix}.weight_scale")
    out = p.shape[0]
    companions = [
        f"{prefix}.{n}"
        for n in (
            "weight_scale",
            "weight_zero_point",
            "weight_shape",
            "weight_g_idx",
            "weight_global_scale",
            *INPUT_COMPANIONS,
        )
    ]
    if p.dtype == "uint8" and scale is not None and scale.dtype in FP8_DTYPES:
        inner = p.shape[1] * 2
        g.add(p, "nvfp4", "compressed-tensors", f"{prefix}.weight", (out, inner), companions)
        return
    bits = g.config.bits or 4
    inner = p.shape[1] * p.itemsize * 8 // bits
    groups = scale.shape[-1] if scale is not None and len(scale.shape) == 2 else 1
    scheme = f"compressed-tensors {_bits_label(bits)} {_group_label(inner, groups)}"
    g.add(p, scheme, "compressed-tensors", f"{prefix}.weight", (out, inner), companions)


def _mxfp4(g: _Groups, prefix: str, stem: str) -> None:
    base = f"{prefix}.{stem}" if prefix else stem
    blocks, scales = g.get(f"{base}_blocks"), g.get(f"{base}_scales")
    if (
        blocks is None
        or scales is None
        or len(blocks.shape) < 2
        or blocks.dtype not in ("uint8", "float4_e2m1fn_x2")
    ):
        return
    if tuple(scales.shape) != tuple(blocks.shape[:-1]):
        return
    shape = (*blocks.shape[:-2], blocks.shape[-2] * blocks.shape[-1] * 2)
    g.add(blocks, "mxfp4", "mxfp4", base, shape, [scales.name])


def _scaled_weight(g: _Groups, prefix: str) -> None:
    """A `weight` with `weight_scale_inv` / `weight_scale`: FP8 (block, channel or tensor),
    NVFP4 (ModelOpt), MXFP4 in F4, or compressed-tensors int8."""
    w = g.get(f"{prefix}.weight")
    if w is None or len(w.shape) < 2:
        return
    inv = g.by_name.get(f"{prefix}.weight_scale_inv")
    scale = inv if inv is not None else g.by_name.get(f"{prefix}.weight_scale")
    if scale is None:
        return
    companions = [
        scale.name,
        f"{prefix}.weight_scale_2",
        f"{prefix}.weight_global_scale",
        f"{prefix}.weight_zero_point",
        *(f"{prefix}.{n}" for n in INPUT_COMPANIONS),
    ]
    if w.dtype in FP8_DTYPES:
        name = _fp8_name(w.dtype)
        if scale.numel == 1 and inv is None:  # `weight_scale_inv` is always a block scale
            scheme = f"{name} tensor"
        elif (
            len(scale.shape) >= 1
            and scale.shape[0] == w.shape[0]
            and (len(scale.shape) == 1 or scale.shape[-1] == 1)
        ):
            scheme = f"{name} channel"
        else:
            block = block_of(w.shape, scale.shape, g.config.block)
            if block is None:
                scheme = f"{name} scaled"
            else:
                scheme = (
                    f"{name} block {block[0]}"
                    if block[0] == block[1]
                    else f"{name} block {block[0]}x{block[1]}"
                )
        g.add(w, scheme, "fp8", w.name, w.shape, companions)
        return
    if w.dtype in ("uint8", "float4_e2m1fn_x2") and len(scale.shape) == len(w.shape):
        inner = w.shape[-1] * 2
        per = inner // scale.shape[-1] if scale.shape[-1] else 0
        if scale.dtype in FP8_DTYPES and per == 16:
            g.add(w, "nvfp4", "nvfp4", w.name, (*w.shape[:-1], inner), companions)
        elif scale.dtype in ("float8_e8m0fnu", "uint8") and per == 32:
            g.add(w, "mxfp4", "mxfp4", w.name, (*w.shape[:-1], inner), companions)
        return
    if w.dtype == "int8" and scale.numel > 0:
        groups = scale.shape[-1] if len(scale.shape) == 2 else 1
        g.add(
            w,
            f"compressed-tensors int8 {_group_label(w.shape[-1], groups)}",
            "compressed-tensors",
            w.name,
            w.shape,
            companions,
        )


def annotate(ckpt: Checkpoint) -> None:
    """Find the quantized weights of `ckpt`'s model and mark their records (see the module's
    docstring). Readers' callers run it once, before anything builds the module tree."""
    config, warning = read_quant_config(ckpt)
    if warning:
        ckpt.warnings.append(warning)
    model = [t for t in ckpt.tensors if t.section == ""]
    found = recognise(model, config)
    if config is not None:
        ckpt.metadata["quantization_config"] = {
            "quant_method": config.method,
            **({"bits": config.bits} if config.bits else {}),
            **({"group_size": config.group_size} if config.group_size else {}),
            **({"weight_block_size": list(config.block)} if config.block else {}),
            **({"skipped_modules": list(config.skipped[:64])} if config.skipped else {}),
        }
    if not found:
        return
    by_name = {t.name: t for t in model}
    for primary, info in found:
        primary.quant = info
        primary.kind = PARAMETER
        primary.kind_from_file = False
        for name in info.companions:
            c = by_name[name]
            c.companion_of = primary.name
            c.kind = BUFFER
            c.kind_from_file = False
        if info.method in ("gptq", "awq"):
            # GPTQ's and AWQ's QuantLinear register the bias as a buffer: a parameter of the
            # logical model, but one that does not train (taken at the layout's word)
            bias = by_name.get(f"{info.logical_name.rpartition('.')[0]}.bias")
            if bias is not None and bias.kind == PARAMETER:
                bias.kind_from_file = True
                bias.requires_grad = False


def bits_per_weight(info: QuantInfo) -> float:
    """Real bits per logical parameter (packed data and companions)."""
    return 8.0 * info.nbytes / info.logical_numel if info.logical_numel else math.nan
