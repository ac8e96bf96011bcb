"""Tensor bytes on demand: the only module that materialises tensor data, and imports torch.

A record's storage is a byte range of a file (zip member stored uncompressed, safetensors data
region, legacy storage, DCP item). We mmap the file copy-on-write, view the range with
`torch.frombuffer`, and apply the record's shape/stride/offset. Memory is bounded by the tensor:
`copy=False` returns a view of the page cache, `copy=True` only the elements the tensor covers.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint import BLOCK_DTYPES, Checkpoint, TensorRecord, span_bytes
from ..errors import TensorDataError
from ..readers.sources.location import RemotePath

if TYPE_CHECKING:
    import torch

UNLOADABLE_DTYPES = frozenset({"qint8", "quint8", "qint32", "quint4x2", "quint2x4"})


def torch_dtype(name: str) -> torch.dtype:
    import torch

    if name in BLOCK_DTYPES:
        raise TensorDataError(f"GGML {name} is block-quantized: torch has no such dtype (values are read dequantized)")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or name in UNLOADABLE_DTYPES:
        raise TensorDataError(f"dtype {name} cannot be read by this torch ({torch.__version__})")
    return dtype


def check_view(record: TensorRecord, available: int) -> None:
    """Raise TensorDataError unless every element the record's view touches (offset, shape,
    stride) lies in the first `available` bytes of its storage. Called where bytes are used
    (as_strided, the kernels, the chunkers), not only where the file was parsed: numpy's and
    torch's as_strided trust their numbers, and a wrong one reads outside the mapping (SIGSEGV)."""
    shape, stride, offset = record.shape, record.stride, record.storage_offset
    where = record.qualified_name
    if type(offset) is not int or offset < 0 or len(shape) != len(stride):
        raise TensorDataError(f"tensor {where!r} has an invalid storage offset or stride ({offset!r}, {stride!r})")
    last = offset
    for n, st in zip(shape, stride):
        if type(n) is not int or type(st) is not int or n < 0 or st < 0:
            raise TensorDataError(f"tensor {where!r} has an invalid shape or stride ({shape!r}, {stride!r})")
        if n == 0:
            return  # no element is read
        last += (n - 1) * st
    needed = span_bytes(record.dtype, last + 1)
    if needed > available:
        raise TensorDataError(
            f"tensor {where!r} does not fit its storage ({needed:,} bytes needed, {max(available, 0):,} stored)"
        )


def unreadable_records(ckpt: Checkpoint) -> set[int]:
    """ids of tensor records whose bytes are not all in the file (metadata only): the audit and
    the diff never read them (files opened with strict=False keep such records)."""
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
            if isinstance(s.file, RemotePath):
                size = sizes[s.file] = s.file.size if s.file.size is not None else -1
            else:
                try:
                    size = sizes[s.file] = Path(s.file).stat().st_size
                except OSError:
                    size = sizes[s.file] = -1
        if s.data_offset + s.nbytes > size:
            bad.add(id(t))
            continue
        last = t.storage_offset + sum((n - 1) * st for n, st in zip(t.shape, t.stride))
        if span_bytes(t.dtype, last + 1) > s.nbytes:
            bad.add(id(t))
    return bad


def is_remote(record: TensorRecord) -> bool:
    """Whether the record's bytes come over the network (fetched per storage, not mapped)."""
    s = record.storage
    return s is not None and isinstance(s.file, RemotePath)


STREAM_BYTES = 64 << 20  # remote storages larger than this stream by chunk (stream_bytes)
KEEP_FETCHED = 8  # remote storages kept: views sharing a storage fetch it once
PREFETCH_COUNT = 8  # planned remote storages fetched in one concurrent batch
PREFETCH_BYTES = 64 << 20  # ... at most this much (a larger storage comes alone)


def _remote_range(record: TensorRecord, source: Any) -> tuple[int, int]:
    """The range to fetch for a remote storage (its zip local header first, when its offset was
    predicted), checked against the file's size."""
    s = record.storage
    where = record.qualified_name
    available = s.data_size if s.data_size is not None else s.nbytes
    if available < s.nbytes or s.data_offset + s.nbytes > source.size:
        have = max(0, min(available, source.size - s.data_offset))
        raise TensorDataError(f"storage {s.key!r} of tensor {where!r} is truncated ({have:,} of {s.nbytes:,} bytes)", s.file)
    start = s.data_offset if s.header_offset is None else s.header_offset
    if start > s.data_offset:
        raise TensorDataError(f"storage {s.key!r} of tensor {where!r} has an invalid location", s.file)
    return start, s.data_offset + s.nbytes - start


def local_header_ok(blob: bytes, s: Any) -> bool:
    """The zip local header at the start of `blob` puts the member's data where the
    directory-based prediction said (ZipArchive.predicted_offset)."""
    import struct

    if len(blob) < 30 or blob[:4] != b"PK\x03\x04":
        return False
    name_len, extra_len = struct.unpack_from("<2H", blob, 26)
    return s.header_offset + 30 + name_len + extra_len == s.data_offset


def check_local_header(blob: bytes, s: Any, where: str) -> None:
    if not local_header_ok(blob, s):
        raise TensorDataError(
            f"storage {s.key!r} of tensor {where!r} is not where the zip directory puts it (its local header disagrees)",
            s.file,
            "the archive was not written by torch.save; download it and open the local copy",
        )


class TensorData:
    """Opens each file once (mmap) and hands out tensors for records. Use as a context manager."""

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}
        self._bases: dict[int, int] = {}  # id(mapping) -> its address (storage_address)
        # Remote storages: fetched whole (only the tensors asked for), the last few kept: a
        # storage shared by several views, and the buffers whose address a kernel still uses.
        self._fetched: OrderedDict[tuple[str, int, int], bytearray] = OrderedDict()
        self._fetched_bytes = 0
        self._upcoming: dict[tuple[str, int, int], int] = {}  # storage -> position in the plan
        self._order: list[TensorRecord] = []
        self._lock = threading.Lock()

    def plan(self, records: list[TensorRecord]) -> None:
        """The order tensors will be read in: remote storages are then fetched several at a time
        (PREFETCH_COUNT ranges in flight, PREFETCH_BYTES at most), not one round trip each."""
        order, upcoming = [], {}
        for r in records:
            s = r.storage
            if s is None or not isinstance(s.file, RemotePath) or s.data_offset is None:
                continue
            key = (s.file.url, s.data_offset, s.nbytes)
            if key not in upcoming:
                upcoming[key] = len(order)
                order.append(r)
        with self._lock:
            self._order, self._upcoming = order, upcoming

    def __enter__(self) -> TensorData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for buf in self._maps.values():
            try:
                buf.close()
            except BufferError:
                pass  # a copy=False tensor still views it; the mapping goes when that tensor does
        self._maps.clear()
        self._bases.clear()
        self._fetched.clear()
        self._fetched_bytes = 0

    def _map(self, path: Path | str) -> mmap.mmap:
        buf = self._maps.get(path)
        if buf is None:
            try:
                with open(path, "rb") as fh:
                    if os.fstat(fh.fileno()).st_size == 0:
                        raise TensorDataError("file is empty", path)
                    # ACCESS_COPY: writable for torch.frombuffer, never written back to the file.
                    buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            except OSError as exc:
                raise TensorDataError(f"cannot read tensor data: {exc.strerror or exc}", path) from exc
            self._maps[path] = buf
        return buf

    def storage_bytes(self, record: TensorRecord) -> memoryview:
        """The raw bytes of the record's whole storage, checked against the file."""
        buf, start, end = self._locate(record)
        return memoryview(buf)[start:end]

    def storage_address(self, record: TensorRecord) -> tuple[int, int]:
        """(address, length) of the record's storage in the mapping, checked like
        `storage_bytes`: for compiled loops (the statistics kernel) that take no buffer object.
        Valid until this TensorData closes; local files only (is_remote: a fetched buffer lives
        only as long as the arrays that view it, so remote bytes go through storage_bytes)."""
        if is_remote(record):
            raise ValueError("storage_address of a remote storage: use storage_bytes")
        buf, start, end = self._locate(record)
        base = self._bases.get(id(buf))
        if base is None:
            import ctypes

            # ACCESS_COPY maps are writable, which from_buffer needs; the export ends with `view`.
            view = ctypes.c_char.from_buffer(buf)
            base = self._bases[id(buf)] = ctypes.addressof(view)
            del view
        return base + start, end - start

    def _locate(self, record: TensorRecord) -> tuple[mmap.mmap, int, int]:
        s = record.storage
        where = record.qualified_name
        if s is None or s.file is None:
            raise TensorDataError(f"tensor {where!r} has no stored data ({record.note or 'no storage'})")
        if s.data_offset is None:
            raise TensorDataError(f"storage {s.key!r} of tensor {where!r} is missing from the file", s.file)
        if s.compressed:
            raise TensorDataError(f"storage {s.key!r} of tensor {where!r} is compressed; torch stores it raw", s.file)
        offset, size = s.data_offset, s.data_size
        if type(offset) is not int or offset < 0 or (size is not None and (type(size) is not int or size < 0)):
            raise TensorDataError(f"storage {s.key!r} of tensor {where!r} has an invalid location", s.file)
        if isinstance(s.file, RemotePath):
            return self._remote(record, s)
        buf = self._map(s.file)  # no Path() per call: 5 us each, 100k times in a big diff
        end = s.data_offset + s.nbytes
        available = s.data_offset + (s.data_size if s.data_size is not None else s.nbytes)
        if end > min(len(buf), available):
            raise TensorDataError(
                f"storage {s.key!r} of tensor {where!r} is truncated "
                f"({max(0, min(len(buf), available) - s.data_offset):,} of {s.nbytes:,} bytes)",
                s.file,
            )
        return buf, s.data_offset, end

    def _remote(self, record: TensorRecord, s: Any) -> tuple[bytearray, int, int]:
        """A remote storage's bytes, fetched in one range (with its zip local header when the
        offset was predicted, checked here) and kept among the last few."""
        from ..readers.sources import remote_source

        key = (s.file.url, s.data_offset, s.nbytes)
        with self._lock:
            buf = self._fetched.get(key)
            if buf is not None:
                self._fetched.move_to_end(key)
                return buf, 0, len(buf)
            batch = [record]  # and the next planned storages of the same file, fetched together
            at = self._upcoming.get(key)
            if at is not None:
                size = s.nbytes
                for nxt in self._order[at + 1 : at + PREFETCH_COUNT]:
                    n = nxt.storage
                    k = (n.file.url, n.data_offset, n.nbytes)
                    if n.file != s.file or k in self._fetched or size + n.nbytes > PREFETCH_BYTES:
                        break
                    size += n.nbytes
                    batch.append(nxt)
        source = remote_source(s.file)
        ranges = [_remote_range(record, source)]
        for i, r in enumerate(batch[1:], 1):
            try:
                ranges.append(_remote_range(r, source))
            except TensorDataError:  # its own read will say so, naming it
                del batch[i:]
                break
        blobs = source.read_ranges(ranges)
        out = None
        with self._lock:
            for r, (start, _), blob in zip(batch, ranges, blobs):
                n = r.storage
                if n.header_offset is not None:
                    if r is not record and not local_header_ok(blob, n):
                        continue  # its own read will say so, naming it
                    check_local_header(blob, n, r.qualified_name)
                    blob = memoryview(blob)[n.data_offset - start :]
                buf = bytearray(blob)
                k = (n.file.url, n.data_offset, n.nbytes)
                if k not in self._fetched:
                    self._fetched[k] = buf
                    self._fetched_bytes += len(buf)
                out = out if out is not None else buf
            while len(self._fetched) > 1 and (
                len(self._fetched) > max(KEEP_FETCHED, len(batch)) or self._fetched_bytes > PREFETCH_BYTES * 2
            ):
                _, old = self._fetched.popitem(last=False)
                self._fetched_bytes -= len(old)
        return out, 0, len(out)

    def streams(self, record: TensorRecord) -> bool:
        """Whether chunked readers should fetch this storage piece by piece (stream_bytes):
        a remote storage too large to hold whole."""
        s = record.storage
        return is_remote(record) and s.data_offset is not None and not s.compressed and s.nbytes > STREAM_BYTES

    def stream_bytes(self, record: TensorRecord, start: int, length: int, step: int) -> Iterator[bytes]:
        """Bytes start..start+length of a remote record's storage in pieces of `step`, fetched
        PREFETCH_COUNT at a time: memory is bounded by PREFETCH_COUNT x step, not the tensor."""
        from ..readers.sources import remote_source

        s = record.storage
        source = remote_source(s.file)
        first, _ = _remote_range(record, source)  # truncation checked against the whole storage
        check_view(record, s.nbytes)
        if start < 0 or start + length > s.nbytes:
            raise TensorDataError(f"tensor {record.qualified_name!r} does not fit its storage", s.file)
        if s.header_offset is not None:
            (head,) = source.read_ranges([(first, s.data_offset - first)])
            check_local_header(head, s, record.qualified_name)
        step = max(1, step)
        pieces = [(s.data_offset + o, min(step, length - (o - start))) for o in range(start, start + length, step)]
        for i in range(0, len(pieces), PREFETCH_COUNT):
            yield from source.read_ranges(pieces[i : i + PREFETCH_COUNT])

    def tensor(self, record: TensorRecord, copy: bool = True) -> torch.Tensor:
        """The tensor exactly as torch.load would give it (values, dtype, shape, stride)."""
        import torch

        s = record.storage
        dtype = torch_dtype(record.dtype)
        raw = self.storage_bytes(record)
        itemsize = record.itemsize
        count = len(raw) // itemsize
        if record.numel == 0:
            return torch.empty_strided(record.shape, record.stride or (), dtype=dtype)
        if count == 0:  # torch.frombuffer refuses an empty buffer with a ValueError
            raise TensorDataError(f"tensor {record.qualified_name!r} does not fit its storage: it holds no elements")
        flat = torch.frombuffer(raw, dtype=torch.uint8, count=count * itemsize)
        if s is not None and s.byteorder == "big" and itemsize > 1:
            flat = flat.view(-1, itemsize).flip(1).reshape(-1)
        flat = flat.view(dtype)
        check_view(record, count * itemsize)
        try:
            view = flat.as_strided(record.shape, record.stride, record.storage_offset)
        except RuntimeError as exc:
            raise TensorDataError(f"tensor {record.qualified_name!r} does not fit its storage: {exc}") from exc
        if not copy:
            return view
        try:
            return view.clone()
        except RuntimeError as exc:  # a view repeating its bytes (stride 0) can outgrow memory
            raise TensorDataError(
                f"tensor {record.qualified_name!r} ({record.nbytes:,} bytes) cannot be copied into memory"
            ) from exc

    def chunks(self, record: TensorRecord, chunk_bytes: int = 16 << 20) -> Iterator[torch.Tensor]:
        """The tensor's elements, flattened, in pieces of at most `chunk_bytes` (for streaming)."""
        view = self.tensor(record, copy=False)
        if not view.is_contiguous():
            view = view.reshape(-1)  # copies only when the view has gaps; bounded by the tensor
        flat = view.reshape(-1)
        step = max(1, chunk_bytes // max(1, record.itemsize))
        for start in range(0, flat.numel(), step):
            yield flat[start : start + step]


def load_tensor(record: TensorRecord) -> torch.Tensor:
    """One tensor (a copy), reading only its bytes."""
    with TensorData() as data:
        return data.tensor(record, copy=True)
