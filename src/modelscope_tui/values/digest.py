"""Tensors compared by their bytes, streamed chunk by chunk (memory: one chunk per side): the
audit's duplicate search and the diff's rename detection use these."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..checkpoint import TensorRecord
from .chunks import TensorChunks
from .kernels import numpy_module

if TYPE_CHECKING:
    from .data import TensorData


def same_bytes(data: TensorData, a: TensorRecord, b: TensorRecord, chunk_bytes: int) -> bool:
    """Both tensors hold the same elements, byte for byte, in row-major order (same dtype and
    shape assumed); stops at the first chunk that differs."""
    np = numpy_module()
    sa, sb = (
        TensorChunks(data, a, chunk_bytes, ordered=True),
        TensorChunks(data, b, chunk_bytes, ordered=True),
    )
    for (_, ca), (_, cb) in zip(sa.chunks(), sb.chunks()):
        if not np.array_equal(ca.view(np.uint8), cb.view(np.uint8)):
            return False
    return True


def digest(data: TensorData, t: TensorRecord, chunk_bytes: int) -> bytes:
    """BLAKE2b (16 bytes) of the tensor's elements in row-major order: equal for equal values
    whatever the strides or the storage they sit in."""
    import hashlib

    np = numpy_module()
    h = hashlib.blake2b(digest_size=16)
    for _, c in TensorChunks(data, t, chunk_bytes, ordered=True).chunks():
        h.update(np.ascontiguousarray(c).view(np.uint8).data)
    return h.digest()


def is_constant(data: TensorData, t: TensorRecord, chunk_bytes: int) -> bool:
    """Every element equals the first (a zero bias, a unit norm weight)."""
    np = numpy_module()
    first = None
    for _, c in TensorChunks(data, t, chunk_bytes, ordered=True).chunks():
        if first is None:
            first = c[:1].copy()
        if not np.all(c == first[0]):
            return False
    return True
