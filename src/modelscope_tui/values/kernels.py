"""Statistics of one chunk: the compiled one-pass kernel (statkernel.c through statkernel.py), else
numpy. A chunk is a contiguous array of components (see chunks.LAYOUT), or an (address, count,
kind, lo, hi) range that chunks.TensorChunks hands out for the compiled loop; either way the result is
a `Part` that merges with Chan's formula, so chunks and threads combine in any grouping.

Statistics, exactly:
- `min` / `max` over every value that is not NaN (so +-inf show up there); `mean`, `std`
  (population, `torch.std(x, correction=0)`), `norm` (L2) and `sumsq` over the finite values.
- The compiled kernel (statkernel.c, built at install) takes contiguous fp16 / bf16 / float32
  chunks: one pass over memory per chunk, straight from the mapping by address (numpy is not even
  imported), on a thread per core (ctypes releases the GIL). 1.3B fp16 values: 0.25 s on 2
  threads, the time of touching the pages. Its mean is within ~1e-8 of the RMS of float64 truth
  (float32 lanes of <= 64 terms, float64 beyond). Everything else, or every chunk when the
  library is missing, takes the numpy kernels below (same numbers, ~3x slower).
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
- numpy, not torch: importing torch costs seconds, the order of a whole pass over a 1.3B model.
"""

from __future__ import annotations

import math
import struct
import threading
from dataclasses import dataclass
from typing import Any

_np = None


def numpy_module():
    """numpy, imported on first use (~0.1 s): the compiled kernel's path never needs it. A global
    read instead of an import statement per chunk."""
    global _np
    if _np is None:
        import numpy

        _np = numpy
    return _np


@dataclass(slots=True)
class Part:
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

    def merge(self, o: Part) -> None:
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


class Scratch(threading.local):
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
            np = numpy_module()
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


_scratch = Scratch()

# 16-bit floats: exponent mask, and how to turn one bit pattern into a Python float.
HALF_EXP = {"f16": 0x7C00, "bf16": 0x7F80}

_F16_VALUES: list[float] | None = None


def _half_value(bits: int, kernel: str) -> float:
    bits &= 0xFFFF
    if kernel == "f16":
        global _F16_VALUES
        if _F16_VALUES is None:
            np = numpy_module()
            _F16_VALUES = (
                np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float64).tolist()
            )
        return _F16_VALUES[bits]
    return struct.unpack("<f", struct.pack("<I", bits << 16))[0]


def widen_half(c16, kernel: str, out):
    """int16 bit patterns of fp16 / bf16 -> exact float32 in `out` (finite values only for fp16)."""
    np = numpy_module()
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


def widen_half_unordered(c16, kernel: str, out):
    """Like `widen_half` but the values may land in `out` in another order (fine for sums).

    bf16: each int16 pair is read as one int32 word, and a mask and a shift give both values
    with plain int32 loops instead of an int16 -> int32 cast: 1.5x faster. fp16 needs five
    such steps (shift, shift, shift, mask, rebias) and measured no faster than the ordered cast,
    so it takes `widen_half`; so do an odd count and a buffer that is not 4-byte aligned."""
    np = numpy_module()
    n = c16.size
    if kernel != "bf16" or n < 2 or n % 2 or not c16.flags.c_contiguous:
        return widen_half(c16, kernel, out)
    p = c16.view(np.int32)  # each word holds two values: one in bits 0..15, one in 16..31
    if not p.flags.aligned:
        return widen_half(c16, kernel, out)
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
    np = numpy_module()
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


def moments(f, part: Part, scratch=None) -> None:
    """mean / m2 / sumsq of a finite float32 or float64 array into part (float64 results).
    `scratch`: an array of f's dtype and size to re-centre into, or a function returning one
    (called only when needed; allocated when None).

    Values whose squares underflow float32 (every |value| below 2^-50: bf16 / fp32 subnormals
    and their neighbours) are summed in float64 instead; the caller knows the chunk's min and max
    (`part.mn` / `part.mx`), which decide."""
    np = numpy_module()
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
    np = numpy_module()
    u = f.view(np.uint32 if f.itemsize == 4 else np.uint64)
    s = tmp[: u.nbytes].view(u.dtype)
    np.left_shift(u, 1, out=s)
    return f.size - int(np.count_nonzero(s))


def _slow_float_part(f) -> Part:
    """Correct for any float array, NaN and Inf included (used when a chunk has them)."""
    np = numpy_module()
    part = Part(n=f.size)
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
    moments(finite, part)
    return part


# The compiled kernel in use: a statkernel.Kernel, None when unavailable (numpy then), False until
# first use. Tests set it to pick a backend.
compiled: Any = False


def compiled_kernel():
    """The compiled one-pass kernel (statkernel.c), or None: numpy kernels then."""
    global compiled
    if compiled is False:
        from . import statkernel

        compiled = statkernel.load()
    return compiled


def _native_part(chunk, kernel: str) -> Part | None:
    """chunk_part through the compiled kernel; None where it does not apply."""
    nk = compiled if compiled is not False else compiled_kernel()
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


def _native_call(nk, address: int, count: int, kind: int, lo: int | None = None, hi: int | None = None) -> Part:
    c = nk.stats(address, count, kind, lo, hi)
    seen = c.n - c.nan
    part = Part(n=c.n, finite=c.finite, nan=c.nan, inf=c.inf, zeros=c.zeros)
    if seen:
        part.mn, part.mx = c.mn, c.mx
    if c.finite:
        part.mean, part.m2, part.sumsq = c.mean, c.m2, c.sumsq
    return part


def chunk_part(chunk, kernel: str) -> Part:
    """Statistics of one contiguous chunk of components (see chunks.LAYOUT), or of an
    (address, count, kind, lo, hi) chunk from a chunks.TensorChunks made for the compiled kernel."""
    if type(chunk) is tuple:
        return _native_call(compiled_kernel(), *chunk)
    part = _native_part(chunk, kernel)
    if part is not None:
        return part
    return numpy_chunk_part(chunk, kernel)


def numpy_chunk_part(chunk, kernel: str) -> Part:
    """chunk_part by the numpy kernels alone (the fallback; bench/fused_pass_probe.py times it)."""
    np = numpy_module()
    if kernel in ("f16", "bf16") and chunk.size:
        sc = _scratch
        sc.ensure(chunk.size)
        return _half_part(chunk, kernel, sc)  # sets np.errstate itself, only where it can matter
    with np.errstate(over="ignore", invalid="ignore"):  # float32 overflow has its fallback
        return _chunk_part_inner(chunk, kernel)


def _half_part(chunk, kernel: str, sc: Scratch) -> Part:
    """fp16 / bf16: min, max, zeros and NaN/Inf presence from integer reductions on the bits,
    moments from the values widened to float32."""
    np = numpy_module()
    n = chunk.size
    exp = HALF_EXP[kernel]
    hi = int(chunk.max())
    uhi = int(chunk.view(np.uint16).max())
    if hi >= exp or uhi >= (0x8000 | exp):  # some +-Inf / NaN: exact but slower
        with np.errstate(over="ignore", invalid="ignore"):
            if kernel == "f16":
                return _slow_float_part(chunk.view(np.float16).astype(np.float32))
            return _slow_float_part(widen_half(chunk, kernel, np.empty(n, np.float32)))
    lo = int(chunk.min())
    part = Part(n=n)
    zeros = n - int(np.count_nonzero(chunk))
    if lo == -32768:  # -0.0 is 0x8000, the smallest int16
        zeros += int(np.count_nonzero(chunk == -32768))
    part.zeros = zeros
    # Bits as int16 order the positive values; among negatives a larger int16 is a larger
    # magnitude. So max = the largest non-negative, else the negative nearest zero (lo), and
    # min = the largest-magnitude negative (the uint16 maximum), else the smallest positive.
    part.mx = _half_value(hi if hi >= 0 else lo, kernel)
    part.mn = _half_value(uhi if uhi >= 0x8000 else lo, kernel)
    f = widen_half_unordered(chunk, kernel, sc.values[:n])
    if max(-part.mn, part.mx) < _BIG:  # always for fp16: no float32 flag can rise
        moments(f, part, lambda: sc.squares[:n])
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # float32 overflow has its fallback
            moments(f, part, lambda: sc.squares[:n])
    return part


def _chunk_part_inner(chunk, kernel: str) -> Part:
    np = numpy_module()
    n = chunk.size
    if n == 0:
        return Part()
    sc = _scratch
    sc.ensure(n)
    if kernel in ("f16", "bf16"):
        return _half_part(chunk, kernel, sc)
    if kernel == "float":
        mn = float(chunk.min())
        mx = float(chunk.max())
        if not (math.isfinite(mn) and math.isfinite(mx)):
            return _slow_float_part(chunk)
        part = Part(n=n, mn=mn, mx=mx)
        part.zeros = _float_zeros(chunk, sc.tmp)
        if chunk.dtype == np.float32:
            moments(chunk, part, lambda: sc.squares[:n])
        else:
            moments(chunk, part, lambda: sc.tmp[: 8 * n].view(np.float64))
        return part
    if kernel == "int":
        part = Part(n=n)
        part.zeros = n - int(np.count_nonzero(chunk))
        part.mn = float(chunk.min())
        part.mx = float(chunk.max())
        f = sc.tmp[: 8 * n].view(np.float64)
        np.copyto(f, chunk, casting="unsafe")
        moments(f, part)
        return part
    raise ValueError(kernel)

def as_float(comps, kernel: str):
    """Components as a float array with NaN / Inf intact (float32 where exact, else float64)."""
    np = numpy_module()
    if kernel == "f16":
        return comps.view(np.float16).astype(np.float32)
    if kernel == "bf16":
        return widen_half(comps, "bf16", np.empty(comps.size, np.float32))
    if kernel == "int":
        return comps.astype(np.float64)
    return comps
