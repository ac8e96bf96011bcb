"""The neutral description of a checkpoint: tensor records, the module tree, non-tensor entries.

Readers fill these in from metadata alone; nothing here reads tensor bytes or imports torch.
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .enums import StrEnum

# Element sizes of every dtype torch can serialise, by torch's own dtype name.
DTYPE_ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "complex128": 16,
    "complex64": 8,
    "complex32": 4,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint64": 8,
    "uint32": 4,
    "uint16": 2,
    "uint8": 1,
    "bool": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
    "qint8": 1,
    "quint8": 1,
    "qint32": 4,
    "quint4x2": 1,
    "quint2x4": 1,
}

# GGML's block-quantized types (ggml.h; gguf-py's GGML_QUANT_SIZES), by GGML's own names: values
# are stored in blocks of `elements` that take `bytes` each (Q4_K: 256 values in 144 bytes), so a
# tensor's bytes are not numel times an item size (span_bytes). GGUF files (readers.gguf) hold them.
BLOCK_DTYPES: dict[str, tuple[int, int]] = {
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q8_1": (32, 40),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
    "Q8_K": (256, 292),
    "IQ2_XXS": (256, 66),
    "IQ2_XS": (256, 74),
    "IQ3_XXS": (256, 98),
    "IQ1_S": (256, 50),
    "IQ4_NL": (32, 18),
    "IQ3_S": (256, 110),
    "IQ2_S": (256, 82),
    "IQ4_XS": (256, 136),
    "IQ1_M": (256, 56),
    "TQ1_0": (256, 54),
    "TQ2_0": (256, 66),
    "MXFP4": (32, 17),
    "NVFP4": (64, 36),
    "Q1_0": (128, 18),
}


def span_bytes(dtype: str, elements: int) -> int:
    """Bytes that `elements` consecutive values of `dtype` take: the one rule for every size,
    block-quantized types included (a started block counts whole)."""
    item = DTYPE_ITEMSIZE.get(dtype)
    if item is not None:
        return elements * item
    block = BLOCK_DTYPES.get(dtype)
    if block is not None:
        return -(-elements // block[0]) * block[1]
    return elements


FLOATING_DTYPES = frozenset(
    {
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
    }
)
COMPLEX_DTYPES = frozenset({"complex128", "complex64", "complex32"})
GRAD_DTYPES = FLOATING_DTYPES | COMPLEX_DTYPES  # what torch lets require grad

# Names a state_dict uses for buffers; without a module in the file this is how we tell them apart.
BUFFER_LEAF_NAMES = frozenset(
    {
        "running_mean",
        "running_var",
        "num_batches_tracked",
        "position_ids",
        "inv_freq",
        "masked_bias",
        "token_type_ids",
    }
)

class TensorKind(StrEnum):
    PARAMETER = "parameter"
    BUFFER = "buffer"
    TENSOR = "tensor"  # a plain tensor value (optimizer state, an entry), neither of the above


PARAMETER, BUFFER, TENSOR = TensorKind.PARAMETER, TensorKind.BUFFER, TensorKind.TENSOR


class Format(StrEnum):
    """What a file is, by its bytes (readers.sniff); JSON writes the plain value."""

    TORCH_ZIP = "torch-zip"
    TORCH_LEGACY = "torch-legacy"
    TORCHSCRIPT = "torchscript"
    PICKLE = "pickle"
    SAFETENSORS = "safetensors"
    SHARDED_SAFETENSORS = "sharded-safetensors"
    SHARDED_TORCH = "sharded-torch"
    DCP = "dcp"
    GGUF = "gguf"


def can_require_grad(dtype: str) -> bool:
    """Only floating-point and complex tensors can require grad (torch's own rule)."""
    return dtype in GRAD_DTYPES


def trains(t: TensorRecord) -> bool:
    """Whether `t` trains when the checkpoint is loaded into its model (TensorRecord.trainable):
    the one place of the rule. Only parameters of a dtype that can require grad train; a file
    that keeps the Parameter is taken at its word, a state_dict's detached tensors train."""
    if t.kind != PARAMETER or t.dtype not in GRAD_DTYPES or t.quant is not None:
        return False  # a quantized weight is a frozen base (quant.py); adapters train on it
    return t.requires_grad if t.kind_from_file else True


# ----------------------------------------------------------------------------------------------
# Sealed against the pickle
# ----------------------------------------------------------------------------------------------
# A pickle's BUILD opcode calls `obj.__setstate__(state)` (or, without one, writes the state
# into the object's attributes) on whatever is on top of its stack: a record our rebuild
# functions just validated, or even the class or function find_class returned. Records and the
# callables the unpickler hands out define __setstate__ as `RefuseBuild`, so BUILD never changes
# them; the unpickler that is running collects each attempt (see `collect_refused_builds`) and
# reports it. Outside an unpickling (copy.copy) the state is restored as Python would.
_build_sink = threading.local()


class RefuseBuild:
    """`__setstate__` for sealed classes: a descriptor, so BUILD on the class itself (where
    BUILD looks the name up on the class) is refused as well as BUILD on an instance."""

    def __get__(self, obj: Any, owner: type) -> Any:
        target = owner if obj is None else obj
        return lambda state: _refuse_build(target, state)


def _refuse_build(target: Any, state: Any) -> None:
    sink = getattr(_build_sink, "sink", None)
    if sink is None:  # not a hostile pickle: copy.copy / pickle round trips of our own objects
        if isinstance(target, type):
            raise TypeError(f"cannot set state on class {target.__name__}")
        slots = state[1] if isinstance(state, tuple) and len(state) == 2 else state
        for key, value in (slots or {}).items():
            object.__setattr__(target, key, value)
        return
    sink.append((target, state))


class collect_refused_builds:
    """Context manager: BUILD attempts on sealed objects in this thread land in the list it yields."""

    def __enter__(self) -> list[tuple[Any, Any]]:
        self.outer = getattr(_build_sink, "sink", None)
        _build_sink.sink = []
        return _build_sink.sink

    def __exit__(self, *exc: object) -> None:
        _build_sink.sink = self.outer


def prod(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


@dataclass(eq=False, slots=True)
class StorageRecord:
    """One serialised storage: where its bytes are and how many there should be."""

    key: str
    dtype: str
    numel: int
    location: str = "cpu"
    file: Path | None = None
    data_offset: int | None = None  # absolute offset of the first byte in `file`; None: not found
    data_size: int | None = None  # bytes actually present at data_offset
    compressed: bool = False
    byteorder: str = "little"
    # A remote zip member's local header, when data_offset was predicted from the directory
    # (ZipArchive.predicted_offset) instead of read: checked where the bytes are fetched.
    header_offset: int | None = None

    __setstate__ = RefuseBuild()  # the pickle cannot rewrite what persistent_load built

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE.get(self.dtype, 1)

    @property
    def nbytes(self) -> int:
        return span_bytes(self.dtype, self.numel)


@dataclass(eq=False, slots=True, init=False)
class TensorRecord:
    """A tensor as the file describes it. `name` is relative to its section (the model's names
    are the ones `load_state_dict` expects)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    stride: tuple[int, ...] = ()
    storage_offset: int = 0
    storage: StorageRecord | None = None
    requires_grad: bool = False
    kind: str = TENSOR
    kind_from_file: bool = False  # True when the file itself says parameter/buffer
    section: str = ""  # "" = the model; otherwise the section path, e.g. "optimizer"
    shard: str | None = None  # file holding the bytes, for sharded checkpoints
    persistent: bool = True
    note: str | None = None  # e.g. "quantized", "sparse": kinds we describe but cannot load
    tied_to: str | None = None  # first tensor (by order) whose storage this one shares
    quant: Any = None  # quant.QuantInfo on the packed record of a quantized weight
    companion_of: str | None = None  # a quantized weight's scale/zero/state: that weight's name
    alias_of: str | None = None  # same storage, offset, shape and stride: counted once
    pickle_seq: int | None = None  # creation order in its pickle (see TensorRef)
    numel: int = 0  # derived from shape
    nbytes: int = 0  # derived from shape and dtype

    __setstate__ = RefuseBuild()  # see RefuseBuild: the pickle's BUILD cannot rewrite a record

    # Written out (one per tensor, 100k in a big state_dict): 40% cheaper than the generated one.
    def __init__(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: str,
        stride: tuple[int, ...] = (),
        storage_offset: int = 0,
        storage: StorageRecord | None = None,
        requires_grad: bool = False,
        kind: str = TENSOR,
        kind_from_file: bool = False,
        section: str = "",
        shard: str | None = None,
        persistent: bool = True,
        note: str | None = None,
        tied_to: str | None = None,
        alias_of: str | None = None,
        pickle_seq: int | None = None,
    ) -> None:
        self.name = name
        self.shape = shape
        self.dtype = dtype
        self.stride = stride
        self.storage_offset = storage_offset
        self.storage = storage
        self.requires_grad = requires_grad
        self.kind = kind
        self.kind_from_file = kind_from_file
        self.section = section
        self.shard = shard
        self.persistent = persistent
        self.note = note
        self.tied_to = tied_to
        self.quant = None
        self.companion_of = None
        self.alias_of = alias_of
        self.pickle_seq = pickle_seq
        self.numel = numel = math.prod(shape)  # 1 for a scalar's ()
        item = DTYPE_ITEMSIZE.get(dtype)
        self.nbytes = numel * item if item is not None else span_bytes(dtype, numel)

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE.get(self.dtype, 1)

    @property
    def params(self) -> int:
        """Elements as parameters count them: a quantized weight's logical size (quant.py)."""
        return self.numel if self.quant is None else self.quant.logical_numel

    @property
    def location(self) -> str:
        return self.storage.location if self.storage is not None else "cpu"

    @property
    def is_model(self) -> bool:
        return self.section == ""

    @property
    def trainable(self) -> bool:
        """Whether this tensor trains when the checkpoint is loaded into its model.

        A state_dict stores detached tensors, so `requires_grad` there says nothing: loading into
        the model makes parameters trainable. Files that keep the Parameter (full modules,
        TorchScript, saved Parameters) are taken at their word.
        """
        return trains(self)

    @property
    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    @property
    def qualified_name(self) -> str:
        return f"{self.section}/{self.name}" if self.section else self.name


@dataclass(slots=True)
class Entry:
    """A non-tensor value in the file (epoch, step, hyper-parameters, versions)."""

    path: str
    type: str
    value: Any  # bool/int/float/str/None, or a short string rendering for anything else


@dataclass(slots=True)
class GlobalRef:
    """A global the pickle names. We never import it; this is all we know about it."""

    module: str
    name: str
    safety: str  # "safe" (allowlisted) | "unsafe" (weights_only would refuse) | "dangerous"
    count: int = 0
    calls: list[str] = field(default_factory=list)  # what it would have been called with
    pickle: str = ""  # archive member or file it appears in
    reason: str = ""

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


# -- names ----------------------------------------------------------------------------------
# Names come from the file. A few names of 10,000 dots each took minutes and gigabytes: every
# implied module keeps its full dotted name, so a name of L characters and d dots costs d*L. A
# name is capped at MAX_NAME_CHARS (the cut keeps a digest of the whole, so distinct names stay
# distinct) and the module tree implied by dots stops at MAX_NAME_DEPTH levels; both are
# reported as warnings (`Checkpoint.cap_names`).
MAX_NAME_CHARS = 1024
MAX_NAME_DEPTH = 64
TREE_NODE_COST = 256  # a ModuleNode with its empty dicts and list, in bytes
MIN_TREE_BUDGET = 64 << 20
TREE_BUDGET_PER_TENSOR = 512  # a real 100k-tensor model's tree costs about 300 per tensor
_CUT = "\u2026#"  # "…#" + 16 hex digits end a shortened name


def dims_key(dims: tuple[int, ...]) -> str:
    """A shape or stride as a dict key. Tuples of ints hash as the file chooses (all of 100k
    views' shapes can collide, and each insertion then compares with all before it); a str's
    hash is keyed per process."""
    return ",".join(map(str, dims))


def block_index(part: str) -> int | None:
    """A name part as a block number (`layers.12`), or None. At most 15 ASCII digits: longer
    numbers (k * (2**61-1) all hash alike) must not become int keys of a set or dict."""
    return int(part) if 0 < len(part) <= 15 and part.isascii() and part.isdigit() else None


def cap_name(name: str) -> str:
    """`name`, or its first characters and a digest of the whole when it is too long."""
    if len(name) <= MAX_NAME_CHARS:
        return name
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"{name[: MAX_NAME_CHARS - len(_CUT) - 16]}{_CUT}{digest}"


@functools.lru_cache(maxsize=4096)
def cap_key(key: str) -> str:
    """cap_name for one key: a memoised key repeated at every level is cut (and hashed) once."""
    return cap_name(key)


def join_name(where: str, key: str) -> str:
    """`where.key`, capped: the work per join is bounded by MAX_NAME_CHARS, however long the key."""
    if len(key) > MAX_NAME_CHARS:
        key = cap_key(key)
    return cap_name(f"{where}.{key}") if where else key


def is_cut(name: str) -> bool:
    return len(name) == MAX_NAME_CHARS and name[-16 - len(_CUT) : -16] == _CUT


def module_path(name: str) -> str:
    """The module a tensor name implies (everything before its last dot), at most MAX_NAME_DEPTH
    levels deep: deeper components stay in the tensor's own name."""
    path = name.rpartition(".")[0]
    if path.count(".") >= MAX_NAME_DEPTH:
        path = ".".join(path.split(".", MAX_NAME_DEPTH)[:MAX_NAME_DEPTH])
    return path


@dataclass(eq=False, slots=True, init=False)
class ModuleNode:
    """A module in the tree: real (class and attributes from the file) or implied by names."""

    name: str  # full dotted name; "" for the root
    class_path: str | None
    attributes: dict[str, Any]
    children: dict[str, ModuleNode]
    tensors: list[TensorRecord]
    training: bool | None
    _stats: ModuleStats | None

    # Written out: the generated __init__ (default factories) took twice as long, and a
    # 100k-tensor state_dict implies 120k of these.
    def __init__(
        self,
        name: str,
        class_path: str | None = None,
        attributes: dict[str, Any] | None = None,
        children: dict[str, ModuleNode] | None = None,
        tensors: list[TensorRecord] | None = None,
        training: bool | None = None,
    ) -> None:
        self.name = name
        self.class_path = class_path
        self.attributes = {} if attributes is None else attributes
        self.children = {} if children is None else children
        self.tensors = [] if tensors is None else tensors
        self.training = training
        self._stats = None

    @property
    def short_name(self) -> str:
        return self.name.rsplit(".", 1)[-1] if self.name else ""

    @property
    def class_name(self) -> str | None:
        return self.class_path.rsplit(".", 1)[-1] if self.class_path else None

    def child(self, part: str) -> ModuleNode:
        node = self.children.get(part)
        if node is None:
            node = ModuleNode(join_name(self.name, part))
            self.children[part] = node
        return node

    def walk(self):
        """Depth-first, parents before children, without recursion (names can be deep)."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            if node.children:
                stack.extend(reversed(node.children.values()))

    def all_tensors(self):
        for node in self.walk():
            yield from node.tensors

    @property
    def stats(self) -> ModuleStats:
        """Aggregates over the subtree; aliased tensors count once (computed once, for all)."""
        if self._stats is None:
            fill_stats(self)
        return self._stats


def fill_stats(root: ModuleNode) -> None:
    """Compute `stats` for every node under root in one post-order pass (no recursion)."""
    order = [root]  # breadth-first: every parent before its children, so reversed it is post-order
    for node in order:  # the list grows while it is walked
        if node.children:
            order.extend(node.children.values())
    for node in reversed(order):
        count = params = trainable = buffers = nbytes = 0
        for t in node.tensors:
            count += 1
            if t.alias_of is not None:
                continue
            nbytes += t.nbytes
            if t.kind == PARAMETER:
                params += t.numel if t.quant is None else t.quant.logical_numel
                if trains(t):
                    trainable += t.numel
            elif t.companion_of is None:  # companions are bytes of their weight, not elements
                buffers += t.numel
        if node.children:
            for child in node.children.values():
                c = child._stats
                count += c.tensors
                params += c.params
                trainable += c.trainable
                buffers += c.buffers
                nbytes += c.nbytes
        node._stats = ModuleStats(count, params, trainable, buffers, nbytes)


@dataclass(slots=True)
class ModuleStats:
    tensors: int = 0
    params: int = 0
    trainable: int = 0
    buffers: int = 0
    nbytes: int = 0


@dataclass(slots=True)
class Totals:
    tensors: int
    parameters: int  # elements of parameters, aliases counted once
    trainable: int
    frozen: int
    buffers: int  # elements of buffers and plain tensors
    nbytes: int  # bytes of the model's tensors, aliases counted once
    bytes_by_dtype: dict[str, int]
    bytes_by_location: dict[str, int]
    sections: dict[str, dict[str, int]]  # other sections: {"optimizer": {"tensors": n, "bytes": b}}
    file_bytes: int  # unique storage bytes of everything in the file
    # quantized weights by scheme: {"nf4": {"weights", "parameters" (logical), "bytes" (real)}}
    quantized: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.parameters if self.parameters else 0.0


@dataclass(eq=False)
class Checkpoint:
    path: Path
    format: str  # torch-zip | torch-legacy | torchscript | safetensors | sharded | dcp
    kind: str = "state_dict"  # state_dict | training_checkpoint | lightning | full_module | ...
    tensors: list[TensorRecord] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    globals: list[GlobalRef] = field(default_factory=list)
    model_path: str = ""  # where the model sits in the file: "", "model", "state_dict", ...
    sections: dict[str, str] = field(default_factory=dict)  # section path -> role
    metadata: dict[str, Any] = field(default_factory=dict)  # format-level facts
    files: list[Path] = field(default_factory=list)
    # small files beside a remote checkpoint that its reader fetched (config.json): the local
    # readers' neighbours are read from disk where they are used
    side_files: dict[str, bytes] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # structural defects (missing/short bytes)
    # What the format's reference loader (torch.load, safetensors) would refuse although mscope
    # reads the file: one plain line each. audit makes each an error (reference-loader-refuses);
    # summary and the explorer show them as warnings.
    refusals: list[str] = field(default_factory=list)
    module_root: ModuleNode | None = None  # real hierarchy, when the file has one
    # ids of tensors whose values are never read: views that repeat their storage's bytes past
    # the file's view budget (readers.check_view_budget); audit and diff report them skipped
    over_budget: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not hasattr(self.path, "url"):  # a RemotePath (readers.sources) stays a URL
            self.path = Path(self.path)

    # -- views ---------------------------------------------------------------------------------
    @property
    def model_tensors(self) -> list[TensorRecord]:
        return [t for t in self.tensors if t.section == ""]

    @property
    def has_real_hierarchy(self) -> bool:
        return self.module_root is not None

    @cached_property
    def tree(self) -> ModuleNode:
        """The model's module tree: the file's own when it has one, else implied by dotted names."""
        if self.module_root is not None:
            return self.module_root
        root = ModuleNode("")
        by_path: dict[str, ModuleNode] = {"": root}
        # Each implied module keeps its full name: names of 64 levels and 1 KB make 32 KB of
        # them per tensor. The tree is bounded as a whole (TREE_NODE_COST per module plus its
        # name's characters); past the budget a tensor joins its deepest existing module.
        budget = max(MIN_TREE_BUDGET, TREE_BUDGET_PER_TENSOR * len(self.tensors))
        spent = 0
        folded: list[str] = []

        def node_for(path: str) -> ModuleNode:
            nonlocal spent
            missing = []
            while path not in by_path:
                parent, _, part = path.rpartition(".")
                missing.append((path, part))
                path = parent
            node = by_path[path]
            for full, part in reversed(missing):
                if spent + TREE_NODE_COST + len(full) > budget:
                    break
                spent += TREE_NODE_COST + len(full)
                child = by_path[full] = ModuleNode(full)
                node.children[part] = child
                node = child
            return node

        for t in self.tensors:
            if t.section:
                continue
            # module_path, inline for the usual shallow name; a quantized weight's companion
            # (`W.absmax`, `W.quant_state.x`) sits in its weight's module, not in modules named after W
            path = (t.name if t.companion_of is None else t.companion_of).rpartition(".")[0]
            if path.count(".") >= MAX_NAME_DEPTH:
                path = module_path(t.name)
            node = by_path.get(path)
            if node is None:
                parent_path, _, part = path.rpartition(".")
                parent = by_path.get(parent_path)
                if parent is not None and spent + TREE_NODE_COST + len(path) <= budget:
                    # the usual case, inline: a new module in a known one
                    spent += TREE_NODE_COST + len(path)
                    node = by_path[path] = ModuleNode(path)
                    parent.children[part] = node
                else:
                    node = node_for(path)
                    if node.name != path:
                        folded.append(t.name)
            node.tensors.append(t)
        if folded:
            self.warnings.append(
                f"the module tree implied by names reached its budget ({budget:,}); {len(folded):,} tensor(s) "
                f"are listed under their deepest module shown: {folded[0][:60]!r}..."
            )
        return root

    @property
    def unsafe_globals(self) -> list[GlobalRef]:
        return [g for g in self.globals if g.safety != "safe"]

    @property
    def dangerous_globals(self) -> list[GlobalRef]:
        return [g for g in self.globals if g.safety == "dangerous"]

    def tensor(self, name: str, section: str = "") -> TensorRecord | None:
        return self._by_name.get((section, name))

    @cached_property
    def _by_name(self) -> dict[tuple[str, str], TensorRecord]:
        return {(t.section, t.name): t for t in self.tensors}

    # -- derived facts -------------------------------------------------------------------------
    def cap_names(self) -> None:
        """Cap every tensor and entry name (cap_name) and warn about names that were cut or nest
        deeper than the implied module tree goes. Readers cap names as they join them; this
        catches the rest (safetensors headers, DCP metadata) and says what was cut."""
        cut: list[str] = []
        deep: list[str] = []
        for t in self.tensors:
            name = t.name
            if len(name) > MAX_NAME_CHARS:
                name = t.name = cap_name(name)
            if is_cut(name):
                cut.append(name)
            if name.count(".") > MAX_NAME_DEPTH:
                deep.append(name)
        for e in self.entries:
            if len(e.path) > MAX_NAME_CHARS:
                e.path = cap_name(e.path)
            if is_cut(e.path):
                cut.append(e.path)

        def first(names: list[str]) -> str:
            more = f" and {len(names) - 1:,} more" if len(names) > 1 else ""
            return f"{names[0][:60]!r}...{more}"

        if cut:
            self.warnings.append(
                f"{len(cut):,} name(s) longer than {MAX_NAME_CHARS:,} characters are shown cut, "
                f"ending in a digest of the whole name: {first(cut)}"
            )
        if deep:
            self.warnings.append(
                f"{len(deep):,} tensor name(s) nest deeper than {MAX_NAME_DEPTH} modules; the module "
                f"tree stops at depth {MAX_NAME_DEPTH}: {first(deep)}"
            )

    def link_shared_storages(self) -> None:
        """Mark tensors that share a storage (tied weights). Readers call this once at the end."""
        first_by_storage: dict[int, TensorRecord] = {}
        first_by_view: dict[tuple, TensorRecord] = {}
        for t in self.tensors:
            if t.storage is None:
                continue
            sid = id(t.storage)
            first = first_by_storage.setdefault(sid, t)
            if first is t:
                continue
            t.tied_to = first.qualified_name
            if not first_by_view.get((sid,)):
                first_by_view[(sid,)] = first
                first_by_view[(sid, first.storage_offset, dims_key(first.shape), dims_key(first.stride), first.dtype)] = first
            view = (sid, t.storage_offset, dims_key(t.shape), dims_key(t.stride), t.dtype)
            original = first_by_view.setdefault(view, t)
            if original is not t and original.section == t.section:
                t.alias_of = original.qualified_name

    def check_storage_bounds(self) -> None:
        """Record every tensor whose bytes are not all in the file. Readers call this last."""
        itemsizes = DTYPE_ITEMSIZE
        storage_bytes: dict[int, int | None] = {}  # id -> declared bytes; None once reported
        for t in self.tensors:
            s = t.storage
            if s is None:
                continue
            sid = id(s)
            if sid in storage_bytes:
                size = storage_bytes[sid]
            else:
                item = itemsizes.get(s.dtype)
                size = storage_bytes[sid] = s.numel * item if item is not None else span_bytes(s.dtype, s.numel)
                if s.data_offset is None:
                    storage_bytes[sid] = None
                    self.problems.append(f"storage {s.key!r} of tensor {t.qualified_name!r} is missing from the file")
                    continue
                if s.data_size is not None and not s.compressed and s.data_size < size:
                    storage_bytes[sid] = None
                    self.problems.append(
                        f"storage {s.key!r} of tensor {t.qualified_name!r} holds {s.data_size:,} bytes "
                        f"but declares {size:,}"
                    )
                    continue
            if t.numel == 0:
                continue
            shape = t.shape
            stride = t.stride
            if len(shape) == 1:
                last = t.storage_offset + (shape[0] - 1) * stride[0]
            elif len(shape) == 2:
                last = t.storage_offset + (shape[0] - 1) * stride[0] + (shape[1] - 1) * stride[1]
            else:
                last = t.storage_offset + sum((n - 1) * st for n, st in zip(shape, stride))
            item = itemsizes.get(t.dtype)
            needed = (last + 1) * item if item is not None else span_bytes(t.dtype, last + 1)
            declared = size if size is not None else s.nbytes
            if needed > declared:
                self.problems.append(
                    f"tensor {t.qualified_name!r} {list(t.shape)} needs {needed:,} bytes "
                    f"but its storage {s.key!r} holds {declared:,}"
                )

    def totals(self) -> Totals:
        """Totals as saved in the file (cached: records do not change after reading)."""
        cached = self.__dict__.get("_totals")
        if cached is None:
            cached = self.__dict__["_totals"] = self._compute_totals()
        return cached

    def _compute_totals(self) -> Totals:
        params = trainable = buffers = nbytes = 0
        by_dtype: dict[str, int] = {}
        by_location: dict[str, int] = {}
        sections: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "bytes": 0})
        quantized: dict[str, dict[str, int]] = {}
        model_count = 0
        file_bytes = 0  # unique storages, plus tensors without one
        seen_storages: set[int] = set()
        itemsizes = DTYPE_ITEMSIZE
        for t in self.tensors:
            s = t.storage
            if s is None:
                if t.alias_of is None:
                    file_bytes += t.nbytes
            elif id(s) not in seen_storages:
                seen_storages.add(id(s))
                item = itemsizes.get(s.dtype)
                file_bytes += s.numel * item if item is not None else span_bytes(s.dtype, s.numel)
            if t.section != "":
                sec = sections[t.section.split(".", 1)[0]]
                sec["tensors"] += 1
                if t.alias_of is None:
                    sec["bytes"] += t.nbytes
                continue
            model_count += 1
            if t.alias_of is not None:
                continue
            size = t.nbytes
            nbytes += size
            dtype = t.dtype
            by_dtype[dtype] = by_dtype.get(dtype, 0) + size
            location = s.location if s is not None else "cpu"
            by_location[location] = by_location.get(location, 0) + size
            if t.kind == PARAMETER:
                q = t.quant
                if q is None:
                    params += t.numel
                else:
                    params += q.logical_numel
                    entry = quantized.setdefault(q.scheme, {"weights": 0, "parameters": 0, "bytes": 0})
                    entry["weights"] += 1
                    entry["parameters"] += q.logical_numel
                    entry["bytes"] += q.nbytes
                if trains(t):
                    trainable += t.numel
            elif t.companion_of is None:  # companions are bytes of their weight, not elements
                buffers += t.numel
        return Totals(
            tensors=model_count,
            parameters=params,
            trainable=trainable,
            frozen=params - trainable,
            buffers=buffers,
            nbytes=nbytes,
            bytes_by_dtype=dict(Counter(by_dtype).most_common()),
            bytes_by_location=dict(Counter(by_location).most_common()),
            sections=dict(sections),
            file_bytes=file_bytes,
            quantized=dict(sorted(quantized.items(), key=lambda kv: -kv[1]["bytes"])),
        )


def infer_kind(name: str, dtype: str) -> str:
    """Parameter or buffer for a state_dict entry, from its name and dtype."""
    if name.rpartition(".")[2] in BUFFER_LEAF_NAMES or dtype not in GRAD_DTYPES:
        return BUFFER
    return PARAMETER
