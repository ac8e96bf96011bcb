"""Checkpoint audits: integrity, load-ability, waste and (streamed) value statistics.

Everything here works on a metadata-only `Checkpoint` (see readers) and reads tensor bytes only
through `TensorData`, chunk by chunk, so memory stays bounded by the chunk size whatever the file
or the largest tensor. No Textual, and no torch unless a tensor's dtype needs it (float8).

API (the CLI and the explorer use these):

- `tensor_stats(data, record, chunk_bytes=..., cancel=None) -> TensorStats`: one tensor's min, max,
  mean, std, L2 norm, zeros, NaN and Inf counts in one streamed pass.
- `tensor_histogram(data, record, bins=40, stats=None) -> Histogram`: a second pass for the
  details pane.
- `run_audit(ckpt, stats=False, dedupe=False, crc=False, ...) -> AuditReport`: every check; with
  `stats` the statistics of every tensor (thread pool over chunks, progress and cancel).
- `audit_path(path, **kw) -> AuditReport`: opens the file (damaged files and broken shard sets
  become findings instead of errors) and runs the audit.
- `children_norms(stats, ckpt, module)`: the norm profile of a module's children.

Statistics, exactly:
- `min` / `max` over every value that is not NaN (so +-inf show up there); `mean`, `std`
  (population, `torch.std(x, correction=0)`), `norm` (L2) and `sumsq` over the finite values.
- The compiled kernel (statkernel.c, built at install; see statkernel.py) takes contiguous
  fp16 / bf16 / float32 tensors: one pass over memory per chunk, straight from the mapping by
  address (numpy is not even imported), on a thread per core (ctypes releases the GIL). 1.3B fp16
  values: 0.25 s on 2 threads, the time of touching the pages. Its mean is within ~1e-8 of the
  RMS of float64 truth (float32 lanes of <= 64 terms, float64 beyond). Everything else, or every
  tensor when the library is missing, takes the numpy kernels below (same numbers, ~3x slower).
- numpy: one pass per chunk. fp16 / bf16 min, max, zeros and NaN/Inf presence come from integer
  reductions on the raw bits; the values are widened to float32 exactly (fp16: shift, mask,
  rebias; numpy's own float16 cast is 6x slower; bf16: each int16 pair read as one int32 word,
  no cast loop) and summed over rows of 2,048 in float32 (np.vecdot), rows and
  chunks combined in float64 with Chan's formula; a chunk whose mean is large next to its spread
  is re-centred first, so `std` does not cancel away, and one whose values are all below 2^-50
  (float32 squares would underflow) is summed in float64. Chunks with NaN / Inf take an exact
  slower path (min / max without np.fmin, which signalling NaNs fool). Measured error against
  float64 torch: < 1e-6 relative. Cost on a 2-core box: ~1 ns per fp16 value and thread, i.e.
  ~10 numpy passes (bench/fused_pass_probe.py times both kernels).
- Measured and rejected: one np.bincount over the 16-bit patterns (exact sums from a 65,536-entry
  table) costs ~2 ns per value, twice the whole kernel; fp16 widened as int32 pairs is no faster
  than the cast; pread into a reused buffer instead of the
  mmap costs a copy and was slower; smaller chunks that stay in L2 lose more to per-call overhead
  than they gain (numpy's loops here run at SSE width either way).
- Threads: one per physical core; numpy and ctypes release the GIL inside each loop. Chunks of 2 MB (in
  tasks of 4) keep 2 threads 1.4-1.6x faster than one on a 2-core box; 1 MB chunks gain less
  (more GIL hand-offs), 4 MB ones fall out of cache.
- numpy, not torch: importing torch costs seconds, the order of a whole pass over a 1.3B model.
"""

from __future__ import annotations

import math
import os
import re
import struct
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import FLOATING_DTYPES, Checkpoint, TensorRecord, block_index, dims_key, prod
from .errors import MscopeError, TensorDataError
from .jsonfile import compact_json
from .tensordata import check_view
from .units import fmt_bytes, sparkline

if TYPE_CHECKING:
    from .tensordata import TensorData

SCHEMA = "mscope.audit"
SCHEMA_VERSION = 1

ERROR, WARNING, INFO = "error", "warning", "info"
SEVERITY_ORDER = {ERROR: 0, WARNING: 1, INFO: 2}

DEFAULT_CHUNK_BYTES = 2 << 20  # source bytes per chunk (per-thread scratch: 2x for fp16, <= 8x)
EXPLODING_ABS = 1e4
DEAD_ZERO_FRACTION = 0.99
VANISHED_ABS = 1e-6
OUTLIER_FACTOR = 10.0
OVERSIZED_RATIO = 2.0
OVERSIZED_MIN_WASTE = 64 << 10
DUPLICATE_MIN_BYTES = 1 << 10

# code -> (category for --fail-on, severity, what it means). docs/audit-schema.md lists the same.
CODES: dict[str, tuple[str, str, str]] = {
    # integrity
    "unreadable-file": ("corrupt", ERROR, "the file (or shard set) cannot be opened at all"),
    "missing-storage": ("corrupt", ERROR, "a storage the pickle references is not in the file"),
    "truncated-storage": (
        "corrupt",
        ERROR,
        "a storage has fewer bytes in the file than it declares",
    ),
    "out-of-bounds": ("corrupt", ERROR, "a tensor's view reaches past the end of its storage"),
    "compressed-storage": (
        "compressed",
        WARNING,
        "a storage is deflated in the zip: torch.load(mmap=True) misreads it",
    ),
    "unreadable-tensor": ("corrupt", ERROR, "reading a tensor's bytes failed during --stats"),
    "crc-mismatch": ("corrupt", ERROR, "a zip member's bytes do not match its CRC-32 (--crc)"),
    "corrupt": ("corrupt", ERROR, "another structural problem the reader found"),
    "shard-missing": ("corrupt", ERROR, "a shard listed in the index is not there"),
    "shard-unreadable": ("corrupt", ERROR, "a shard cannot be opened"),
    "shard-tensor-missing": ("corrupt", ERROR, "the index maps a tensor to a shard that lacks it"),
    "shard-duplicate-tensor": ("corrupt", ERROR, "a tensor is stored in two shards"),
    "shard-unlisted-tensor": ("shard", WARNING, "a shard holds a tensor the index does not list"),
    "shard-total-size": ("shard", WARNING, "index total_size disagrees with the shards"),
    "reader-warning": ("reader", WARNING, "another warning from the reader"),
    "reference-loader-refuses": (
        "corrupt",
        ERROR,
        "torch.load or safetensors would refuse the file, although mscope reads it",
    ),
    # load-ability
    "dangerous-global": (
        "dangerous",
        ERROR,
        "a global the pickle calls (outside the data constructors), tampers with, or known to run code",
    ),
    "unsafe-global": ("unsafe", WARNING, "globals torch.load(weights_only=True) rejects"),
    "map-location": ("device", WARNING, "tensors saved on an accelerator need map_location"),
    "no-data": ("nodata", WARNING, "tensors stored without values (meta, quantized, sparse...)"),
    "torchscript": ("info", INFO, "a TorchScript archive: torch.jit.load runs its code"),
    "not-torch-load": ("info", INFO, "how this format loads (no pickle / no torch.load)"),
    # waste
    "oversized-storage": ("waste", WARNING, "a tensor saved together with a much larger base"),
    "duplicate-tensor": ("waste", WARNING, "identical tensors stored twice instead of tied"),
    "optimizer-state": ("waste", INFO, "share of the file taken by optimizer state"),
    "fp32-copies": ("waste", INFO, "fp32 tensors next to half-precision weights"),
    # statistics (--stats)
    "nan": ("nan", ERROR, "tensor contains NaN"),
    "inf": ("inf", ERROR, "tensor contains +-Inf"),
    "all-zero": ("zero", WARNING, "every value is 0 (info for 1-D tensors such as biases)"),
    "constant": ("constant", WARNING, "every value is the same non-zero number (info for 1-D)"),
    "exploding": ("exploding", WARNING, f"some |value| > {EXPLODING_ABS:g}"),
    "dead": ("dead", WARNING, "almost all zeros, or every |value| below 1e-6"),
    "norm-outlier": (
        "outlier",
        WARNING,
        "a layer's norm is far from the same parameter in the other layers",
    ),
    "no-stats": ("info", INFO, "statistics not computed for this dtype"),
}

FAIL_ON_CHOICES = sorted(({c for c, _, _ in CODES.values()} - {"info"}) | {"error", "any", "none"})
DEFAULT_FAIL_ON = ("corrupt", "dangerous", "nan", "inf")


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Finding:
    severity: str  # error | warning | info
    code: str  # see CODES
    message: str  # one line, for people
    tensor: str | None = None  # qualified name (section/name) for the explorer to jump to
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def category(self) -> str:
        return CODES.get(self.code, ("other", WARNING, ""))[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "code": self.code,
            "category": self.category,
            "message": self.message,
            "tensor": self.tensor,
            "details": _jsonable(self.details),
        }


def finding(
    code: str, message: str, tensor: str | None = None, severity: str | None = None, **details: Any
) -> Finding:
    return Finding(severity or CODES[code][1], code, message, tensor, details)


@dataclass(slots=True)
class TensorStats:
    """Statistics of one tensor (see the module docstring for the exact definitions)."""

    name: str  # qualified name
    dtype: str
    shape: tuple[int, ...]
    numel: int
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    std: float | None = None
    sumsq: float = 0.0
    zeros: int = 0
    nan: int = 0
    inf: int = 0
    finite: int = 0
    flags: list[str] = field(default_factory=list)

    @property
    def norm(self) -> float:
        return math.sqrt(self.sumsq)

    @property
    def zero_fraction(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    @property
    def abs_max(self) -> float | None:
        if self.min is None or self.max is None:
            return None
        return max(abs(self.min), abs(self.max))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "numel": self.numel,
            "min": _num(self.min),
            "max": _num(self.max),
            "mean": _num(self.mean),
            "std": _num(self.std),
            "norm": _num(self.norm),
            "zero_fraction": self.zero_fraction,
            "zeros": self.zeros,
            "nan": self.nan,
            "inf": self.inf,
            "flags": list(self.flags),
        }


@dataclass(slots=True)
class Histogram:
    lo: float
    hi: float
    counts: list[int]
    nan: int = 0
    inf: int = 0  # +-inf are outside every bin

    @property
    def edges(self) -> list[float]:
        n = len(self.counts)
        return [self.lo + (self.hi - self.lo) * i / n for i in range(n + 1)]


@dataclass(slots=True)
class Progress:
    """Where a streamed pass is: bytes done / total, elapsed seconds, ETA, current tensor."""

    done: int
    total: int
    elapsed: float
    tensor: str = ""

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    @property
    def eta(self) -> float | None:
        if self.done <= 0 or self.elapsed <= 0:
            return None
        return max(0.0, (self.total - self.done) * self.elapsed / self.done)


ProgressFn = Callable[[Progress], None]


class AuditCancelled(MscopeError):
    """A streamed pass was cancelled through its `cancel` event."""

    def __init__(self) -> None:
        super().__init__("cancelled")


@dataclass
class AuditReport:
    path: Path
    format: str
    kind: str
    findings: list[Finding] = field(default_factory=list)
    stats: dict[str, TensorStats] = field(default_factory=dict)  # qualified name -> stats
    norm_profile: list[dict[str, Any]] = field(default_factory=list)
    loadability: dict[str, Any] = field(default_factory=dict)
    waste: dict[str, Any] = field(default_factory=dict)
    integrity: dict[str, Any] = field(default_factory=dict)
    fail_on: tuple[str, ...] = DEFAULT_FAIL_ON
    stats_requested: bool = False
    stats_info: dict[str, Any] = field(default_factory=dict)  # bytes read, seconds, threads, chunk
    cancelled: bool = False
    tensors: int = 0
    file_bytes: int = 0

    # -- verdict -------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        c = Counter(f.severity for f in self.findings)
        return {ERROR: c[ERROR], WARNING: c[WARNING], INFO: c[INFO]}

    def failed(self) -> dict[str, int]:
        """Fail-on names that matched, with how many findings matched each (notes never fail)."""
        out: Counter[str] = Counter()
        wanted = set(self.fail_on)
        for f in self.findings:
            if f.severity == INFO:
                continue
            if f.category in wanted:
                out[f.category] += 1
            if "error" in wanted and f.severity == ERROR:
                out["error"] += 1
            if "any" in wanted and f.severity in (ERROR, WARNING):
                out["any"] += 1
        return dict(out)

    @property
    def ok(self) -> bool:
        return not self.failed() and not self.cancelled

    @property
    def exit_code(self) -> int:
        """0: passed; 1: a --fail-on category matched (or the audit was cancelled)."""
        return 0 if self.ok else 1

    @property
    def verdict(self) -> str:
        return "pass" if self.ok else ("cancelled" if self.cancelled else "fail")

    def verdict_line(self) -> str:
        counts = self.counts()
        tail = f"{counts[ERROR]} error(s), {counts[WARNING]} warning(s), {counts[INFO]} note(s)"
        scope = "" if self.stats_requested else " (metadata only; --stats reads the values)"
        if self.cancelled:
            return f"CANCELLED: the audit stopped before reading every tensor; {tail}"
        failed = self.failed()
        if failed:
            what = ", ".join(f"{k} ({v})" for k, v in sorted(failed.items()))
            return f"FAIL: {what} [--fail-on {','.join(self.fail_on)}]; {tail}{scope}"
        if counts[ERROR] or counts[WARNING]:
            return f"PASS with findings: {tail}{scope}"
        return f"PASS: no problems found{scope}"

    def findings_for(self, tensor: str) -> list[Finding]:
        return [f for f in self.findings if f.tensor == tensor]

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        from . import __version__

        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "mscope_version": __version__,
            "file": str(self.path),
            "format": self.format,
            "kind": self.kind,
            "tensors": self.tensors,
            "file_tensor_bytes": self.file_bytes,
            "verdict": {
                "status": self.verdict,
                "line": self.verdict_line(),
                "exit_code": self.exit_code,
                "fail_on": list(self.fail_on),
                "failed": self.failed(),
                "counts": self.counts(),
            },
            "findings": [f.to_dict() for f in sorted_findings(self.findings)],
            "integrity": _jsonable(self.integrity),
            "loadability": _jsonable(self.loadability),
            "waste": _jsonable(self.waste),
            "stats": None
            if not self.stats_requested
            else {
                **_jsonable(self.stats_info),
                "tensors": [s.to_dict() for s in self.stats.values()],
                "norm_profile": _jsonable(self.norm_profile),
            },
            "cancelled": self.cancelled,
        }

    def to_json(self) -> str:

        return compact_json(self.to_dict(), allow_nan=False)


def sorted_findings(findings: Iterable[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: SEVERITY_ORDER.get(f.severity, 3))


def _num(x: float | None) -> float | str | None:
    """JSON numbers; non-finite ones as the strings "nan", "inf", "-inf" (strict JSON)."""
    if x is None:
        return None
    if math.isfinite(x):
        return x
    return "nan" if x != x else ("inf" if x > 0 else "-inf")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return _num(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


# ----------------------------------------------------------------------------------------------
# Chunk kernels (compiled, else numpy)
# ----------------------------------------------------------------------------------------------
_np = None


def _numpy():
    global _np
    if _np is None:
        import numpy

        _np = numpy
    return _np


@dataclass(slots=True)
class _Part:
    """Partial statistics of some elements; merged with Chan's formula."""

    n: int = 0  # elements
    finite: int = 0
    nan: int = 0
    inf: int = 0
    zeros: int = 0
    mn: float | None = None
    mx: float | None = None
    mean: float = 0.0  # of the finite values
    m2: float = 0.0  # sum of squared deviations from `mean`
    sumsq: float = 0.0

    def merge(self, o: _Part) -> None:
        if o.n == 0:
            return
        self.n += o.n
        self.nan += o.nan
        self.inf += o.inf
        self.zeros += o.zeros
        if o.mn is not None:
            self.mn = o.mn if self.mn is None else min(self.mn, o.mn)
        if o.mx is not None:
            self.mx = o.mx if self.mx is None else max(self.mx, o.mx)
        if o.finite:
            total = self.finite + o.finite
            delta = o.mean - self.mean
            self.mean += delta * o.finite / total
            self.m2 += o.m2 + delta * delta * self.finite * o.finite / total
            self.finite = total
            self.sumsq += o.sumsq


class _Scratch(threading.local):
    """Per-thread buffers, reused for every chunk (each allocated on first use): float32 values,
    float32 re-centred values, and bytes for the float / integer kernels."""

    def __init__(self) -> None:
        self.cap = 0
        self._values = self._squares = self._tmp = None

    def ensure(self, n: int) -> None:
        if n <= self.cap:
            return
        self.cap = max(n, 1 << 16)
        self._values = self._squares = self._tmp = None

    def _get(self, attr: str, dtype: str, per: int):
        buf = getattr(self, attr)
        if buf is None:
            np = _numpy()
            buf = np.empty(per * self.cap, dtype=dtype)
            setattr(self, attr, buf)
        return buf

    @property
    def values(self):
        return self._get("_values", "float32", 1)

    @property
    def squares(self):
        return self._get("_squares", "float32", 1)

    @property
    def tmp(self):
        return self._get("_tmp", "uint8", 8)


_scratch = _Scratch()

# dtype -> (component numpy dtype name, components per element, kernel)
_LAYOUT: dict[str, tuple[str, int, str]] = {
    "float16": ("int16", 1, "f16"),
    "bfloat16": ("int16", 1, "bf16"),
    "float32": ("float32", 1, "float"),
    "float64": ("float64", 1, "float"),
    "complex64": ("float32", 2, "float"),
    "complex128": ("float64", 2, "float"),
    "complex32": ("int16", 2, "f16"),
    "int8": ("int8", 1, "int"),
    "int16": ("int16", 1, "int"),
    "int32": ("int32", 1, "int"),
    "int64": ("int64", 1, "int"),
    "uint8": ("uint8", 1, "int"),
    "uint16": ("uint16", 1, "int"),
    "uint32": ("uint32", 1, "int"),
    "uint64": ("uint64", 1, "int"),
    "bool": ("uint8", 1, "int"),
    "float8_e4m3fn": ("uint8", 1, "torch"),
    "float8_e5m2": ("uint8", 1, "torch"),
    "float8_e4m3fnuz": ("uint8", 1, "torch"),
    "float8_e5m2fnuz": ("uint8", 1, "torch"),
    "float8_e8m0fnu": ("uint8", 1, "torch"),
}
# 16-bit floats: exponent mask, and how to turn one bit pattern into a Python float.
_HALF_EXP = {"f16": 0x7C00, "bf16": 0x7F80}


def stats_supported(dtype: str) -> bool:
    return dtype in _LAYOUT


_F16_VALUES: list[float] | None = None


def _half_value(bits: int, kernel: str) -> float:
    bits &= 0xFFFF
    if kernel == "f16":
        global _F16_VALUES
        if _F16_VALUES is None:
            np = _numpy()
            _F16_VALUES = (
                np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float64).tolist()
            )
        return _F16_VALUES[bits]
    return struct.unpack("<f", struct.pack("<I", bits << 16))[0]


def _widen_half(c16, kernel: str, out):
    """int16 bit patterns of fp16 / bf16 -> exact float32 in `out` (finite values only for fp16)."""
    np = _numpy()
    w = out.view(np.int32)
    if kernel == "bf16":
        np.left_shift(
            c16.view(np.uint16), 16, out=w.view(np.uint32), casting="unsafe", dtype=np.uint32
        )
        return out
    # fp16: sign-extend, move exponent+mantissa into place, clear the copies of the sign bit the
    # extension left in bits 28..30, then rebias the exponent (x 2^112; exact, subnormals too).
    np.left_shift(c16, 13, out=w, casting="unsafe", dtype=np.int32)
    np.bitwise_and(w, np.int32(-0x70000001), out=w)  # 0x8FFFFFFF
    np.multiply(out, np.float32(2.0**112), out=out)
    return out


def _widen_half_unordered(c16, kernel: str, out):
    """Like `_widen_half` but the values may land in `out` in another order (fine for sums).

    bf16: each int16 pair is read as one int32 word, and a mask and a shift give both values
    with plain int32 loops instead of an int16 -> int32 cast: 1.5x faster. fp16 needs five
    such steps (shift, shift, shift, mask, rebias) and measured no faster than the ordered cast,
    so it takes `_widen_half`; so do an odd count and a buffer that is not 4-byte aligned."""
    np = _numpy()
    n = c16.size
    if kernel != "bf16" or n < 2 or n % 2 or not c16.flags.c_contiguous:
        return _widen_half(c16, kernel, out)
    p = c16.view(np.int32)  # each word holds two values: one in bits 0..15, one in 16..31
    if not p.flags.aligned:
        return _widen_half(c16, kernel, out)
    w = out.view(np.int32)
    h = n // 2
    np.bitwise_and(p, np.int32(-0x10000), out=w[h:])  # the upper value is a float32 already
    np.left_shift(p, 16, out=w[:h])
    return out


_BIG = 2.0**56  # below this, float32 squares summed over a row of 2,048 cannot overflow
_TINY = 2.0**-50  # float32 squares of values below this lose digits (min normal 2^-126)
_ROW = 2048  # sums run over rows of this many values (float32 error ~1e-7), rows added in float64
_ONES: dict[str, Any] = {}


def _sum_sumsq(f) -> tuple[float, float]:
    """(sum, sum of squares) of a float32 / float64 array, float64 results.

    Rows of _ROW values are reduced with np.vecdot (BLAS dot per row, ~10 values/ns) and the row
    results summed in float64; plain BLAS dot over a whole chunk was measured 100x less accurate
    (float32 accumulators over 10^5+ values), numpy's pairwise sum 4x slower."""
    np = _numpy()
    n = f.size
    m = n - n % _ROW
    s = q = 0.0
    vecdot = getattr(np, "vecdot", None)
    if m and vecdot is not None:
        ones = _ONES.get(f.dtype.char)
        if ones is None:
            ones = _ONES[f.dtype.char] = np.ones(_ROW, dtype=f.dtype)
        rows = f[:m].reshape(-1, _ROW)
        s = float(vecdot(rows, ones).sum(dtype=np.float64))
        q = float(vecdot(rows, rows).sum(dtype=np.float64))
    else:
        m = 0
    if m < n:
        tail = f[m:].astype(np.float64)
        s += float(np.add.reduce(tail))
        q += float(np.dot(tail, tail))
    return s, q


def _moments(f, part: _Part, scratch=None) -> None:
    """mean / m2 / sumsq of a finite float32 or float64 array into part (float64 results).
    `scratch`: an array of f's dtype and size to re-centre into, or a function returning one
    (called only when needed; allocated when None).

    Values whose squares underflow float32 (every |value| below 2^-50: bf16 / fp32 subnormals
    and their neighbours) are summed in float64 instead; the caller knows the chunk's min and max
    (`part.mn` / `part.mx`), which decide."""
    np = _numpy()
    n = f.size
    part.finite = n
    if n == 0:
        return
    if f.dtype == np.float32 and part.mn is not None and part.mx is not None:
        am = max(abs(part.mn), abs(part.mx))
        if 0 < am < _TINY:
            f = f.astype(np.float64)
            scratch = None
    s, q = _sum_sumsq(f)
    if not (math.isfinite(s) and math.isfinite(q)):  # float32 squares overflow past 1.8e19
        g = f.astype(np.float64)
        s = float(np.add.reduce(g))
        q = float(np.add.reduce(g * g))
    mean = s / n
    if mean * mean * n > 1e-2 * q and n > 1:
        # The mean dominates: re-centre on it so m2 = q - s^2/n does not cancel away.
        k = f.dtype.type(mean)
        if callable(scratch):
            scratch = scratch()
        if scratch is None or scratch.dtype != f.dtype or scratch.size != n:
            scratch = np.empty_like(f)
        d = np.subtract(f, k, out=scratch)
        ds, dq = _sum_sumsq(d)
        if not (math.isfinite(ds) and math.isfinite(dq)):  # float32 deviations overflowed
            g = f.astype(np.float64) - float(k)
            ds, dq = float(np.add.reduce(g)), float(np.dot(g, g))
        part.mean = float(k) + ds / n
        part.m2 = max(0.0, dq - ds * ds / n)
    else:
        part.mean = mean
        part.m2 = max(0.0, q - s * s / n)
    part.sumsq = q


def _float_zeros(f, tmp) -> int:
    """Elements equal to +-0 of a float array, counted on the bits (count_nonzero on floats is slow)."""
    np = _numpy()
    u = f.view(np.uint32 if f.itemsize == 4 else np.uint64)
    s = tmp[: u.nbytes].view(u.dtype)
    np.left_shift(u, 1, out=s)
    return f.size - int(np.count_nonzero(s))


def _slow_float_part(f) -> _Part:
    """Correct for any float array, NaN and Inf included (used when a chunk has them)."""
    np = _numpy()
    part = _Part(n=f.size)
    nan = np.isnan(f)
    part.nan = int(np.count_nonzero(nan))
    inf = np.isinf(f)
    part.inf = int(np.count_nonzero(inf))
    part.zeros = int(f.size - np.count_nonzero(f))
    if part.nan < f.size:
        # Not np.fmin / np.fmax: a signalling NaN (fp16 0x7C01, a widened bf16 0x7F81...) makes
        # them return NaN or drop the values before it (IEEE minNum), so reduce without NaN.
        seen = f[~nan] if part.nan else f
        part.mn = float(seen.min())
        part.mx = float(seen.max())
    finite = f[~(nan | inf)].astype(np.float64)
    _moments(finite, part)
    return part


_native: Any = False  # statkernel.Kernel once loaded; None when unavailable


def native_kernel():
    """The compiled one-pass kernel (statkernel.c), or None: numpy kernels then."""
    global _native
    if _native is False:
        from . import statkernel

        _native = statkernel.load()
    return _native


def _native_part(chunk, kernel: str) -> _Part | None:
    """_chunk_part through the compiled kernel; None where it does not apply."""
    nk = _native if _native is not False else native_kernel()
    if nk is None or not chunk.size or not chunk.flags.c_contiguous:
        return None
    if kernel == "f16":
        kind = 0
    elif kernel == "bf16":
        kind = 1
    elif kernel == "float" and chunk.dtype.char == "f":
        kind = 2
    else:
        return None
    address = chunk.ctypes.data
    return _native_call(nk, address, chunk.size, kind, address, address + chunk.nbytes)


def _native_call(nk, address: int, count: int, kind: int, lo: int | None = None, hi: int | None = None) -> _Part:
    c = nk.stats(address, count, kind, lo, hi)
    seen = c.n - c.nan
    part = _Part(n=c.n, finite=c.finite, nan=c.nan, inf=c.inf, zeros=c.zeros)
    if seen:
        part.mn, part.mx = c.mn, c.mx
    if c.finite:
        part.mean, part.m2, part.sumsq = c.mean, c.m2, c.sumsq
    return part


def _chunk_part(chunk, kernel: str) -> _Part:
    """Statistics of one contiguous chunk of components (see _LAYOUT), or of an
    (address, count, kind) chunk from a native _Source."""
    if type(chunk) is tuple:
        return _native_call(native_kernel(), *chunk)
    part = _native_part(chunk, kernel)
    if part is not None:
        return part
    return _numpy_chunk_part(chunk, kernel)


def _numpy_chunk_part(chunk, kernel: str) -> _Part:
    np = _numpy()
    if kernel in ("f16", "bf16") and chunk.size:
        sc = _scratch
        sc.ensure(chunk.size)
        return _half_part(chunk, kernel, sc)  # sets np.errstate itself, only where it can matter
    with np.errstate(over="ignore", invalid="ignore"):  # float32 overflow has its fallback
        return _chunk_part_inner(chunk, kernel)


def _half_part(chunk, kernel: str, sc: _Scratch) -> _Part:
    """fp16 / bf16: min, max, zeros and NaN/Inf presence from integer reductions on the bits,
    moments from the values widened to float32."""
    np = _numpy()
    n = chunk.size
    exp = _HALF_EXP[kernel]
    hi = int(chunk.max())
    uhi = int(chunk.view(np.uint16).max())
    if hi >= exp or uhi >= (0x8000 | exp):  # some +-Inf / NaN: exact but slower
        with np.errstate(over="ignore", invalid="ignore"):
            if kernel == "f16":
                return _slow_float_part(chunk.view(np.float16).astype(np.float32))
            return _slow_float_part(_widen_half(chunk, kernel, np.empty(n, np.float32)))
    lo = int(chunk.min())
    part = _Part(n=n)
    zeros = n - int(np.count_nonzero(chunk))
    if lo == -32768:  # -0.0 is 0x8000, the smallest int16
        zeros += int(np.count_nonzero(chunk == -32768))
    part.zeros = zeros
    # Bits as int16 order the positive values; among negatives a larger int16 is a larger
    # magnitude. So max = the largest non-negative, else the negative nearest zero (lo), and
    # min = the largest-magnitude negative (the uint16 maximum), else the smallest positive.
    part.mx = _half_value(hi if hi >= 0 else lo, kernel)
    part.mn = _half_value(uhi if uhi >= 0x8000 else lo, kernel)
    f = _widen_half_unordered(chunk, kernel, sc.values[:n])
    if max(-part.mn, part.mx) < _BIG:  # always for fp16: no float32 flag can rise
        _moments(f, part, lambda: sc.squares[:n])
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # float32 overflow has its fallback
            _moments(f, part, lambda: sc.squares[:n])
    return part


def _chunk_part_inner(chunk, kernel: str) -> _Part:
    np = _numpy()
    n = chunk.size
    if n == 0:
        return _Part()
    sc = _scratch
    sc.ensure(n)
    if kernel in ("f16", "bf16"):
        return _half_part(chunk, kernel, sc)
    if kernel == "float":
        mn = float(chunk.min())
        mx = float(chunk.max())
        if not (math.isfinite(mn) and math.isfinite(mx)):
            return _slow_float_part(chunk)
        part = _Part(n=n, mn=mn, mx=mx)
        part.zeros = _float_zeros(chunk, sc.tmp)
        if chunk.dtype == np.float32:
            _moments(chunk, part, lambda: sc.squares[:n])
        else:
            _moments(chunk, part, lambda: sc.tmp[: 8 * n].view(np.float64))
        return part
    if kernel == "int":
        part = _Part(n=n)
        part.zeros = n - int(np.count_nonzero(chunk))
        part.mn = float(chunk.min())
        part.mx = float(chunk.max())
        f = sc.tmp[: 8 * n].view(np.float64)
        np.copyto(f, chunk, casting="unsafe")
        _moments(f, part)
        return part
    raise ValueError(kernel)


def _torch_floats(chunk, dtype: str):
    """float8 bytes -> float32 numpy (torch knows these formats; numpy does not)."""
    import torch

    from .tensordata import torch_dtype

    t = torch.from_numpy(chunk).view(torch_dtype(dtype)).float()
    return t.numpy()


# ----------------------------------------------------------------------------------------------
# Chunking a tensor
# ----------------------------------------------------------------------------------------------
def _is_dense(record: TensorRecord) -> bool:
    """The view covers exactly numel consecutive elements of its storage, in some order."""
    dims = sorted((st, n) for n, st in zip(record.shape, record.stride) if n != 1)
    expected = 1
    for st, n in dims:
        if st != expected:
            return False
        expected *= n
    return True


def _slabs(shape: tuple[int, ...], chunk: int) -> Iterator[tuple]:
    """Index tuples covering a tensor of `shape` in row-major order, each <= chunk elements."""
    if not shape:
        yield ()
        return
    inner = prod(shape[1:])
    if inner <= chunk:
        step = max(1, chunk // max(inner, 1))
        for s in range(0, shape[0], step):
            yield (slice(s, min(s + step, shape[0])),)
        return
    for i in range(shape[0]):
        for rest in _slabs(shape[1:], chunk):
            yield (i, *rest)


_NATIVE_KIND = {("f16", "int16"): 0, ("bf16", "int16"): 1, ("float", "float32"): 2}


class _Source:
    """A tensor's elements as chunks of numpy components, straight from the mmap.

    With `native` (statistics only) a contiguous fp16 / bf16 / float32 tensor comes as
    (address, count, kind) chunks for the compiled kernel instead, and numpy is not imported."""

    def __init__(
        self,
        data: TensorData,
        record: TensorRecord,
        chunk_bytes: int,
        ordered: bool = False,
        native: bool = False,
    ):
        comp, per, kernel = _LAYOUT[record.dtype]
        self.record = record
        self.ordered = ordered
        self.kernel = kernel
        self.per = per
        s = record.storage
        itemsize = record.itemsize
        self.elements = max(1, chunk_bytes // max(1, itemsize))
        self.numel = record.numel
        self.nbytes = record.nbytes
        contiguous = record.is_contiguous or (not ordered and _is_dense(record))
        self.address = None
        self.native_kind = _NATIVE_KIND.get((kernel, comp)) if native and contiguous else None
        if self.native_kind is not None and (s is None or s.byteorder != "big"):
            if native_kernel() is not None:
                address, length = data.storage_address(record)
                check_view(record, length)  # a compiled loop must never read past it
                start = record.storage_offset * itemsize
                if start < 0 or start + self.nbytes > length:  # dense: numel values from start
                    raise TensorDataError(
                        f"tensor {record.qualified_name!r} does not fit its storage "
                        f"({start + self.nbytes:,} bytes needed, {length:,} stored)"
                    )
                self.bounds = (address, address + length)
                self.address = address + start
                self.comp_size = itemsize // per
                self.flat = self.view = None
                return
        np = _numpy()
        self.comp = np.dtype(comp)
        raw = data.storage_bytes(record)  # TensorDataError if missing / truncated / compressed
        check_view(record, len(raw))  # as_strided below trusts offset, shape and stride
        self.swap = s is not None and s.byteorder == "big" and self.comp.itemsize > 1
        carrier = np.frombuffer(raw, dtype=np.uint8)
        if self.numel == 0:
            self.flat = None
            self.view = None
        elif contiguous:
            start = record.storage_offset * itemsize
            self.flat = carrier[start : start + self.numel * itemsize]
            self.view = None
        else:
            from numpy.lib.stride_tricks import as_strided

            self.flat = None
            base = carrier[record.storage_offset * itemsize :]
            elem = np.dtype((np.void, itemsize))
            self.view = as_strided(
                base.view(elem)
                if base.size % itemsize == 0
                else base[: base.size - base.size % itemsize].view(elem),
                shape=record.shape,
                strides=tuple(st * itemsize for st in record.stride),
                writeable=False,
            )

    def chunks(self) -> Iterator[tuple[int, Any]]:
        """(source bytes, components) for each chunk, in row-major order when `ordered`."""
        if self.numel == 0:
            return
        step = self.elements * self.record.itemsize
        if self.address is not None:
            address, size, kind = self.address, self.comp_size, self.native_kind
            lo, hi = self.bounds
            for start in range(0, self.nbytes, step):
                nbytes = min(step, self.nbytes - start)
                yield nbytes, (address + start, nbytes // size, kind, lo, hi)
            return
        if self.flat is not None:
            for start in range(0, self.flat.size, step):
                raw = self.flat[start : start + step]
                yield raw.size, self._components(raw)
            return
        np = _numpy()
        if not self.ordered:
            for idx in _slabs(self.record.shape, self.elements):
                block = np.ascontiguousarray(self.view[idx]).reshape(-1).view(np.uint8)
                yield block.size, self._components(block)
            return
        # Ordered (diff): the other side may be contiguous and cut in chunks of exactly `step`
        # bytes, and chunks are compared pairwise, so the slabs are regrouped to that size.
        pending: list = []
        size = 0
        for idx in _slabs(self.record.shape, self.elements):
            block = np.ascontiguousarray(self.view[idx]).reshape(-1).view(np.uint8)
            pending.append(block)
            size += block.size
            while size >= step:
                joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
                out, rest = joined[:step], joined[step:]
                yield out.size, self._components(out)
                pending, size = ([rest] if rest.size else []), rest.size
        if pending:
            joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
            yield joined.size, self._components(joined)

    def _components(self, raw):
        c = raw.view(self.comp)
        if self.swap:
            c = c.byteswap()
        if self.kernel == "torch":
            return _torch_floats(c, self.record.dtype)
        return c

    @property
    def chunk_kernel(self) -> str:
        return "float" if self.kernel == "torch" else self.kernel


def _finish(record: TensorRecord, part: _Part, name: str | None = None) -> TensorStats:
    st = TensorStats(
        name=name or record.qualified_name,
        dtype=record.dtype,
        shape=tuple(record.shape),
        numel=record.numel,
        min=part.mn,
        max=part.mx,
        zeros=part.zeros,
        nan=part.nan,
        inf=part.inf,
        finite=part.finite,
        sumsq=part.sumsq,
    )
    if part.finite:
        st.mean = part.mean
        st.std = math.sqrt(part.m2 / part.finite)
    if _LAYOUT.get(record.dtype, ("", 1, ""))[1] == 2:
        st.numel = part.n  # complex: statistics are over the real and imaginary parts
    st.flags = stat_flags(record, st)
    return st


def stat_flags(record: TensorRecord, st: TensorStats) -> list[str]:
    """Flags for one tensor's statistics (codes of CODES)."""
    flags = []
    if st.nan:
        flags.append("nan")
    if st.inf:
        flags.append("inf")
    if st.numel == 0:
        return flags
    if st.zeros == st.numel:
        flags.append("all-zero")
    elif st.min is not None and st.min == st.max and not st.nan and st.numel > 1:
        flags.append("constant")
    floating = record.dtype in FLOATING_DTYPES or record.dtype.startswith("complex")
    if floating:
        am = st.abs_max
        if am is not None and am > EXPLODING_ABS and math.isfinite(am):
            flags.append("exploding")
        if st.zeros != st.numel and st.numel >= 16 and "constant" not in flags:
            if st.zero_fraction >= DEAD_ZERO_FRACTION or (am is not None and am < VANISHED_ABS):
                flags.append("dead")
    return flags


def tensor_stats(
    data: TensorData,
    record: TensorRecord,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    cancel: threading.Event | None = None,
) -> TensorStats:
    """One tensor's statistics in one streamed pass (memory: one chunk).

    Raises TensorDataError when its bytes cannot be read, AuditCancelled when `cancel` is set,
    and MscopeError for a dtype without statistics (see `stats_supported`).
    """
    if record.dtype not in _LAYOUT:
        raise MscopeError(f"no statistics for dtype {record.dtype}")
    src = _Source(data, record, chunk_bytes, native=True)
    total = _Part()
    kernel = src.chunk_kernel
    for _, comps in src.chunks():
        if cancel is not None and cancel.is_set():
            raise AuditCancelled()
        total.merge(_chunk_part(comps, kernel))
    return _finish(record, total)


def tensor_histogram(
    data: TensorData,
    record: TensorRecord,
    bins: int = 40,
    stats: TensorStats | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    cancel: threading.Event | None = None,
) -> Histogram:
    """Counts of the finite values in `bins` equal bins between their min and max (a second pass;
    pass `stats` when you have them, or they are computed first)."""
    np = _numpy()
    if stats is None:
        stats = tensor_stats(data, record, chunk_bytes, cancel)
    lo = stats.min if stats.min is not None and math.isfinite(stats.min) else None
    hi = stats.max if stats.max is not None and math.isfinite(stats.max) else None
    if stats.inf or lo is None or hi is None:  # range of the finite values needs its own pass
        lo, hi = _finite_range(data, record, chunk_bytes, cancel)
    if lo is None:
        return Histogram(0.0, 0.0, [0] * bins, stats.nan, stats.inf)
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0) * 1e-6
    counts = np.zeros(bins, dtype=np.int64)
    src = _Source(data, record, chunk_bytes)
    for _, comps in src.chunks():
        if cancel is not None and cancel.is_set():
            raise AuditCancelled()
        f = _as_float(comps, src.chunk_kernel)
        # float64: numpy refuses bins narrower than the data's own precision ("Too many bins
        # for data range"), e.g. a float32 constant 1.0 whose range is widened by 1e-6 above
        f = f[np.isfinite(f)].astype(np.float64, copy=False)
        counts += np.histogram(f, bins=bins, range=(lo, hi))[0]
    return Histogram(lo, hi, [int(c) for c in counts], stats.nan, stats.inf)


def _finite_range(data, record, chunk_bytes, cancel) -> tuple[float | None, float | None]:
    np = _numpy()
    lo = hi = None
    src = _Source(data, record, chunk_bytes)
    for _, comps in src.chunks():
        if cancel is not None and cancel.is_set():
            raise AuditCancelled()
        f = _as_float(comps, src.chunk_kernel)
        f = f[np.isfinite(f)]
        if f.size:
            a, b = float(f.min()), float(f.max())
            lo = a if lo is None else min(lo, a)
            hi = b if hi is None else max(hi, b)
    return lo, hi


def _as_float(comps, kernel: str):
    """Components as a float array with NaN / Inf intact (float32 where exact, else float64)."""
    np = _numpy()
    if kernel == "f16":
        return comps.view(np.float16).astype(np.float32)
    if kernel == "bf16":
        return _widen_half(comps, "bf16", np.empty(comps.size, np.float32))
    if kernel == "int":
        return comps.astype(np.float64)
    return comps


# ----------------------------------------------------------------------------------------------
# Streaming many tensors: a thread pool over chunks
# ----------------------------------------------------------------------------------------------
_TASK_CHUNKS = 4  # chunks per pool task (see stream_stats)


def _chunk_parts(work: list[tuple[Any, str]]) -> list[_Part]:
    """_chunk_part of each (components, kernel); None components (an empty tensor): no part."""
    return [_Part() if comps is None else _chunk_part(comps, kernel) for comps, kernel in work]


def default_threads() -> int:
    """One per physical core of the usable CPUs (SMT siblings share the SIMD units the kernels
    run on), 1 to 8. Where the topology cannot be read: half the CPUs."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as fh:
                cores.add(fh.read().strip())
        except OSError:
            return max(1, min(8, len(cpus) // 2))
    return max(1, min(8, len(cores)))


def stream_stats(
    data: TensorData,
    records: list[TensorRecord],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    threads: int | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    on_error: Callable[[TensorRecord, MscopeError], None] | None = None,
) -> Iterator[tuple[TensorRecord, TensorStats]]:
    """Statistics of many tensors, yielded in order as each completes.

    Chunks go to a pool of `threads` workers (numpy releases the GIL in its loops) in tasks of a
    few chunks; at most 2 x threads tasks are in flight, each holding views of the mapped file
    (a strided tensor's chunks are copies: one per task), so memory is bounded by the chunk size. A tensor whose bytes
    cannot be read goes to `on_error` and the stream continues. Raises AuditCancelled.
    """
    threads = threads or default_threads()
    total = sum(r.nbytes for r in records)
    state = {"done": 0, "last": 0.0}
    t0 = time.perf_counter()

    def report(name: str, force: bool = False) -> None:
        if progress is None:
            return
        now = time.perf_counter()
        if force or now - state["last"] >= 0.1:
            state["last"] = now
            progress(Progress(state["done"], total, now - t0, name))

    def check_cancel() -> None:
        if cancel is not None and cancel.is_set():
            raise AuditCancelled()

    report("", force=True)
    if threads <= 1:
        for r in records:
            check_cancel()
            try:
                src = _Source(data, r, chunk_bytes, native=True)
                part = _Part()
                kernel = src.chunk_kernel
                for nbytes, comps in src.chunks():
                    check_cancel()
                    part.merge(_chunk_part(comps, kernel))
                    state["done"] += nbytes
                    report(r.qualified_name)
            except TensorDataError as exc:
                if on_error is None:
                    raise
                on_error(r, exc)
                continue
            yield r, _finish(r, part)
        report("", force=True)
        return

    from concurrent.futures import ThreadPoolExecutor

    # Chunks go to the pool in tasks of up to _TASK_CHUNKS chunks (whole small tensors share a
    # task): fewer futures and thread wake-ups. Each task's parts come back one per chunk and are
    # merged here in stream order, so the numbers equal the single-thread ones bit for bit.
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mscope-stats")
    pending: deque = deque()  # (items, future); items: (record, nbytes, last chunk?)
    parts: dict[int, _Part] = {}
    dropped: set[int] = set()  # records whose bytes failed part way: queued chunks are ignored
    limit = 2 * threads
    items: list[tuple[TensorRecord, int, bool]] = []
    work: list[tuple[Any, str]] = []
    task_bytes = 0

    def submit() -> None:
        nonlocal items, work, task_bytes
        if items:
            pending.append((items, pool.submit(_chunk_parts, work)))
            items, work, task_bytes = [], [], 0

    def drain(until: int) -> Iterator[tuple[TensorRecord, TensorStats]]:
        while len(pending) > until:
            done_items, fut = pending.popleft()
            for (r, nbytes, last), part in zip(done_items, fut.result()):
                key = id(r)
                if key in dropped:
                    continue
                parts.setdefault(key, _Part()).merge(part)
                state["done"] += nbytes
                if last:
                    yield r, _finish(r, parts.pop(key))
            report(done_items[-1][0].qualified_name)

    try:
        for r in records:
            check_cancel()
            start = len(items)
            try:
                src = _Source(data, r, chunk_bytes, native=True)
                kernel = src.chunk_kernel
                copies = (src.flat is None and src.address is None) or src.kernel == "torch"  # copied chunks
                for nbytes, comps in src.chunks():
                    items.append((r, nbytes, False))
                    work.append((comps, kernel))
                    task_bytes += nbytes
                    if copies or task_bytes >= _TASK_CHUNKS * chunk_bytes:
                        submit()
                        start = 0
                        check_cancel()
                        if len(pending) >= limit:
                            yield from drain(threads)
            except TensorDataError as exc:
                del items[start:], work[start:]
                task_bytes = sum(n for _, n, _ in items)
                dropped.add(id(r))
                if on_error is None:
                    raise
                on_error(r, exc)
                continue
            items.append((r, 0, True))  # the tensor ends: yield it once everything before is in
            work.append((None, kernel))
            if len(items) >= 256:
                submit()
                if len(pending) >= limit:
                    yield from drain(threads)
        submit()
        yield from drain(0)
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
    report("", force=True)


# ----------------------------------------------------------------------------------------------
# Metadata checks (no tensor bytes)
# ----------------------------------------------------------------------------------------------
_TENSOR_IN_TEXT = re.compile(r"tensor (?P<q>['\"])(?P<name>.*?)(?P=q)")


def _problem_code(text: str) -> str:
    if "is missing" in text:
        return "missing-storage"
    if "needs" in text and "but its storage" in text:
        return "out-of-bounds"
    if "holds" in text and "declares" in text or "truncated" in text or "file ends" in text:
        return "truncated-storage"
    if "inflates to" in text:
        return "truncated-storage"
    return "corrupt"


def unreadable_records(ckpt: Checkpoint) -> set[int]:
    """ids of tensor records whose bytes are not all in the file (metadata only)."""
    bad: set[int] = set(ckpt.over_budget)  # views past the file's budget: never read
    sizes: dict[Any, int] = {}
    for t in ckpt.tensors:
        s = t.storage
        if s is None or t.numel == 0:
            continue
        if s.data_offset is None or s.compressed or s.file is None:
            bad.add(id(t))
            continue
        if s.data_size is not None and s.data_size < s.nbytes:
            bad.add(id(t))
            continue
        size = sizes.get(s.file)  # keyed by the record's own value: no Path() per tensor (5 us)
        if size is None:
            try:
                size = sizes[s.file] = Path(s.file).stat().st_size
            except OSError:
                size = sizes[s.file] = -1
        if s.data_offset + s.nbytes > size:
            bad.add(id(t))
            continue
        last = t.storage_offset + sum((n - 1) * st for n, st in zip(t.shape, t.stride))
        if (last + 1) * t.itemsize > s.nbytes:
            bad.add(id(t))
    return bad


def check_integrity(ckpt: Checkpoint) -> tuple[list[Finding], dict[str, Any]]:
    out: list[Finding] = []
    for p in ckpt.problems:
        m = _TENSOR_IN_TEXT.search(p)
        name = m.group("name") if m else None
        out.append(finding(_problem_code(p), p, name))
    # Bytes past the end of the file that the reader's own bookkeeping did not catch.
    flagged = {f.tensor for f in out}
    sizes: dict[Path, int] = {}
    seen: set[int] = set()
    for t in ckpt.tensors:
        s = t.storage
        if s is None or s.file is None or s.data_offset is None or id(s) in seen:
            continue
        seen.add(id(s))
        path = Path(s.file)
        if path not in sizes:
            try:
                sizes[path] = path.stat().st_size
            except OSError:
                sizes[path] = -1
        end = s.data_offset + (s.nbytes if not s.compressed else (s.data_size or 0))
        if sizes[path] >= 0 and end > sizes[path] and t.qualified_name not in flagged:
            out.append(
                finding(
                    "truncated-storage",
                    f"storage {s.key!r} of tensor {t.qualified_name!r} ends at byte {end:,} but "
                    f"{path.name} has {sizes[path]:,}",
                    t.qualified_name,
                )
            )
    reported: set[int] = set()
    for t in ckpt.tensors:
        s = t.storage
        if s is None or not s.compressed or id(s) in reported:
            continue
        reported.add(id(s))
        out.append(
            finding(
                "compressed-storage",
                f"storage {s.key!r} of tensor {t.qualified_name!r} is deflate-compressed in the zip "
                "(the archive was re-zipped): torch.load reads it, but torch.load(mmap=True) returns "
                "wrong values and mscope cannot read its values; re-save with torch.save",
                t.qualified_name,
            )
        )
    for r in ckpt.refusals:
        out.append(finding("reference-loader-refuses", r))
    for w in ckpt.warnings:
        if "not listed in the index" in w:
            code = "shard-unlisted-tensor"
        elif "total_size" in w:
            code = "shard-total-size"
        else:
            code = "reader-warning"
        out.append(finding(code, w))
    info: dict[str, Any] = {
        "problems": list(ckpt.problems),
        "warnings": list(ckpt.warnings),
        "reference_refuses": list(ckpt.refusals),
    }
    if ckpt.format.startswith("sharded"):
        info["shards"] = ckpt.metadata.get("shards")
        info["total_size"] = ckpt.metadata.get("total_size")
        info["shard_formats"] = ckpt.metadata.get("shard_formats")
    return out, info


CRC_INFLATE_BUDGET = 1 << 30  # what --crc inflates per zip file: max(1 GiB, 64x the file)
CRC_INFLATE_RATIO = 64


def check_crc(
    ckpt: Checkpoint,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    block: int = 16 << 20,
) -> tuple[list[Finding], dict[str, Any]]:
    """CRC-32 of every member of every zip file of the checkpoint against its directory entry."""

    from .readers import is_zip
    from .readers.ziparchive import STORED, ZipArchive

    out: list[Finding] = []
    checked = members = 0
    zips = [p for p in dict.fromkeys(Path(f) for f in (ckpt.files or [ckpt.path])) if is_zip(p)]
    archives = []
    total = 0
    for path in zips:
        try:
            archive = ZipArchive(path)
        except MscopeError as exc:
            out.append(finding("crc-mismatch", f"{path.name}: cannot check CRCs ({exc.message})"))
            continue
        archives.append(archive)
        total += sum(e.compressed_size for e in archive.entries.values())
    by_key: dict[tuple[str, str], str] = {}
    for t in ckpt.tensors:
        if t.storage is not None and t.storage.file is not None:
            by_key.setdefault((str(Path(t.storage.file)), t.storage.key), t.qualified_name)
    done = 0
    t0 = time.perf_counter()
    for archive in archives:
        with archive:
            # Deflated members stream through a bounded buffer; what they may inflate to in
            # all is bounded too, so a 10 MB file of deflated zeros cannot take minutes.
            crc_budget = inflate_left = max(CRC_INFLATE_BUDGET, CRC_INFLATE_RATIO * archive.size)
            for entry in archive.entries.values():
                if cancel is not None and cancel.is_set():
                    raise AuditCancelled()
                members += 1
                key = entry.name.rsplit("/", 1)[-1]
                tensor = by_key.get((str(archive.path), key)) if "/data/" in entry.name else None
                if entry.method != STORED and entry.size > inflate_left:
                    out.append(
                        finding(
                            "reader-warning",
                            f"{archive.path.name}: deflated member {entry.name!r} not CRC-checked: it declares "
                            f"{entry.size:,} bytes, past what --crc inflates per file ({crc_budget:,} bytes)",
                            tensor,
                        )
                    )
                    continue
                try:
                    if entry.method != STORED:
                        inflate_left -= entry.size  # inflate() stops at the declared size
                    good = archive.crc_ok(entry, block)
                except MscopeError as exc:
                    out.append(
                        finding("crc-mismatch", f"{archive.path.name}: {exc.message}", tensor)
                    )
                    continue
                checked += 1
                done += entry.compressed_size
                if progress is not None:
                    progress(Progress(done, total, time.perf_counter() - t0, entry.name))
                if not good:
                    what = f" (storage of {tensor!r})" if tensor else ""
                    out.append(
                        finding(
                            "crc-mismatch",
                            f"{archive.path.name}: member {entry.name!r}{what} fails its CRC-32 check",
                            tensor,
                            member=entry.name,
                        )
                    )
    info = {"crc_checked": checked, "crc_members": members, "crc_files": len(zips)}
    if not zips:
        info["crc_note"] = f"{ckpt.format} files carry no checksums"
    return out, info


def add_safe_globals_line(globals_: Iterable[Any]) -> str | None:
    """`import m; torch.serialization.add_safe_globals([m.Name, ...])` for unsafe, non-dangerous
    globals. Classes from `__main__` are named bare: they come from your own script."""
    names = []
    modules = []
    for g in globals_:
        if g.safety != "unsafe":
            continue
        if g.module in ("__main__", "__mp_main__"):
            names.append(g.name)
            continue
        names.append(f"{g.module}.{g.name}")
        if g.module not in modules:
            modules.append(g.module)
    if not names:
        return None
    imports = f"import {', '.join(['torch', *modules])}; " if modules else "import torch; "
    return f"{imports}torch.serialization.add_safe_globals([{', '.join(names)}])"


def dangerous_findings(dangerous: Iterable[Any]) -> list[Finding]:
    """One `dangerous-global` finding per dangerous global: what it is, why (the pickle calls it,
    tampers with it, or it is known to run code), and the call it would make."""
    out = []
    for g in dangerous:
        calls = f"; would call {g.calls[0]}" if g.calls else ""
        out.append(
            finding(
                "dangerous-global",
                f"DANGEROUS global {g.qualname} ({g.reason}){calls}: never torch.load this file "
                "with weights_only=False",
                module=g.module,
                name=g.name,
                calls=list(g.calls),
                pickle=g.pickle,
            )
        )
    return out


def check_loadability(ckpt: Checkpoint) -> tuple[list[Finding], dict[str, Any]]:
    out: list[Finding] = []
    info: dict[str, Any] = {}
    pickled = ckpt.format in (
        "torch-zip",
        "torch-legacy",
        "pickle",
        "torchscript",
        "sharded-torch",
        "dcp",
    )
    dangerous = [g for g in ckpt.globals if g.safety == "dangerous"]
    unsafe = [g for g in ckpt.globals if g.safety == "unsafe"]
    out.extend(dangerous_findings(dangerous))
    line = add_safe_globals_line(unsafe)
    if unsafe:
        functions = [g.qualname for g in unsafe if not g.name[:1].isupper()]
        fn_note = (
            f"; {', '.join(functions[:3])} {'is a function' if len(functions) == 1 else 'are functions'}: "
            "allowlisting lets the file call it, so only do it for a file you trust"
            if functions
            else ""
        )
        names = ", ".join(g.qualname for g in unsafe[:6]) + (
            f" and {len(unsafe) - 6} more" if len(unsafe) > 6 else ""
        )
        out.append(
            finding(
                "unsafe-global",
                f"torch.load(weights_only=True) rejects {len(unsafe)} global(s): {names}"
                + (
                    "; torch.serialization.add_safe_globals can allow them (the line is printed below)"
                    if line and not dangerous
                    else ""
                )
                + fn_note,
                globals=[g.qualname for g in unsafe],
                add_safe_globals=line,
            )
        )
    if ckpt.format == "torchscript":
        out.append(
            finding(
                "torchscript",
                "TorchScript archive: torch.load hands it to torch.jit.load, which runs the archive's "
                "code; load it only if you trust it",
            )
        )
    elif ckpt.format in ("safetensors", "sharded-safetensors"):
        out.append(
            finding("not-torch-load", "safetensors: no pickle, nothing can run when it loads")
        )
    elif ckpt.format == "dcp":
        out.append(
            finding("not-torch-load", "DCP directory: load with torch.distributed.checkpoint.load")
        )
    elif ckpt.format == "pickle":
        out.append(
            finding(
                "not-torch-load", "a plain pickle, not a torch.save file: torch.load cannot read it"
            )
        )

    by_loc: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for t in ckpt.tensors:
        if t.storage is None or t.alias_of is not None:
            continue
        v = by_loc[t.location]
        v[0] += 1
        v[1] += t.nbytes
    accel = {k: v for k, v in by_loc.items() if not k.startswith("cpu")}
    if accel:
        where = ", ".join(
            f"{k} ({v[0]} tensors, {fmt_bytes(v[1])})" for k, v in sorted(accel.items())
        )
        out.append(
            finding(
                "map-location",
                f"tensors were saved on {where}: on a machine without "
                f"{'that device' if len(accel) == 1 else 'those devices'} load with "
                "torch.load(F, map_location='cpu') (or map them to the GPUs you have)",
                locations={k: {"tensors": v[0], "bytes": v[1]} for k, v in accel.items()},
            )
        )
    nodata = [t for t in ckpt.tensors if t.storage is None and t.alias_of is None]
    if nodata:
        kinds = Counter(t.note or "no storage" for t in nodata)
        out.append(
            finding(
                "no-data",
                f"{len(nodata)} tensor(s) have no stored values ("
                + ", ".join(f"{k}: {v}" for k, v in kinds.most_common(4))
                + f"), e.g. {nodata[0].qualified_name}",
                nodata[0].qualified_name,
                count=len(nodata),
            )
        )
    info.update(
        {
            "pickle": pickled,
            "weights_only": (not unsafe and not dangerous and ckpt.format != "torchscript")
            if pickled
            else None,
            "dangerous_globals": [g.qualname for g in dangerous],
            "unsafe_globals": [g.qualname for g in unsafe],
            "add_safe_globals": line,
            "locations": {k: {"tensors": v[0], "bytes": v[1]} for k, v in sorted(by_loc.items())},
            "map_location": "cpu" if accel else None,
        }
    )
    return out, info


_OPT_MOMENTS = (
    "exp_avg",
    "exp_avg_sq",
    "momentum_buffer",
    "square_avg",
    "max_exp_avg_sq",
    "sum",
    "acc_delta",
)
HALF_DTYPES = ("float16", "bfloat16")


def check_waste(ckpt: Checkpoint) -> tuple[list[Finding], dict[str, Any]]:
    out: list[Finding] = []
    totals = ckpt.totals()
    info: dict[str, Any] = {"file_tensor_bytes": totals.file_bytes}

    # A view saved with its whole base: torch.save writes the entire storage.
    views: dict[int, list[TensorRecord]] = defaultdict(list)
    storages = {}
    for t in ckpt.tensors:
        if t.storage is not None:
            views[id(t.storage)].append(t)
            storages[id(t.storage)] = t.storage
    oversized = []
    for sid, ts in views.items():
        s = storages[sid]
        if s.nbytes == 0:
            continue
        spans = []
        for t in ts:
            if t.numel == 0:
                continue
            last = t.storage_offset + sum((n - 1) * st for n, st in zip(t.shape, t.stride))
            spans.append((t.storage_offset, last + 1))
        used = _union_length(spans) * DTYPE_SIZE(s.dtype)
        wasted = s.nbytes - used
        if wasted >= OVERSIZED_MIN_WASTE and s.nbytes >= OVERSIZED_RATIO * max(used, 1):
            t = max(ts, key=lambda x: x.nbytes)
            ratio = s.nbytes / max(used, 1)
            oversized.append(
                {"tensor": t.qualified_name, "storage_bytes": s.nbytes, "used_bytes": used}
            )
            out.append(
                finding(
                    "oversized-storage",
                    f"{t.qualified_name} {list(t.shape)} uses {fmt_bytes(used)} of a "
                    f"{fmt_bytes(s.nbytes)} storage ({ratio:.0f}x): it was saved with its whole base; "
                    "save tensor.clone() instead",
                    t.qualified_name,
                    storage_bytes=s.nbytes,
                    used_bytes=used,
                )
            )
    info["oversized_storages"] = oversized
    info["oversized_waste_bytes"] = sum(o["storage_bytes"] - o["used_bytes"] for o in oversized)

    # Optimizer state.
    opt_bytes = sum(
        totals.sections.get(name.split(".", 1)[0], {}).get("bytes", 0)
        for name, role in ckpt.sections.items()
        if role == "optimizer"
    )
    info["optimizer_bytes"] = opt_bytes
    info["optimizer_share"] = opt_bytes / totals.file_bytes if totals.file_bytes else 0.0
    if opt_bytes:
        out.append(
            finding(
                "optimizer-state",
                f"optimizer state is {fmt_bytes(opt_bytes)} ({100 * info['optimizer_share']:.0f}% of the "
                f"file's tensor bytes); an inference copy needs only the model ({fmt_bytes(totals.nbytes)})",
                bytes=opt_bytes,
            )
        )

    # fp32 copies next to half-precision weights.
    model = [t for t in ckpt.tensors if t.section == "" and t.alias_of is None]
    half_shapes = Counter(dims_key(t.shape) for t in model if t.dtype in HALF_DTYPES and len(t.shape) >= 1)
    copies = []
    if half_shapes:
        half_bytes = sum(t.nbytes for t in model if t.dtype in HALF_DTYPES)
        model_bytes = sum(t.nbytes for t in model) or 1
        for t in ckpt.tensors:
            if (
                t.dtype != "float32"
                or t.alias_of is not None
                or t.numel < 2
                or dims_key(t.shape) not in half_shapes
            ):
                continue
            leaf = t.name.rsplit(".", 1)[-1]
            if t.section:
                if (
                    ckpt.sections.get(t.section.split(".", 1)[0]) == "optimizer"
                    and leaf in _OPT_MOMENTS
                ):
                    continue
                copies.append(t)
            elif half_bytes >= model_bytes / 2 and len(t.shape) >= 2:
                copies.append(t)
    if copies:
        b = sum(t.nbytes for t in copies)
        info["fp32_copies"] = {
            "tensors": len(copies),
            "bytes": b,
            "examples": [t.qualified_name for t in copies[:5]],
        }
        out.append(
            finding(
                "fp32-copies",
                f"{len(copies)} float32 tensor(s) ({fmt_bytes(b)}) have the shapes of half-precision "
                f"weights (master copies?), e.g. {copies[0].qualified_name}",
                copies[0].qualified_name,
                tensors=len(copies),
                bytes=b,
            )
        )
    else:
        info["fp32_copies"] = {"tensors": 0, "bytes": 0, "examples": []}
    return out, info


def DTYPE_SIZE(dtype: str) -> int:  # noqa: N802 - reads like the table it wraps
    from .checkpoint import DTYPE_ITEMSIZE

    return DTYPE_ITEMSIZE.get(dtype, 1)


def _union_length(spans: list[tuple[int, int]]) -> int:
    total = 0
    end = None
    for a, b in sorted(spans):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


# ----------------------------------------------------------------------------------------------
# Duplicates (reads bytes)
# ----------------------------------------------------------------------------------------------
def _same_bytes(data: TensorData, a: TensorRecord, b: TensorRecord, chunk_bytes: int) -> bool:
    np = _numpy()
    sa, sb = (
        _Source(data, a, chunk_bytes, ordered=True),
        _Source(data, b, chunk_bytes, ordered=True),
    )
    for (_, ca), (_, cb) in zip(sa.chunks(), sb.chunks()):
        if not np.array_equal(ca.view(np.uint8), cb.view(np.uint8)):
            return False
    return True


def _digest(data: TensorData, t: TensorRecord, chunk_bytes: int) -> bytes:
    import hashlib

    np = _numpy()
    h = hashlib.blake2b(digest_size=16)
    for _, c in _Source(data, t, chunk_bytes, ordered=True).chunks():
        h.update(np.ascontiguousarray(c).view(np.uint8).data)
    return h.digest()


def find_duplicates(
    data: TensorData,
    ckpt: Checkpoint,
    stats: Mapping[str, TensorStats] | None = None,
    skip: set[int] | None = None,
    chunk_bytes: int = 4 << 20,
    cancel: threading.Event | None = None,
) -> list[list[TensorRecord]]:
    """Groups of tensors with identical dtype, shape and bytes that do not share a storage.

    Only same-dtype, same-shape candidates are read. With `stats` (from --stats) the statistics
    are the first filter (identical bytes give identical statistics, bit for bit), so usually
    nothing is read again; without, candidates are hashed (BLAKE2b). Constant tensors (zero
    biases, unit norms) are left out: two equal constants are not waste worth tying.
    """
    skip = skip or set()
    groups: dict[tuple, list[TensorRecord]] = defaultdict(list)
    seen_storage: dict[int, TensorRecord] = {}
    for t in ckpt.tensors:
        if (
            t.storage is None
            or t.alias_of is not None
            or id(t) in skip
            or t.nbytes < DUPLICATE_MIN_BYTES
        ):
            continue
        if t.dtype not in _LAYOUT:
            continue
        if (
            id(t.storage) in seen_storage
            and seen_storage[id(t.storage)].storage_offset == t.storage_offset
        ):
            continue  # tied: shares the storage already
        seen_storage.setdefault(id(t.storage), t)
        key: tuple = (t.dtype, dims_key(t.shape))
        if stats is not None:
            st = stats.get(t.qualified_name)
            if st is None or st.min == st.max:
                continue
            key = (*key, st.min, st.max, st.mean, st.std, st.sumsq, st.zeros, st.nan, st.inf)
        groups[key].append(t)
    out = []
    for members in groups.values():
        if len(members) < 2:
            continue
        if cancel is not None and cancel.is_set():
            raise AuditCancelled()
        try:
            if stats is not None:
                first = members[0]
                same = [first] + [
                    m for m in members[1:] if _same_bytes(data, first, m, chunk_bytes)
                ]
                if len(same) > 1:
                    out.append(same)
                continue
            by_digest: dict[bytes, list[TensorRecord]] = defaultdict(list)
            for m in members:
                by_digest[_digest(data, m, chunk_bytes)].append(m)
            for same in by_digest.values():
                if len(same) > 1 and not _is_constant(data, same[0], chunk_bytes):
                    out.append(same)
        except TensorDataError:
            continue
    return out


def _is_constant(data: TensorData, t: TensorRecord, chunk_bytes: int) -> bool:
    np = _numpy()
    first = None
    for _, c in _Source(data, t, chunk_bytes, ordered=True).chunks():
        if first is None:
            first = c[:1].copy()
        if not np.all(c == first[0]):
            return False
    return True


# ----------------------------------------------------------------------------------------------
# Norm profile
# ----------------------------------------------------------------------------------------------
_LAYER = re.compile(r"^(?P<container>.*?)\.(?P<index>\d+)\.(?P<role>.+)$")


def norm_profile(
    stats: Mapping[str, TensorStats], ckpt: Checkpoint
) -> tuple[list[dict[str, Any]], list[Finding]]:
    """Per repeated block (`transformer.h.0`, `layers.11`...) the L2 norm of its floating-point
    parameters, and each parameter compared across the blocks built alike (same names and
    shapes, so a Sequential's conv and BatchNorm are not compared): a norm more than
    OUTLIER_FACTOR from the median of at least 4 such blocks is a `norm-outlier` finding."""
    containers: dict[str, dict[int, dict[str, tuple[float, int, tuple]]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for t in ckpt.tensors:
        if t.section != "" or t.alias_of is not None:
            continue
        st = stats.get(t.qualified_name)
        if st is None or t.dtype not in FLOATING_DTYPES:
            continue
        m = _LAYER.match(t.name)
        if m is None:
            continue
        index = block_index(m.group("index"))
        if index is None:
            continue
        containers[m.group("container")][index][m.group("role")] = (
            st.sumsq,
            st.numel,
            t.shape,
        )
    profile = []
    findings: list[Finding] = []
    for container, layers in containers.items():
        if len(layers) < 2:
            continue
        rows = []
        for index in sorted(layers):
            roles = layers[index]
            rows.append(
                {
                    "index": index,
                    "module": f"{container}.{index}",
                    "norm": math.sqrt(sum(v[0] for v in roles.values())),
                    "numel": sum(v[1] for v in roles.values()),
                }
            )
        groups: dict[frozenset, list[int]] = defaultdict(list)
        for index, roles in layers.items():
            groups[frozenset((r, dims_key(v[2])) for r, v in roles.items())].append(index)
        roles_out: dict[str, list[float]] = {}
        for signature, indices in groups.items():
            for role in sorted(r for r, _ in signature):
                values = [(i, math.sqrt(layers[i][role][0])) for i in sorted(indices)]
                if len(groups) == 1:
                    roles_out[role] = [v for _, v in values]
                if len(values) < 4:
                    continue
                ordered = sorted(v for _, v in values)
                median = ordered[len(ordered) // 2]
                if median <= 0:
                    continue
                for i, v in values:
                    if v > OUTLIER_FACTOR * median or v < median / OUTLIER_FACTOR:
                        name = f"{container}.{i}.{role}"
                        findings.append(
                            finding(
                                "norm-outlier",
                                f"{name}: L2 norm {v:.4g} is far from the median {median:.4g} of {role} "
                                f"over {len(values)} alike layers of {container}",
                                name,
                                norm=v,
                                median=median,
                            )
                        )
        profile.append({"container": container, "layers": rows, "roles": roles_out})
    return profile, findings


def children_norms(
    stats: Mapping[str, TensorStats], ckpt: Checkpoint, module: str
) -> list[dict[str, Any]]:
    """The norm profile of a module's children (explorer: a module's details pane).

    Returns one dict per child module or direct tensor: name, norm (sqrt of summed squares of the
    finite values), numel, and `complete` (every floating tensor under it has statistics).
    """
    node = ckpt.tree
    if module:
        for part in module.split("."):
            node = node.children.get(part)
            if node is None:
                return []
    rows = []
    for child in node.children.values():
        total = 0.0
        numel = 0
        complete = True
        for t in child.all_tensors():
            if t.dtype not in FLOATING_DTYPES or t.alias_of is not None:
                continue
            st = stats.get(t.qualified_name)
            if st is None:
                complete = False
                continue
            total += st.sumsq
            numel += st.numel
        rows.append(
            {"name": child.name, "norm": math.sqrt(total), "numel": numel, "complete": complete}
        )
    for t in node.tensors:
        st = stats.get(t.qualified_name)
        rows.append(
            {
                "name": t.name,
                "norm": st.norm if st else None,
                "numel": t.numel,
                "complete": st is not None,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------
# The audit
# ----------------------------------------------------------------------------------------------
def run_audit(
    ckpt: Checkpoint,
    stats: bool = False,
    dedupe: bool = False,
    crc: bool = False,
    fail_on: Iterable[str] = DEFAULT_FAIL_ON,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    threads: int | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> AuditReport:
    """Every check on an opened checkpoint (open it with `strict=False`).

    Metadata checks always run and read no tensor bytes. `stats` streams every tensor's values
    (and finds duplicates from them); `dedupe` finds duplicates without statistics (hashes
    same-shape candidates); `crc` checks every zip member's CRC-32. When `cancel` is set the
    report comes back early with `cancelled=True` and what was found so far.
    """
    totals = ckpt.totals()
    report = AuditReport(
        ckpt.path,
        ckpt.format,
        ckpt.kind,
        fail_on=tuple(fail_on),
        stats_requested=stats,
        tensors=len(ckpt.tensors),
        file_bytes=totals.file_bytes,
    )
    found, report.integrity = check_integrity(ckpt)
    report.findings += found
    found, report.loadability = check_loadability(ckpt)
    report.findings += found
    found, report.waste = check_waste(ckpt)
    report.findings += found
    bad = unreadable_records(ckpt)
    try:
        if crc:
            found, info = check_crc(ckpt, progress, cancel)
            report.findings += found
            report.integrity.update(info)
        if stats:
            _run_stats(report, ckpt, bad, chunk_bytes, threads, progress, cancel)
        if dedupe or stats:
            from .tensordata import TensorData

            with TensorData() as data:
                groups = find_duplicates(
                    data, ckpt, report.stats if stats else None, bad, cancel=cancel
                )
            _duplicate_findings(report, groups)
    except AuditCancelled:
        report.cancelled = True
    return report


def _duplicate_findings(report: AuditReport, groups: list[list[TensorRecord]]) -> None:
    dupes = []
    for g in groups:
        extra = sum(t.nbytes for t in g[1:])
        names = [t.qualified_name for t in g]
        dupes.append({"tensors": names, "bytes_each": g[0].nbytes, "wasted_bytes": extra})
        others = ", ".join(names[1:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        report.findings.append(
            finding(
                "duplicate-tensor",
                f"{names[0]} is stored {len(g)} times with identical bytes ({others}); "
                f"{fmt_bytes(extra)} could be saved by tying them",
                names[1],
                tensors=names,
                wasted_bytes=extra,
            )
        )
    report.waste["duplicates"] = dupes
    report.waste["duplicate_waste_bytes"] = sum(d["wasted_bytes"] for d in dupes)


def _run_stats(report, ckpt, bad, chunk_bytes, threads, progress, cancel) -> None:
    from .tensordata import TensorData

    records = []
    by_view: dict[tuple, TensorRecord] = {}
    copies: list[tuple[TensorRecord, TensorRecord]] = []
    skipped: list[dict[str, Any]] = []
    no_stats = Counter()
    for t in ckpt.tensors:
        if id(t) in bad or t.storage is None:
            continue
        if t.dtype not in _LAYOUT:
            no_stats[t.dtype] += 1
            skipped.append({"tensor": t.qualified_name, "reason": f"dtype {t.dtype}"})
            continue
        view = (id(t.storage), t.storage_offset, t.shape, t.stride, t.dtype)
        first = by_view.get(view)
        if first is not None:  # the same view of the same storage: same values
            copies.append((t, first))
            continue
        by_view[view] = t
        records.append(t)
    # Read in file order: sequential pages, one pass over each file.
    records.sort(key=lambda t: (str(t.storage.file), t.storage.data_offset or 0, t.storage_offset))
    for dtype, n in no_stats.items():
        report.findings.append(
            finding("no-stats", f"{n} tensor(s) of dtype {dtype}: no statistics")
        )
    threads = threads or default_threads()
    t0 = time.perf_counter()
    errors: list[Finding] = []

    def on_error(r: TensorRecord, exc: MscopeError) -> None:
        errors.append(
            finding("unreadable-tensor", f"{r.qualified_name}: {exc.message}", r.qualified_name)
        )

    done = 0
    try:
        with TensorData() as data:
            for r, st in stream_stats(
                data, records, chunk_bytes, threads, progress, cancel, on_error
            ):
                report.stats[r.qualified_name] = st
                done += r.nbytes
    finally:
        report.findings += errors
        for t, first in copies:
            st = report.stats.get(first.qualified_name)
            if st is not None:
                report.stats[t.qualified_name] = TensorStats(
                    t.qualified_name, st.dtype, st.shape, st.numel, st.min, st.max, st.mean, st.std,
                    st.sumsq, st.zeros, st.nan, st.inf, st.finite, list(st.flags),
                )  # fmt: skip
        seconds = time.perf_counter() - t0
        report.stats_info = {
            "bytes_read": done,
            "seconds": round(seconds, 3),
            "threads": threads,
            "chunk_bytes": chunk_bytes,
            "skipped": skipped,
        }
        _stat_findings(report, ckpt)


def _stat_findings(report: AuditReport, ckpt: Checkpoint) -> None:
    """Findings from the flags. Model tensors get every flag (all-zero / constant 1-D tensors,
    biases and norm weights at init, as notes). Optimizer state: only NaN / Inf (tiny or zero
    moments are normal). Anything else (callbacks, metrics): NaN / Inf as notes, since
    `best_score = inf` is a common sentinel."""
    records = {t.qualified_name: t for t in ckpt.tensors}
    for name, st in report.stats.items():
        t = records.get(name)
        one_d = t is not None and len(t.shape) <= 1
        section = t.section.split(".", 1)[0] if t is not None else ""
        role = "model" if not section else ckpt.sections.get(section, "other")
        if role != "model":
            st.flags = [f for f in st.flags if f in ("nan", "inf")]
        for flag in st.flags:
            if flag == "nan":
                msg = f"{name}: {st.nan:,} NaN value(s) of {st.numel:,}"
            elif flag == "inf":
                msg = f"{name}: {st.inf:,} infinite value(s) of {st.numel:,}"
            elif flag == "all-zero":
                msg = f"{name} {list(st.shape)}: every value is 0"
            elif flag == "constant":
                msg = f"{name} {list(st.shape)}: every value is {st.min:g}"
            elif flag == "exploding":
                msg = f"{name}: |value| up to {st.abs_max:.4g} (> {EXPLODING_ABS:g})"
            elif flag == "dead":
                msg = f"{name}: {100 * st.zero_fraction:.1f}% zeros, max |value| {st.abs_max:.3g}"
            else:
                msg = f"{name}: {flag}"
            severity = None
            if flag in ("all-zero", "constant") and one_d:
                severity = INFO
            elif role not in ("model", "optimizer"):
                severity = INFO
                msg += f" (in {section}, outside the model and optimizer)"
            report.findings.append(finding(flag, msg, name, severity))
    profile, found = norm_profile(report.stats, ckpt)
    report.norm_profile = profile
    report.findings += found


def audit_path(path: str | os.PathLike, **kwargs: Any) -> AuditReport:
    """Open and audit. Files that cannot be opened become a report with an `unreadable-file`
    finding; a sharded set that does not open is checked shard by shard. NotFoundError and
    UnsupportedFormatError still raise (nothing to audit)."""
    from .errors import CorruptCheckpointError, UnsafePickleError, UnsupportedFormatError
    from .readers import open_checkpoint, sniff

    path = Path(path)
    try:
        ckpt = open_checkpoint(path, strict=False)
    except (CorruptCheckpointError, UnsafePickleError, TensorDataError, UnsupportedFormatError) as exc:
        # A payload counts even where the checkpoint does not: pickle.load runs it before it
        # notices the damage (the reader searched the file, see readers.payloads).
        payloads = [g for g in getattr(exc, "pickle_globals", ()) if g.safety == "dangerous"]
        if isinstance(exc, UnsupportedFormatError) and not payloads:
            raise
        kind = None
        try:
            kind = sniff(path)
        except MscopeError:
            pass
        report = AuditReport(
            path,
            kind or "unknown",
            "unknown",
            fail_on=tuple(kwargs.get("fail_on", DEFAULT_FAIL_ON)),
        )
        report.stats_requested = bool(kwargs.get("stats"))
        if kind in ("index-json", "index-dir"):
            report.format = "sharded"
            report.findings += check_shard_set(path)
        if not report.findings:
            report.findings.append(finding("unreadable-file", exc.message, None, hint=exc.hint))
        report.findings += dangerous_findings(payloads)
        if payloads:
            report.loadability["dangerous_globals"] = [g.qualname for g in payloads]
        return report
    return run_audit(ckpt, **kwargs)


def check_shard_set(path: Path) -> list[Finding]:
    """A sharded set that failed to open, checked piece by piece: missing shards, shards that do
    not open, tensors mapped to a shard that lacks them, tensors in two shards."""
    from .readers import open_checkpoint, read_json_limited
    from .readers.sharded import resolve_inside

    if path.is_dir():
        indexes = sorted(path.glob("*.index.json"))
        preferred = [p for p in indexes if p.name.endswith(".safetensors.index.json")]
        path = (preferred or indexes)[0]
    out: list[Finding] = []
    try:
        doc = read_json_limited(path)
        weight_map = doc["weight_map"]  # type: ignore[index]
        wanted: dict[str, list[str]] = defaultdict(list)
        for tensor, shard in weight_map.items():
            wanted[shard].append(tensor)
    except (MscopeError, KeyError, TypeError, AttributeError) as exc:
        return [finding("unreadable-file", f"{path.name}: not a usable shard index ({exc})")]
    where: dict[str, str] = {}
    for shard in sorted(wanted):
        try:
            shard_path = resolve_inside(path.parent, shard, "shard", path)
        except MscopeError as exc:
            out.append(finding("shard-unreadable", exc.message, shard=shard))
            continue
        if not shard_path.is_file():
            out.append(
                finding(
                    "shard-missing",
                    f"shard {shard} listed in {path.name} is missing ({len(wanted[shard])} tensors)",
                    shard=shard,
                    tensors=len(wanted[shard]),
                )
            )
            continue
        try:
            part = open_checkpoint(shard_path, strict=False)
        except MscopeError as exc:
            out.append(finding("shard-unreadable", f"shard {shard}: {exc.message}", shard=shard))
            continue
        names = set()
        for t in part.tensors:
            name = t.name if not t.section else f"{t.section}.{t.name}"
            if part.model_path and not t.section:
                name = f"{part.model_path}.{name}"
            names.add(name)
            if name in where:
                out.append(
                    finding(
                        "shard-duplicate-tensor",
                        f"tensor {name} is in two shards: {where[name]} and {shard}",
                        name,
                    )
                )
            where.setdefault(name, shard)
        lacking = [n for n in wanted[shard] if n not in names]
        if lacking:
            more = f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else ""
            out.append(
                finding(
                    "shard-tensor-missing",
                    f"tensor {lacking[0]} is mapped to shard {shard} but is not in it{more}",
                    lacking[0],
                )
            )
        for p in part.problems:
            m = _TENSOR_IN_TEXT.search(p)
            out.append(
                finding(_problem_code(p), f"shard {shard}: {p}", m.group("name") if m else None)
            )
    return out


# ----------------------------------------------------------------------------------------------
# Text report
# ----------------------------------------------------------------------------------------------
def render_audit(report: AuditReport, console: Any, limit: int = 40, all_stats: bool = False) -> None:
    """The text report: errors and warnings, notes (init-like 1-D tensors counted, not listed),
    the add_safe_globals line, statistics of flagged and largest tensors, the verdict last."""
    from rich.table import Table

    from .textout import safe_markup as escape  # text from files: controls, then markup

    name = report.path.name
    console.print(
        f"[bold]{escape(name)}[/] · {report.format} · {report.tensors:,} tensors · {fmt_bytes(report.file_bytes)}"
    )
    style = {ERROR: "bold red", WARNING: "yellow", INFO: "dim"}
    folded = Counter(
        f.code for f in report.findings if f.severity == INFO and f.code in ("all-zero", "constant")
    )
    findings = [
        f for f in sorted_findings(report.findings) if not (f.severity == INFO and f.code in folded)
    ]
    shown = findings[:limit]
    if shown:
        table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
        table.add_column("", no_wrap=True)
        table.add_column("code", no_wrap=True)
        table.add_column("finding", overflow="fold")
        for f in shown:
            table.add_row(
                f"[{style.get(f.severity, '')}]{f.severity}[/]", f.code, escape(f.message)
            )
        console.print(table)
        if len(findings) > len(shown):
            console.print(
                f"[dim]... {len(findings) - len(shown)} more findings (--json lists all)[/]"
            )
    if folded:
        what = " and ".join(
            f"{n} {'all-zero' if c == 'all-zero' else 'constant'}" for c, n in folded.items()
        )
        console.print(
            f"[dim]notes: {what} 1-D tensor(s) (biases / norm weights as initialised; --json lists them)[/]"
        )
    line = report.loadability.get("add_safe_globals")
    if line and not report.loadability.get("dangerous_globals"):
        console.print("[bold]to load with weights_only=True[/] (only if you trust the file):")
        console.print(f"  {escape(line)}", soft_wrap=True)
    if report.stats_requested and report.stats:
        info = report.stats_info
        console.print(
            f"[bold]statistics[/]: {len(report.stats):,} tensors, {fmt_bytes(info.get('bytes_read', 0))} "
            f"read in {info.get('seconds', 0):.2f} s ({info.get('threads')} thread(s))"
        )
        loud = {f.tensor for f in report.findings if f.severity != INFO and f.tensor}
        flagged = [s for s in report.stats.values() if s.name in loud]
        biggest = [
            s for s in sorted(report.stats.values(), key=lambda s: -s.numel) if s.name not in loud
        ]
        rows = flagged + biggest if all_stats else flagged[:20] + biggest[: max(3, 10 - len(flagged))]
        # Numbers are never cut (at 80 columns they came out as "-0.1…"): their columns take
        # what they need and the tensor name gives way, shortened in the middle.
        heads: tuple[str, ...] = ("min", "max", "mean", "std", "norm", "zeros", "flags")
        cells = [
            [_g(s.min), _g(s.max), _g(s.mean), _g(s.std), _g(s.norm), f"{100 * s.zero_fraction:.1f}%", ",".join(s.flags)]
            for s in rows
        ]  # fmt: skip
        if not any(c[-1] for c in cells):  # no flags: the names get the room
            heads, cells = heads[:-1], [c[:-1] for c in cells]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
        name_width = max(12, min(40, console.width - sum(widths) - 2 * len(heads)))
        table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
        table.add_column("tensor", no_wrap=True, max_width=name_width)
        for head, width in zip(heads, widths):
            table.add_column(head, no_wrap=True, min_width=width, justify="left" if head == "flags" else "right")
        for s, c in zip(rows, cells):
            table.add_row(escape(_fit_name(s.name, name_width)), *c)
        console.print(table)
        if len(rows) < len(report.stats):
            console.print(
                f"[dim]{len(rows):,} of {len(report.stats):,} tensors shown (flagged, then largest);"
                " --all-stats lists all[/]"
            )
        for prof in report.norm_profile[:3]:
            norms = [r["norm"] for r in prof["layers"]]
            console.print(
                f"norm profile of {escape(prof['container'])} ({len(norms)} layers): "
                f"{sparkline(norms, fit=True, floor=True)}  min {min(norms):.4g}, max {max(norms):.4g}"
            )
    color = (
        "green"
        if report.ok and not report.counts()[ERROR]
        else ("red" if not report.ok else "yellow")
    )
    console.print(f"[bold {color}]{escape(report.verdict_line())}[/]")


def _fit_name(name: str, width: int) -> str:
    """A dotted name in `width` columns: module names shortened to their first letter from the
    left, numbers and the last part kept (`m.e.layers.0.self_attn.in_proj_weight` ->
    `m.e.l.0.s.in_proj_weight`), so layer numbers stay visible; then cut in the middle."""
    if len(name) <= width:
        return name
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if len(parts[i]) > 1 and not parts[i].isdigit():
            parts[i] = parts[i][0]
            short = ".".join(parts)
            if len(short) <= width:
                return short
    short = ".".join(parts)
    head = (width - 1) // 2
    return short[:head] + "…" + short[len(short) - (width - 1 - head) :]


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def parse_fail_on(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    unknown = [n for n in names if n not in FAIL_ON_CHOICES]
    if unknown:
        raise MscopeError(
            f"--fail-on: unknown name {unknown[0]!r} (choose from {', '.join(FAIL_ON_CHOICES)})"
        )
    return () if names == ("none",) else names


__all__ = [
    "AuditCancelled",
    "AuditReport",
    "CODES",
    "Finding",
    "Histogram",
    "Progress",
    "TensorStats",
    "audit_path",
    "children_norms",
    "norm_profile",
    "run_audit",
    "stream_stats",
    "tensor_histogram",
    "tensor_stats",
]
