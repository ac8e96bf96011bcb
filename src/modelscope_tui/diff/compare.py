"""Two tensors' values compared in lockstep, chunk by chunk (memory: one chunk per side): bit
equality first (cheap, the common case for frozen weights), then tolerance, max |a - b|, and the
sums behind the relative L2 difference and the cosine similarity, in float64.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..checkpoint import TensorRecord
from ..errors import Cancelled
from ..values.chunks import LAYOUT, TensorChunks, chunk_count
from ..values.kernels import as_float, chunk_part, numpy_module
from .report import CHANGED, CLOSE, DTYPE_CHANGED, IDENTICAL, TensorDiff

if TYPE_CHECKING:
    from ..values.data import TensorData


def _to_f64(comps, kernel: str):
    np = numpy_module()
    return as_float(comps, kernel).astype(np.float64, copy=False)


class Sums:
    """What a comparison adds up over the chunks (float64 sums of products, over pairs of
    finite values). `add` takes one chunk's `chunk_sums` at a time, in chunk order, locally and
    from a Dask cluster alike, so both add the same floats in the same order."""

    __slots__ = ("max_abs", "dd", "aa", "bb", "ab", "mismatched", "bitwise")

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.dd = self.aa = self.bb = self.ab = 0.0
        self.mismatched = 0
        self.bitwise = True

    def add(self, chunk: ChunkSums) -> None:
        max_abs, dd, aa, bb, ab, mismatched, bitwise = chunk
        if bitwise:
            self.aa += aa
            self.bb += bb
            self.ab += ab
            return
        self.bitwise = False
        self.mismatched += mismatched
        if max_abs is not None:
            self.max_abs = max(self.max_abs, max_abs)
        self.dd += dd
        self.aa += aa
        self.bb += bb
        self.ab += ab


# One chunk pair's contribution: (max |a - b| or None, dd, aa, bb, ab, mismatched, bitwise).
ChunkSums = tuple[float | None, float, float, float, float, int, bool]


# unpermute=(side, heads): that side ("a" or "b") holds a 2-D weight whose rows llama.cpp
# permuted for its rotary layout (attn_q / attn_k); its chunks hold whole heads and are put
# back in the other side's order before comparing.
Unpermute = tuple[str, int] | None


@dataclass(frozen=True, slots=True)
class Dequant:
    """One side ("a" or "b") of a pair holds FP8 values whose real value is value x the scale of
    its block (DeepSeek-V3's weight_dequant; per tensor and per channel are blocks too): `scale`
    is that side's scale record, [ceil(rows / block[0]), ceil(cols / block[1])]. The product of an
    FP8 value and a float32 scale is exact in float64, so the comparison is too."""

    side: str
    scale: TensorRecord
    block: tuple[int, int]


def fp8_dequant(side: str, weight: TensorRecord, scale: TensorRecord) -> Dequant | None:
    """How to dequantize `weight` (FP8, 2-D) with `scale` exactly, or None when it cannot be
    done cheaply: the scale's shape must tile the weight by whole blocks (ceiling division)."""
    if len(weight.shape) != 2 or LAYOUT.get(scale.dtype) is None or scale.storage is None:
        return None
    if LAYOUT[scale.dtype].per != 1 or scale.dtype.startswith("int") or scale.dtype.startswith("uint"):
        return None
    from ..quant import block_of

    rows, cols = weight.shape
    shape = tuple(scale.shape)
    if not rows or not cols:
        return None
    if scale.numel == 1:  # per tensor
        return Dequant(side, scale, (rows, cols))
    if shape in ((rows,), (rows, 1)):  # per channel (output row)
        return Dequant(side, scale, (1, cols))
    # blocks: the size the scheme names (a scale grid alone cannot tell 128 from 100 when the
    # last block is partial), else what quant.block_of finds
    named = re.search(r"block (\d+)(?:x(\d+))?", weight.quant.scheme) if weight.quant else None
    hint = (int(named[1]), int(named[2] or named[1])) if named else None
    block = block_of((rows, cols), shape, hint) if len(shape) == 2 else None
    if block is None or len(block) != 2 or 0 in block:
        return None
    return Dequant(side, scale, (block[0], block[1]))


def pair_elements(
    a: TensorRecord, b: TensorRecord, chunk_bytes: int, unpermute: Unpermute = None, align: int = 0
) -> int:
    """Elements per chunk pair: the same for both sides, whole heads when rows are unpermuted,
    a multiple of `align` (whole rows, for block scales) when given."""
    elems = max(1, chunk_bytes // max(a.itemsize, b.itemsize))
    group = head_group(a, unpermute) or align
    return max(group, elems // group * group) if group else elems


def head_group(a: TensorRecord, unpermute: Unpermute) -> int:
    """Elements of one head's rows, or 0 when the rows are not unpermuted."""
    if unpermute is None:
        return 0
    heads = unpermute[1]
    rows, cols = a.shape if len(a.shape) == 2 else (0, 0)
    if heads > 0 and rows and rows % heads == 0 and (rows // heads) % 2 == 0:
        return rows // heads * cols
    return 0


def chunk_sources(
    da: TensorData, db: TensorData, a: TensorRecord, b: TensorRecord, chunk_bytes: int,
    unpermute: Unpermute = None, align: int = 0,
) -> tuple[TensorChunks, TensorChunks]:
    """Both tensors cut into the same number of chunks of the same elements (row-major)."""
    elems = pair_elements(a, b, chunk_bytes, unpermute, align)
    return (
        TensorChunks(da, a, elems * a.itemsize, ordered=True),
        TensorChunks(db, b, elems * b.itemsize, ordered=True),
    )


def pair_chunk_count(a: TensorRecord, b: TensorRecord, chunk_bytes: int, unpermute: Unpermute = None) -> int:
    """How many chunk pairs `chunk_sources` yields (metadata only: for a Dask client's split)."""
    return chunk_count(a, pair_elements(a, b, chunk_bytes, unpermute) * a.itemsize, ordered=True)


def row_restorer(a: TensorRecord, unpermute: Unpermute) -> Callable | None:
    """LlamaModel.permute undone on a chunk of whole heads: (heads, half, 2, cols) ->
    (heads, 2, half, cols)."""
    group = head_group(a, unpermute)
    if not group:
        return None
    np = numpy_module()
    rows, cols = a.shape
    half = rows // unpermute[1] // 2

    def restore(c):
        return np.ascontiguousarray(c.reshape(-1, half, 2, cols).swapaxes(1, 2)).reshape(-1)

    return restore


def chunk_sums(ca, cb, ka: str, kb: str, same_dtype: bool, atol: float, rtol: float) -> ChunkSums:
    """One chunk pair's sums: bit equality first (cheap, the common case for frozen weights)."""
    np = numpy_module()
    if same_dtype and np.array_equal(ca.view(np.uint8), cb.view(np.uint8)):
        q = chunk_part(ca, ka).sumsq
        return (None, 0.0, q, q, q, 0, True)
    return float_sums(_to_f64(ca, ka), _to_f64(cb, kb), atol, rtol)


def float_sums(fa, fb, atol: float, rtol: float) -> ChunkSums:
    """chunk_sums of two float64 chunks that are not bit-equal (or not of one dtype)."""
    np = numpy_module()
    close = np.isclose(fa, fb, rtol=rtol, atol=atol, equal_nan=True)  # |a - b| <= atol + rtol*|b|
    mismatched = int(close.size - np.count_nonzero(close))
    finite = np.isfinite(fa) & np.isfinite(fb)
    if not finite.all():
        fa, fb = fa[finite], fb[finite]
    d = fa - fb
    max_abs = float(np.max(np.abs(d))) if d.size else None
    return (max_abs, _dot(d, d), _dot(fa, fa), _dot(fb, fb), _dot(fa, fb), mismatched, False)


DOT_BLOCK = 4096


def _dot(x, y) -> float:
    """x . y in float64, the same on every machine: BLAS splits a long dot product over its
    threads (OpenBLAS above 10,000 elements), so its rounding followed the core count, and a
    Dask worker (BLAS on one thread) disagreed with a local run in the last bits. Blocks of
    DOT_BLOCK stay on one thread; their sums are added exactly (fsum)."""
    np = numpy_module()
    n = x.size
    if n <= DOT_BLOCK:
        return float(np.dot(x, y))
    head = n - n % DOT_BLOCK
    rows_x, rows_y = x[:head].reshape(-1, DOT_BLOCK), y[:head].reshape(-1, DOT_BLOCK)
    vecdot = getattr(np, "vecdot", None)  # numpy 2; einsum's own loop (no BLAS) before
    parts = (vecdot(rows_x, rows_y) if vecdot else np.einsum("ij,ij->i", rows_x, rows_y)).tolist()
    if head < n:
        parts.append(float(np.dot(x[head:], y[head:])))
    return math.fsum(parts)


def range_sums(
    da: TensorData,
    db: TensorData,
    a: TensorRecord,
    b: TensorRecord,
    atol: float,
    rtol: float,
    chunk_bytes: int,
    first: int = 0,
    stop: int | None = None,
    cancel: threading.Event | None = None,
    on_bytes: Callable[[int], None] | None = None,
    unpermute: Unpermute = None,
    dequant: Dequant | None = None,
) -> Iterator[ChunkSums]:
    """`chunk_sums` of chunk pairs first..stop-1 (all by default). Raises TensorDataError when
    bytes cannot be read, Cancelled when `cancel` is set."""
    if dequant is not None:
        yield from _dequant_sums(da, db, a, b, atol, rtol, chunk_bytes, dequant, cancel, on_bytes)
        return
    sa, sb = chunk_sources(da, db, a, b, chunk_bytes, unpermute)
    ka, kb = sa.chunk_kernel, sb.chunk_kernel
    same_dtype = a.dtype == b.dtype
    restore = row_restorer(a, unpermute)
    restore_a = unpermute is not None and unpermute[0] == "a"
    for (na, ca), (nb, cb) in zip(sa.chunks(first, stop), sb.chunks(first, stop)):
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        if on_bytes is not None:
            on_bytes(na + nb)
        if restore is not None:
            if restore_a:
                ca = restore(ca)
            else:
                cb = restore(cb)
        yield chunk_sums(ca, cb, ka, kb, same_dtype, atol, rtol)


def compare_values(
    da: TensorData,
    db: TensorData,
    a: TensorRecord,
    b: TensorRecord,
    atol: float,
    rtol: float,
    chunk_bytes: int,
    cancel: threading.Event | None,
    on_bytes: Callable[[int], None],
    unpermute: Unpermute = None,
    dequant: Dequant | None = None,
) -> Sums:
    """Sums over both tensors' values (same shape; the dtypes may differ). Raises
    TensorDataError when bytes cannot be read, Cancelled when `cancel` is set."""
    acc = Sums()
    for chunk in range_sums(
        da, db, a, b, atol, rtol, chunk_bytes, cancel=cancel, on_bytes=on_bytes,
        unpermute=unpermute, dequant=dequant,
    ):  # fmt: skip
        acc.add(chunk)
    return acc


def _dequant_sums(da, db, a, b, atol, rtol, chunk_bytes, dq: Dequant, cancel, on_bytes) -> Iterator[ChunkSums]:
    """range_sums with one side's FP8 values times their block scales, chunk by chunk in whole
    rows (the scale grid is small: one float per 128x128 block)."""
    np = numpy_module()
    quantized = a if dq.side == "a" else b
    data = da if dq.side == "a" else db
    scale_src = TensorChunks(data, dq.scale, max(1, dq.scale.nbytes), ordered=True)
    parts = [_to_f64(c, scale_src.chunk_kernel) for _, c in scale_src.chunks()]
    rows, cols = quantized.shape
    grid = np.concatenate(parts).reshape(-(-rows // dq.block[0]), -(-cols // dq.block[1]))
    sa, sb = chunk_sources(da, db, a, b, chunk_bytes, align=cols)
    ka, kb = sa.chunk_kernel, sb.chunk_kernel
    row = 0
    for (na, ca), (nb, cb) in zip(sa.chunks(), sb.chunks()):
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        if on_bytes is not None:
            on_bytes(na + nb)
        fa, fb = _to_f64(ca, ka), _to_f64(cb, kb)
        n = fa.size // cols
        # the chunk's rows of the grid, each block's scale repeated over its columns
        scales = np.repeat(grid[np.arange(row, row + n) // dq.block[0]], dq.block[1], axis=1)
        scales = scales[:, :cols].reshape(-1)
        if dq.side == "a":
            fa = fa * scales
        else:
            fb = fb * scales
        row += n
        yield float_sums(fa, fb, atol, rtol)


def fill(d: TensorDiff, acc: Sums, dtype_changed: bool) -> None:
    """The numbers and status of a compared pair from its sums."""
    d.sumsq_diff = acc.dd
    d.sumsq_a = acc.aa
    d.max_abs = acc.max_abs
    d.mismatched = acc.mismatched
    d.rel_l2 = math.sqrt(acc.dd / acc.aa) if acc.aa > 0 else (0.0 if acc.dd == 0 else math.inf)
    d.cosine = acc.ab / math.sqrt(acc.aa * acc.bb) if acc.aa > 0 and acc.bb > 0 else None
    if d.cosine is not None:
        d.cosine = max(-1.0, min(1.0, d.cosine))
    if dtype_changed:
        d.status = DTYPE_CHANGED
    elif acc.bitwise:
        d.status = IDENTICAL
    else:
        d.status = CLOSE if acc.mismatched == 0 else CHANGED

