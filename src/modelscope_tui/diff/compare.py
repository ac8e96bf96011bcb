"""Two tensors' values compared in lockstep, chunk by chunk (memory: one chunk per side): bit
equality first (cheap, the common case for frozen weights), then tolerance, max |a - b|, and the
sums behind the relative L2 difference and the cosine similarity, in float64.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..checkpoint import TensorRecord
from ..errors import Cancelled
from ..values.chunks import Source
from ..values.kernels import as_float, chunk_part, numpy_module
from .report import CHANGED, CLOSE, DTYPE_CHANGED, IDENTICAL, TensorDiff

if TYPE_CHECKING:
    from ..values.data import TensorData


def _to_f64(comps, kernel: str):
    np = numpy_module()
    return as_float(comps, kernel).astype(np.float64, copy=False)


class Sums:
    """What a comparison adds up over the chunks (float64 sums of products, over pairs of
    finite values)."""

    __slots__ = ("max_abs", "dd", "aa", "bb", "ab", "mismatched", "bitwise")

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.dd = self.aa = self.bb = self.ab = 0.0
        self.mismatched = 0
        self.bitwise = True


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
    unpermute: tuple[str, int] | None = None,
) -> Sums:
    """Sums over both tensors' values (same shape; the dtypes may differ). Raises
    TensorDataError when bytes cannot be read, Cancelled when `cancel` is set.

    unpermute=(side, heads): that side ("a" or "b") holds a 2-D weight whose rows llama.cpp
    permuted for its rotary layout; its chunks (whole heads) are put back in the other's order."""
    np = numpy_module()
    elems = max(1, chunk_bytes // max(a.itemsize, b.itemsize))
    restore = None
    if unpermute is not None:
        side, heads = unpermute
        rows, cols = a.shape if len(a.shape) == 2 else (0, 0)
        if heads > 0 and rows and rows % heads == 0 and (rows // heads) % 2 == 0:
            group = rows // heads * cols  # one head's rows: chunks hold whole heads
            elems = max(group, elems // group * group)
            half = rows // heads // 2

            def restore(c):  # (heads, half, 2, cols) -> (heads, 2, half, cols): LlamaModel.permute undone
                return np.ascontiguousarray(c.reshape(-1, half, 2, cols).swapaxes(1, 2)).reshape(-1)

            restore_a = side == "a"
    sa = Source(da, a, elems * a.itemsize, ordered=True)
    sb = Source(db, b, elems * b.itemsize, ordered=True)
    ka, kb = sa.chunk_kernel, sb.chunk_kernel
    same_dtype = a.dtype == b.dtype
    acc = Sums()
    for (na, ca), (nb, cb) in zip(sa.chunks(), sb.chunks()):
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        on_bytes(na + nb)
        if restore is not None:
            if restore_a:
                ca = restore(ca)
            else:
                cb = restore(cb)
        if same_dtype and np.array_equal(ca.view(np.uint8), cb.view(np.uint8)):
            q = chunk_part(ca, ka).sumsq
            acc.aa += q
            acc.bb += q
            acc.ab += q
            continue
        acc.bitwise = False
        fa, fb = _to_f64(ca, ka), _to_f64(cb, kb)
        close = np.isclose(
            fa, fb, rtol=rtol, atol=atol, equal_nan=True
        )  # |a - b| <= atol + rtol*|b|
        acc.mismatched += int(close.size - np.count_nonzero(close))
        finite = np.isfinite(fa) & np.isfinite(fb)
        if not finite.all():
            fa, fb = fa[finite], fb[finite]
        d = fa - fb
        if d.size:
            acc.max_abs = max(acc.max_abs, float(np.max(np.abs(d))))
        acc.dd += float(np.dot(d, d))
        acc.aa += float(np.dot(fa, fa))
        acc.bb += float(np.dot(fb, fb))
        acc.ab += float(np.dot(fa, fb))
    return acc


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

