"""A tensor's elements in chunks, straight from the mapped file: memory is bounded by the chunk
size whatever the tensor. `LAYOUT` says how each dtype is read (numpy components and the kernel
that reduces them); `Source` cuts a record into chunks, as numpy arrays, or as raw address ranges
for the compiled kernel when the tensor is contiguous (then numpy is not imported at all).

Every number the file controls (offset, shape, stride) is checked here, where the bytes are used:
numpy's as_strided and the compiled loop trust them, and a wrong one reads outside the mapping.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from ..checkpoint import TensorRecord, prod
from ..errors import TensorDataError
from .data import check_view, is_remote
from .kernels import compiled_kernel, numpy_module

if TYPE_CHECKING:
    from .data import TensorData


class Layout(NamedTuple):
    component: str  # numpy dtype name of one component
    per: int  # components per element (2 for complex)
    kernel: str  # the chunk kernel: f16, bf16, float, int, or torch (float8, widened by torch)


LAYOUT: dict[str, Layout] = {
    "float16": Layout("int16", 1, "f16"),
    "bfloat16": Layout("int16", 1, "bf16"),
    "float32": Layout("float32", 1, "float"),
    "float64": Layout("float64", 1, "float"),
    "complex64": Layout("float32", 2, "float"),
    "complex128": Layout("float64", 2, "float"),
    "complex32": Layout("int16", 2, "f16"),
    "int8": Layout("int8", 1, "int"),
    "int16": Layout("int16", 1, "int"),
    "int32": Layout("int32", 1, "int"),
    "int64": Layout("int64", 1, "int"),
    "uint8": Layout("uint8", 1, "int"),
    "uint16": Layout("uint16", 1, "int"),
    "uint32": Layout("uint32", 1, "int"),
    "uint64": Layout("uint64", 1, "int"),
    "bool": Layout("uint8", 1, "int"),
    "float8_e4m3fn": Layout("uint8", 1, "torch"),
    "float8_e5m2": Layout("uint8", 1, "torch"),
    "float8_e4m3fnuz": Layout("uint8", 1, "torch"),
    "float8_e5m2fnuz": Layout("uint8", 1, "torch"),
    "float8_e8m0fnu": Layout("uint8", 1, "torch"),
}


def stats_supported(dtype: str) -> bool:
    return dtype in LAYOUT


def _torch_floats(chunk, dtype: str):
    """float8 bytes -> float32 numpy (torch knows these formats; numpy does not)."""
    import torch

    from .data import torch_dtype

    t = torch.from_numpy(chunk).view(torch_dtype(dtype)).float()
    return t.numpy()


def is_dense(record: TensorRecord) -> bool:
    """The view covers exactly numel consecutive elements of its storage, in some order."""
    dims = sorted((st, n) for n, st in zip(record.shape, record.stride) if n != 1)
    expected = 1
    for st, n in dims:
        if st != expected:
            return False
        expected *= n
    return True


def slabs(shape: tuple[int, ...], chunk: int) -> Iterator[tuple]:
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
        for rest in slabs(shape[1:], chunk):
            yield (i, *rest)


_NATIVE_KIND = {("f16", "int16"): 0, ("bf16", "int16"): 1, ("float", "float32"): 2}


class Source:
    """A tensor's elements as chunks of numpy components, straight from the mmap.

    With `native` (statistics only) a contiguous fp16 / bf16 / float32 tensor comes as
    (address, count, kind, lo, hi) chunks for the compiled kernel instead, and numpy is not
    imported. With `ordered` the chunks follow row-major order (diff compares them pairwise)."""

    def __init__(
        self,
        data: TensorData,
        record: TensorRecord,
        chunk_bytes: int,
        ordered: bool = False,
        native: bool = False,
    ):
        comp, per, kernel = LAYOUT[record.dtype]
        self.record = record
        self.ordered = ordered
        self.kernel = kernel
        self.per = per
        s = record.storage
        itemsize = record.itemsize
        self.elements = max(1, chunk_bytes // max(1, itemsize))
        self.numel = record.numel
        self.nbytes = record.nbytes
        contiguous = record.is_contiguous or (not ordered and is_dense(record))
        self.address = None
        self.stream: tuple[int, int] | None = None  # (first byte, bytes) fetched by chunk
        self.native_kind = _NATIVE_KIND.get((kernel, comp)) if native and contiguous else None
        if self.native_kind is not None and (s is None or s.byteorder != "big"):
            if compiled_kernel() is not None and not is_remote(record):
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
        np = numpy_module()
        self.comp = np.dtype(comp)
        if contiguous and self.numel and data.streams(record):  # a large remote storage: by chunk
            self.swap = s.byteorder == "big" and self.comp.itemsize > 1
            self.flat = self.view = None
            self.data = data
            self.stream = (record.storage_offset * itemsize, self.nbytes)
            return
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
        if self.stream is not None:
            np = numpy_module()
            start, total = self.stream
            for raw in self.data.stream_bytes(self.record, start, total, step):
                yield len(raw), self._components(np.frombuffer(raw, dtype=np.uint8))
            return
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
        np = numpy_module()
        if not self.ordered:
            for idx in slabs(self.record.shape, self.elements):
                block = np.ascontiguousarray(self.view[idx]).reshape(-1).view(np.uint8)
                yield block.size, self._components(block)
            return
        # Ordered (diff): the other side may be contiguous and cut in chunks of exactly `step`
        # bytes, and chunks are compared pairwise, so the slabs are regrouped to that size.
        pending: list = []
        size = 0
        for idx in slabs(self.record.shape, self.elements):
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

    @property
    def copies(self) -> bool:
        """Its chunks are copies (gathered from a strided view, or float8 widened by torch), not
        views of the mapping: a thread pool must not queue many of them."""
        return (self.flat is None and self.address is None) or self.kernel == "torch"

