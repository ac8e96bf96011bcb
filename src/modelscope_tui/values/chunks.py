"""A tensor's elements in chunks, straight from the mapped file: memory is bounded by the chunk
size whatever the tensor. `LAYOUT` says how each dtype is read (numpy components and the kernel
that reduces them); `TensorChunks` cuts a record into chunks, as numpy arrays, or as raw address ranges
for the compiled kernel when the tensor is contiguous (then numpy is not imported at all).

Every number the file controls (offset, shape, stride) is checked here, where the bytes are used:
numpy's as_strided and the compiled loop trust them, and a wrong one reads outside the mapping.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import TYPE_CHECKING, Any, NamedTuple

from ..checkpoint import BLOCK_DTYPES, TensorRecord, prod
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
# GGML block-quantized tensors (GGUF): chunks of whole blocks, dequantized to float32 by gguf-py.
LAYOUT.update({name: Layout("uint8", 1, "ggml") for name in BLOCK_DTYPES})


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


def slab_count(shape: tuple[int, ...], chunk: int) -> int:
    """How many index tuples `slabs(shape, chunk)` yields, without walking them."""
    if not shape:
        return 1
    inner = prod(shape[1:])
    if inner <= chunk:
        step = max(1, chunk // max(inner, 1))
        return -(-shape[0] // step)
    return shape[0] * slab_count(shape[1:], chunk)


def slab_elements(shape: tuple[int, ...], idx: tuple) -> int:
    """Elements in the slab `idx` (one of `slabs(shape, ...)`)."""
    rest = prod(shape[len(idx) :])
    last = idx[-1] if idx else None
    if isinstance(last, slice):
        return (last.stop - last.start) * rest
    return rest


def chunk_count(record: TensorRecord, chunk_bytes: int, ordered: bool = False) -> int:
    """How many chunks `TensorChunks(..., record, chunk_bytes, ordered).chunks()` yields, from the
    metadata alone (no bytes, no mapping): a Dask client splits tensors by chunk index with it,
    so the chunks a worker reads are the ones a local run reads."""
    if record.numel == 0:
        return 0
    elements = max(1, chunk_bytes // max(1, record.itemsize))
    if ordered or record.is_contiguous or is_dense(record):
        return -(-record.numel // elements)  # byte ranges, or strided slabs regrouped to them
    return slab_count(tuple(record.shape), elements)


_NATIVE_KIND = {("f16", "int16"): 0, ("bf16", "int16"): 1, ("float", "float32"): 2}


class TensorChunks:
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
        if kernel == "ggml":
            self._blocks(data, record)
            return
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

    def _blocks(self, data: TensorData, record: TensorRecord) -> None:
        """A GGML block-quantized tensor: its bytes, and gguf-py's dequantizer for its type.
        Chunks hold `elements` values (as other dtypes' chunks do, so a diff pairs them with
        a float tensor's), each dequantized from the whole blocks it touches."""
        s = record.storage
        where = record.qualified_name
        if s is not None and s.byteorder == "big":
            raise TensorDataError(f"tensor {where!r}: big-endian GGML {record.dtype} blocks are not read")
        if record.storage_offset or not record.is_contiguous:
            raise TensorDataError(f"tensor {where!r}: a GGML {record.dtype} tensor must cover its storage from the start")
        self.dequantize = ggml_dequantizer(record.dtype)
        np = numpy_module()
        raw = data.storage_bytes(record)
        check_view(record, len(raw))
        self.flat = np.frombuffer(raw, dtype=np.uint8)[: self.nbytes]
        self.view = self.address = None
        self.swap = False
        self.block = BLOCK_DTYPES[record.dtype]

    def _block_chunks(self, first: int, stop: int | None) -> Iterator[tuple[int, Any]]:
        np = numpy_module()
        per_block, block_bytes = self.block
        end_value = self.numel if stop is None else min(self.numel, stop * self.elements)
        for start in range(first * self.elements, end_value, self.elements):
            end = min(self.numel, start + self.elements)
            b0, b1 = start // per_block, -(-end // per_block)
            with np.errstate(all="ignore"):  # scales from the file may overflow: inf, as torch would
                values = self.dequantize(self.flat[b0 * block_bytes : b1 * block_bytes])
            values = values.reshape(-1)[start - b0 * per_block : end - b0 * per_block]
            # each block's bytes counted once: by the chunk its first value is in
            yield (b1 - -(-start // per_block)) * block_bytes, np.ascontiguousarray(values, dtype=np.float32)

    def chunks(self, first: int = 0, stop: int | None = None) -> Iterator[tuple[int, Any]]:
        """(source bytes, components) for each chunk, in row-major order when `ordered`; only
        chunks first..stop-1 (a Dask task's range: see chunk_count), the ones before `first`
        skipped without reading them."""
        if self.numel == 0:
            return
        if self.kernel == "ggml":
            yield from self._block_chunks(first, stop)
            return
        step = self.elements * self.record.itemsize
        end = self.nbytes if stop is None else min(self.nbytes, stop * step)
        if self.stream is not None:  # a large remote storage, fetched chunk by chunk
            np = numpy_module()
            base, begin = self.stream[0], first * step
            if end > begin:
                for raw in self.data.stream_bytes(self.record, base + begin, end - begin, step):
                    yield len(raw), self._components(np.frombuffer(raw, dtype=np.uint8))
            return
        if self.address is not None:
            address, size, kind = self.address, self.comp_size, self.native_kind
            lo, hi = self.bounds
            for start in range(first * step, end, step):
                nbytes = min(step, self.nbytes - start)
                yield nbytes, (address + start, nbytes // size, kind, lo, hi)
            return
        if self.flat is not None:
            for start in range(first * step, end, step):
                raw = self.flat[start : start + step]
                yield raw.size, self._components(raw)
            return
        np = numpy_module()
        if not self.ordered:
            for idx in islice(slabs(self.record.shape, self.elements), first, stop):
                block = np.ascontiguousarray(self.view[idx]).reshape(-1).view(np.uint8)
                yield block.size, self._components(block)
            return
        # Ordered (diff): the other side may be contiguous and cut in chunks of exactly `step`
        # bytes, and chunks are compared pairwise, so the slabs are regrouped to that size.
        # Slabs wholly before chunk `first` are skipped unread; one that straddles it is cut.
        skip = first * step
        pos = 0  # source bytes of the slabs walked so far
        pending: list = []
        size = 0
        for idx in slabs(self.record.shape, self.elements):
            if pos >= end:
                return
            nbytes = slab_elements(self.record.shape, idx) * self.record.itemsize
            if pos + nbytes <= skip:
                pos += nbytes
                continue
            block = np.ascontiguousarray(self.view[idx]).reshape(-1).view(np.uint8)
            if pos < skip:
                block = block[skip - pos :]
            pos += nbytes
            pending.append(block)
            size += block.size
            while size >= step:
                joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
                out, rest = joined[:step], joined[step:]
                yield out.size, self._components(out)
                skip += step
                if skip >= end:
                    return
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
        return "float" if self.kernel in ("torch", "ggml") else self.kernel

    @property
    def copies(self) -> bool:
        """Its chunks are copies (gathered from a strided view, float8 widened by torch, GGML
        blocks dequantized), not views of the mapping: a thread pool must not queue many of them."""
        return (self.flat is None and self.address is None) or self.kernel in ("torch", "ggml")


def ggml_dequantizer(dtype: str):
    """gguf-py's dequantizer for a GGML block type: raw blocks (uint8) -> float32 values.
    gguf is an optional dependency, imported here on first use."""
    try:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize
    except ImportError:
        raise TensorDataError(
            f"values of GGML {dtype} tensors need the gguf package: pip install 'modelscope-tui[gguf]'"
        ) from None
    qtype = getattr(GGMLQuantizationType, dtype, None)
    if qtype is None:
        raise TensorDataError(f"this gguf package does not know GGML {dtype}; upgrade gguf")

    def run(raw):
        try:
            return dequantize(raw, qtype)
        except NotImplementedError:
            raise TensorDataError(f"gguf-py cannot dequantize GGML {dtype}") from None

    return run

