"""torch.distributed.checkpoint (DCP) directories: a pickled `.metadata` plus `*.distcp` files.

How torch 2.13's FileSystemWriter lays the bytes out (filesystem.py `_write_item`): every write
item (a whole tensor, one chunk of a sharded tensor, or a non-tensor value) is appended to a
`.distcp` file as its own complete `torch.save` zip archive; `.metadata` maps
`MetadataIndex(fqn, chunk offsets)` to `_StorageInfo(relative_path, offset, length)`, the byte
range of that archive. Tensor bytes therefore sit in the nested archive's `data/<key>` member, and
the nested `data.pkl` gives the storage, offset and stride. With
`serialization_format=SAFETENSORS` the tensors of a file are instead one safetensors blob at the
end of it, and every tensor item points at the start of that blob.

`.metadata` is read with our restricted unpickler (torch itself runs plain `pickle.load` on it);
torch's DCP dataclasses arrive as inert records and are read field by field, never imported.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import DTYPE_ITEMSIZE, Checkpoint, Format, GlobalRef, StorageRecord
from ..errors import CorruptCheckpointError, MscopeError
from .pickle.unpickler import MAX_DIM, MAX_DIMS, DType, Inert, StorageType, TensorRef, safe_load
from .safetensors import Header, contiguous_stride, read_header, short
from .sharded import merge_global, resolve_inside
from .walk import MAX_DEPTH, Walker

METADATA_NAME = ".metadata"
MAX_METADATA_BYTES = 1 << 31
MAX_ITEM_PICKLE = 16 << 20
MAX_ITEM_MEMBERS = 4096
SCHEMA_PREFIX = "torch.distributed.checkpoint."
_PATH_CLASSES = {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}

_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s6H3L5H2L")
_LOCAL = struct.Struct("<4s5H3L2H")
_TAG = struct.Struct("<2H")
_U64 = struct.Struct("<Q")
FETCH_CONCURRENCY = 16  # remote .distcp files opened and read at once
PREFETCH_SPAN = 4096  # fetched at each end of a remote item: local headers + data.pkl; end records


def _unpack(fmt: struct.Struct, buf: Any, pos: int) -> tuple:
    """fmt at buf[pos:]: a slice, so an mmap and a remote RemoteMap read the same way."""
    if isinstance(buf, mmap.mmap):
        return fmt.unpack_from(buf, pos)
    return fmt.unpack(buf[pos : pos + fmt.size])


def dcp_schema(module: str, name: str) -> bool:
    """Classes DCP's `.metadata` is expected to name: its own dataclasses, and the pathlib class
    `StorageMeta.checkpoint_id` is often pickled as."""
    if module.startswith(SCHEMA_PREFIX):
        return True
    return module in ("pathlib", "pathlib._local") and name in _PATH_CLASSES


class SerializedValue:
    """A non-tensor item we did not unpickle (too big, transformed, or not a torch.save archive)."""

    __slots__ = ("length", "why")

    def __init__(self, length: int, why: str):
        self.length = length
        self.why = why

    def __repr__(self) -> str:
        return f"<{self.length:,} serialized bytes; {self.why}>"


class _ItemError(Exception):
    """An item's bytes cannot be understood; becomes a problem line, not an exception."""


@dataclass(slots=True)
class _Item:
    rel: str
    path: Path
    offset: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclass
class _Located:
    """Where a chunk's bytes are: the nested tensor's storage and view."""

    storage: StorageRecord
    storage_offset: int
    stride: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: str | None


class RemoteMap:
    """The slice of mmap's API the item parsing uses (`buf[a:b]`, `len`, `rfind`) over a remote
    Source: each slice is a ranged read, kept in the source's block cache."""

    def __init__(self, source: Any):
        self.source = source

    def __len__(self) -> int:
        return self.source.size

    def __getitem__(self, key: slice) -> bytes:
        start, stop, _ = key.indices(self.source.size)
        return self.source.read(start, stop - start) if stop > start else b""

    def rfind(self, sub: bytes, start: int, end: int) -> int:
        """The last `sub` in [start, end): the prefetched tail first (an end record without a
        comment sits in the last 22 bytes), the whole window only when it is not there."""
        near = max(start, end - PREFETCH_SPAN)
        i = self[near:end].rfind(sub)
        if i >= 0 or near == start:
            return near + i if i >= 0 else -1
        i = self[start : near + len(sub) - 1].rfind(sub)
        return start + i if i >= 0 else -1

    def close(self) -> None:
        pass


@dataclass
class _Files:
    """Open `.distcp` files (mmap'ed once each) inside the checkpoint directory; for a remote
    checkpoint `opener(url)` gives each file's byte source instead (listing entries reused)."""

    directory: Any  # Path, or a RemotePath folder
    meta_path: Any
    opener: Any = None  # remote only: RemotePath -> Source
    maps: dict[str, tuple[Any, Any, int]] = field(default_factory=dict)
    headers: dict[tuple[str, int], Header] = field(default_factory=dict)
    _urls: dict[str, Any] = field(default_factory=dict)

    def location(self, rel: Any, fqn: str) -> Any:
        """Where item file `rel` is; a name that reaches outside the directory is refused."""
        hit = self._urls.get(rel)
        if hit is not None:
            return hit
        if self.opener is None:
            resolve_inside(self.directory, rel, f"{short(fqn)} is stored in", self.meta_path)
            hit = self.directory / rel
        else:
            from .remote import shard_url

            hit = shard_url(self.directory, rel, self.meta_path)
        self._urls[rel] = hit
        return hit

    def open(self, rel: Any, fqn: str) -> tuple[Any, Any, int]:
        hit = self.maps.get(rel) if isinstance(rel, str) else None
        if hit is not None:
            return hit
        if self.opener is not None:
            return self._open_remote(rel, fqn)
        path = resolve_inside(self.directory, rel, f"{short(fqn)} is stored in", self.meta_path)
        if not path.is_file():
            raise CorruptCheckpointError(
                f"file {short(rel)} holding {short(fqn)} is missing from the checkpoint directory",
                self.meta_path,
            )
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self.maps[rel] = (path, mm, size)
        return self.maps[rel]

    def _open_remote(self, rel: str, fqn: str) -> tuple[Any, Any, int]:
        from ..errors import NotFoundError
        from .sources import remember

        url = self.location(rel, fqn)
        try:
            source = self.opener(url)
        except NotFoundError:
            raise CorruptCheckpointError(
                f"file {short(rel)} holding {short(fqn)} is missing from the checkpoint folder",
                self.meta_path,
            ) from None
        url.size, url.etag = source.size, source.etag
        remember(url.url, source)  # values read through the source the records came from
        self.maps[rel] = (url, RemoteMap(source) if source.size else None, source.size)
        return self.maps[rel]

    def prefetch(self, items: Any) -> None:
        """Remote only: open every `.distcp` file, then fetch the first and last PREFETCH_SPAN
        bytes of each item (its local headers and data.pkl; its central directory and end
        records), all files at once, neighbouring ranges merged, so the in-order parse that
        follows reads from the sources' block caches. Tensor data in between is not fetched."""
        from concurrent.futures import ThreadPoolExecutor

        from .sources import CachedRemote

        wanted: dict[str, list[tuple[int, int]]] = {}
        for item in items:
            if not item.transforms and isinstance(item.rel, str):
                n = min(item.length, PREFETCH_SPAN)
                spans = wanted.setdefault(item.rel, [])
                spans += [(item.offset, n), (item.offset + item.length - n, n)]

        def fetch(rel: str) -> None:
            try:
                _, buf, size = self.open(rel, rel)
                if isinstance(buf, RemoteMap) and isinstance(buf.source, CachedRemote):
                    buf.source.prefetch([(o, n) for o, n in wanted[rel] if o + n <= size])
            except MscopeError:
                pass  # the in-order pass reports it where it belongs

        if wanted:
            with ThreadPoolExecutor(FETCH_CONCURRENCY, thread_name_prefix="mscope-dcp") as pool:
                list(pool.map(fetch, sorted(wanted)))

    def close(self) -> None:
        from .sources import CachedRemote

        for _, mm, _ in self.maps.values():
            if isinstance(mm, RemoteMap):
                if isinstance(mm.source, CachedRemote):
                    mm.source.persist()  # the items' zip records join the metadata cache
            elif mm is not None:
                mm.close()


class _ItemStorages:
    """persistent_load for a nested torch.save archive: storages located in the outer file."""

    def __init__(
        self, path: Path, members: dict[str, tuple[int, int, int]], prefix: str, byteorder: str
    ):
        self.path = path
        self.members = members
        self.folder = f"{prefix}data/"
        self.byteorder = byteorder
        self.records: dict[str, StorageRecord] = {}

    def __call__(self, pid: Any) -> StorageRecord:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise _ItemError(f"unexpected persistent id {short(pid)}")
        _, storage_type, key, location, numel = pid[:5]
        if not isinstance(storage_type, StorageType):
            raise _ItemError(f"unknown storage type {short(storage_type)}")
        if not isinstance(key, str) or len(key) > 256 or not _count(numel) or numel >= MAX_DIM:
            raise _ItemError(f"malformed storage reference {short(pid)}")
        record = self.records.get(key)
        if record is None:
            record = StorageRecord(
                key=key,
                dtype=storage_type.dtype,
                numel=numel,
                location=str(location)[:64] if isinstance(location, str) else "cpu",
                file=self.path,
                byteorder=self.byteorder,
            )
            member = self.members.get(self.folder + key)
            if member is not None:
                start, size, method = member
                record.data_offset, record.data_size, record.compressed = start, size, method != 0
            self.records[key] = record
        return record


def read_dcp(directory: Path) -> Checkpoint:
    directory = Path(directory)
    meta_path = directory / METADATA_NAME
    size = meta_path.stat().st_size
    if size > MAX_METADATA_BYTES:
        raise CorruptCheckpointError(
            f"DCP .metadata is {size:,} bytes, more than {MAX_METADATA_BYTES:,}", meta_path
        )
    return _read(_Files(directory, meta_path), meta_path.read_bytes())


def read_dcp_remote(meta: Any, source: Any, opener: Any) -> Checkpoint:
    """A DCP folder behind a URL: `.metadata` (a RemotePath) read whole through `source`, then
    the `.distcp` files through `opener(url)`, their items' zip records fetched concurrently."""
    if source.size > MAX_METADATA_BYTES:
        raise CorruptCheckpointError(
            f"DCP .metadata is {source.size:,} bytes, more than {MAX_METADATA_BYTES:,}", meta
        )
    return _read(_Files(meta.parent, meta, opener), source.read(0, source.size))


def _read(files: _Files, data: bytes) -> Checkpoint:
    meta_path = files.meta_path
    try:
        root, globals_, _ = safe_load(data, source=METADATA_NAME, known_schema=dcp_schema)
    except MscopeError as exc:
        if exc.path is None:
            exc.path = str(meta_path)
        raise
    for ref in globals_:
        if (ref.module, ref.name) == ("torch.serialization", "_get_layout"):
            # Pickled for every TensorProperties.layout; it only looks a torch.layout up by name
            # and is on torch's weights_only allowlist.
            ref.safety, ref.reason = (
                "safe",
                "looks up a torch.layout by name (weights_only allows it)",
            )
    reader = _Reader(files, globals_)
    try:
        return reader.read(root)
    finally:
        files.close()


def _fields(obj: Any) -> dict:
    """The field dict of an inert dataclass record (BUILD state), else {}."""
    if isinstance(obj, Inert):
        return obj.state_dict() or {}
    return obj if isinstance(obj, dict) else {}


def _dims(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_DIM for v in value):
        return None
    return tuple(value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _Reader:
    def __init__(self, files: _Files, globals_: list[GlobalRef]):
        self.directory = files.directory
        self.meta_path = files.meta_path
        self.files = files
        self.ckpt = Checkpoint(files.directory, Format.DCP, files=[files.meta_path])
        self.ckpt.globals = list(globals_)
        self.item_globals: dict[tuple[str, str, str], GlobalRef] = {}
        self.transformed = 0

    def corrupt(self, message: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(message, self.meta_path)

    # -- top level -----------------------------------------------------------------------------
    def read(self, root: Any) -> Checkpoint:
        ckpt = self.ckpt
        if not (isinstance(root, Inert) and root.qualname == f"{SCHEMA_PREFIX}metadata.Metadata"):
            danger = [
                call
                for g in self.ckpt.globals
                if g.safety == "dangerous"
                for call in (g.calls or [g.qualname])
            ]
            warn = f"; it would call {', '.join(danger[:2])}" if danger else ""
            raise self.corrupt(
                f"not a torch.distributed.checkpoint Metadata object (got {short(root)}){warn}"
            )
        state = _fields(root)
        sdm = state.get("state_dict_metadata")
        if not isinstance(sdm, dict):
            raise self.corrupt("Metadata has no state_dict_metadata mapping")
        self.index = self._storage_index(state.get("storage_data"))
        if self.files.opener is not None:
            self.files.prefetch(self.index.values())
        values: dict[str, Any] = {}
        chunks_md: dict[str, list[dict]] = {}
        for fqn, md in sdm.items():
            if not isinstance(fqn, str):
                raise self.corrupt(f"state_dict_metadata has a non-string key {short(fqn)}")
            kind = md.qualname.rsplit(".", 1)[-1] if isinstance(md, Inert) else type(md).__name__
            if kind == "TensorStorageMetadata":
                values[fqn] = self._tensor(fqn, _fields(md), chunks_md)
            elif kind == "BytesStorageMetadata":
                values[fqn] = self._bytes_value(fqn)
            else:
                raise self.corrupt(f"entry {short(fqn)} has unknown storage metadata {short(md)}")

        self._describe(state)
        if chunks_md:
            ckpt.metadata["dcp_chunks"] = chunks_md
        Walker(ckpt).walk_root(self._nest(values, state.get("planner_data")))
        for t in ckpt.tensors:
            if t.storage is not None and t.storage.file is not None and t.shard is None:
                t.shard = t.storage.file.name
        for ref in self.item_globals.values():
            ckpt.globals.append(ref)
        ckpt.files.extend(sorted(path for path, _, _ in self.files.maps.values()))
        if self.transformed:
            ckpt.warnings.append(
                f"{self.transformed:,} items are stored through DCP extensions (compression or similar); "
                "their bytes cannot be located"
            )
        return ckpt

    def _describe(self, state: dict) -> None:
        meta = self.ckpt.metadata
        version = state.get("version")
        if isinstance(version, str):
            meta["dcp_version"] = version[:32]
        storage_meta = _fields(state.get("storage_meta"))
        for key in ("checkpoint_id", "save_id", "load_id"):
            value = storage_meta.get(key)
            if isinstance(value, Inert) and value.args and isinstance(value.args[0], str):
                value = value.args[0]
            if isinstance(value, str):
                meta[f"dcp_{key}"] = value[:256]
        modules = storage_meta.get("modules")
        if isinstance(modules, list) and modules and all(isinstance(m, str) for m in modules):
            meta["dcp_modules"] = modules[:64]

    def _storage_index(self, storage: Any) -> dict[tuple[str, tuple[int, ...] | None], _Item]:
        index: dict[tuple[str, tuple[int, ...] | None], _Item] = {}
        checked: set[str] = set()
        if storage is None:
            self.ckpt.problems.append("DCP metadata has no storage_data: no item can be located")
            return index
        if not isinstance(storage, dict):
            raise self.corrupt(f"storage_data is a {type(storage).__name__}, not a mapping")
        for key, info in storage.items():
            k, v = _fields(key), _fields(info)
            fqn = k.get("fqn")
            offset = k.get("offset")
            if not isinstance(fqn, str):
                raise self.corrupt(f"storage_data has a malformed key {short(key)}")
            offsets = None if offset is None else _dims(offset)
            if offset is not None and offsets is None:
                raise self.corrupt(
                    f"storage_data key for {short(fqn)} has malformed offsets {short(offset)}"
                )
            rel, start, length = v.get("relative_path"), v.get("offset"), v.get("length")
            if not (isinstance(rel, str) and _count(start) and _count(length)):
                raise self.corrupt(f"storage entry for {short(fqn)} is malformed: {short(v)}")
            if rel not in checked:  # refuse a hostile path even where nothing reads it
                self.files.location(rel, fqn)
                checked.add(rel)
            descs = v.get("transform_descriptors") or ()
            transforms = (
                tuple(str(d)[:64] for d in descs) if isinstance(descs, (list, tuple)) else ("?",)
            )
            path = self.files.location(rel, fqn)
            index[(fqn, offsets)] = _Item(rel, path, start, length, transforms)
        return index

    # -- tensors -------------------------------------------------------------------------------
    def _tensor(self, fqn: str, md: dict, chunks_md: dict[str, list[dict]]) -> TensorRef:
        label = f"tensor {short(fqn)}"
        shape = _dims(md.get("size"))
        if shape is None:
            raise self.corrupt(f"{label} has a malformed size {short(md.get('size'))}")
        dtype, requires_grad = self._properties(fqn, md.get("properties"))
        chunks = md.get("chunks")
        if not isinstance(chunks, list):
            raise self.corrupt(f"{label} has no chunk list")
        parsed = []
        for chunk in chunks:
            c = _fields(chunk)
            offsets, sizes = _dims(c.get("offsets")), _dims(c.get("sizes"))
            if (
                offsets is None
                or sizes is None
                or len(offsets) != len(shape)
                or len(sizes) != len(shape)
                or any(o + s > n for o, s, n in zip(offsets, sizes, shape))
            ):
                raise self.corrupt(f"{label} {list(shape)} has a chunk outside it: {short(c)}")
            parsed.append((offsets, sizes))
        numel = math.prod(shape)
        stride = contiguous_stride(shape)
        whole = len(parsed) == 1 and parsed[0][1] == shape and not any(parsed[0][0])
        if whole:
            located = self._locate_chunk(fqn, parsed[0][0], shape, dtype)
            if located is None:
                ref = TensorRef(None, 0, shape, stride, requires_grad, dtype=dtype)
                item = self.index.get((fqn, parsed[0][0]))
                ref.note = (
                    f"stored through {', '.join(item.transforms)}"
                    if item and item.transforms
                    else "bytes not located"
                )
                return ref
            return TensorRef(
                located.storage,
                located.storage_offset,
                shape,
                located.stride,
                requires_grad,
                dtype=dtype,
            )
        covered = sum(math.prod(sizes) for _, sizes in parsed)
        if covered != numel:
            self.ckpt.problems.append(
                f"{label} {list(shape)}: its chunks hold {covered:,} of {numel:,} elements"
            )
        records = []
        for offsets, sizes in parsed:
            entry: dict[str, Any] = {"offsets": list(offsets), "sizes": list(sizes)}
            item = self.index.get((fqn, offsets))
            if item is not None:
                entry.update(file=item.rel, item_offset=item.offset, item_length=item.length)
            located = self._locate_chunk(fqn, offsets, sizes, dtype)
            if located is not None:
                s = located.storage
                entry.update(
                    path=str(s.file),
                    data_offset=s.data_offset,
                    data_size=s.data_size,
                    storage_dtype=s.dtype,
                    storage_numel=s.numel,
                    storage_offset=located.storage_offset,
                    stride=list(located.stride),
                    byteorder=s.byteorder,
                )
            records.append(entry)
        chunks_md[fqn] = records
        ref = TensorRef(None, 0, shape, stride, requires_grad, dtype=dtype)
        ref.note = f"sharded in {len(parsed)} chunk{'s' if len(parsed) != 1 else ''}"
        return ref

    def _properties(self, fqn: str, props: Any) -> tuple[str, bool]:
        """(dtype, requires_grad) of a TensorProperties record."""
        if not isinstance(props, Inert):
            raise self.corrupt(f"tensor {short(fqn)} has malformed properties {short(props)}")
        state = props.state
        if isinstance(state, tuple) and state:
            # TensorProperties.__getstate__: (dtype, layout, requires_grad, memory format, pinned)
            dtype, requires_grad = state[0], state[2] if len(state) > 2 else False
        else:  # pickles from before __getstate__: the dataclass field dict
            fields = _fields(props)
            dtype, requires_grad = fields.get("dtype"), fields.get("requires_grad", False)
        if isinstance(dtype, DType) and str(dtype) in DTYPE_ITEMSIZE:
            return str(dtype), requires_grad is True
        name = dtype.qualname if isinstance(dtype, Inert) else short(dtype)
        raise self.corrupt(f"tensor {short(fqn)} has an unknown dtype {name}")

    def _locate_chunk(
        self, fqn: str, offsets: tuple[int, ...], sizes: tuple[int, ...], dtype: str
    ) -> _Located | None:
        """The storage holding one chunk's bytes, or None (with a problem or warning recorded)."""
        label = f"tensor {short(fqn)}"
        item = self.index.get((fqn, offsets))
        if item is None:
            self.ckpt.problems.append(f"{label}: no storage entry for the chunk at {list(offsets)}")
            return None
        if item.transforms:
            self.transformed += 1
            return None
        try:
            path, mm, size = self.files.open(item.rel, fqn)
            self._check_span(item, size)
            if mm is not None and mm[item.offset : item.offset + 4] == b"PK\x03\x04":
                located = self._nested_tensor(item, mm, fqn)
            else:
                located = self._safetensors_tensor(item, path, size, fqn, mm)
        except _ItemError as exc:
            self.ckpt.problems.append(f"{label}: {exc}")
            return None
        if located.shape != sizes:
            self.ckpt.problems.append(
                f"{label}: chunk at {list(offsets)} holds shape {list(located.shape)}, expected {list(sizes)}"
            )
            return None
        if located.dtype is not None and located.dtype != dtype:
            self.ckpt.problems.append(
                f"{label}: bytes are {located.dtype} but the metadata says {dtype}"
            )
        return located

    def _check_span(self, item: _Item, size: int) -> None:
        if item.offset + item.length > size:
            raise _ItemError(
                f"item at bytes {item.offset:,}..{item.offset + item.length:,} runs past the end of "
                f"{item.rel} ({size:,} bytes)"
            )

    def _nested_tensor(self, item: _Item, mm: mmap.mmap, fqn: str) -> _Located:
        value = self._unpickle_item(item, mm, fqn)
        if not isinstance(value, TensorRef) or not isinstance(value.storage, StorageRecord):
            raise _ItemError(
                f"item in {item.rel} at byte {item.offset:,} holds {short(value)}, not a tensor"
            )
        storage = value.storage
        storage.key = f"{item.rel}@{item.offset}:{storage.key}"
        if storage.data_offset is None:
            raise _ItemError(f"item in {item.rel} at byte {item.offset:,} lacks its storage member")
        return _Located(storage, value.storage_offset, value.stride, value.shape, value.dtype)

    def _safetensors_tensor(
        self, item: _Item, path: Path, size: int, fqn: str, mm: mmap.mmap | None
    ) -> _Located:
        head = mm[item.offset : item.offset + 9] if mm is not None else b""
        if len(head) < 9 or head[8:9] != b"{":
            raise _ItemError(
                f"item in {item.rel} at byte {item.offset:,} is neither a torch.save archive nor safetensors"
            )
        key = (item.rel, item.offset)
        header = self.files.headers.get(key)
        if header is None:
            if isinstance(mm, RemoteMap):
                from .sources import SourceFile

                opened: Any = contextlib.nullcontext(SourceFile(mm.source))
            else:
                opened = open(path, "rb")
            with opened as fh:
                try:
                    header = read_header(fh, path, base=item.offset, available=size - item.offset)
                except CorruptCheckpointError as exc:
                    raise _ItemError(f"safetensors blob in {item.rel}: {exc.message}") from exc
            self.files.headers[key] = header
        for t in header.tensors:
            if t.name == fqn:
                break
        else:
            raise _ItemError(f"not found in the safetensors blob of {item.rel}")
        start = item.offset + header.data_start + t.begin
        storage = StorageRecord(
            key=f"{item.rel}@{item.offset}:{fqn}",
            dtype=t.dtype,
            numel=math.prod(t.shape),
            file=path,
            data_offset=start,
            data_size=t.end - t.begin,
        )
        return _Located(storage, 0, contiguous_stride(t.shape), t.shape, t.dtype)

    # -- non-tensor values -----------------------------------------------------------------------
    def _bytes_value(self, fqn: str) -> Any:
        item = self.index.get((fqn, None))
        if item is None:
            self.ckpt.problems.append(f"value {short(fqn)}: no storage entry")
            return SerializedValue(0, "no storage entry")
        if item.transforms:
            self.transformed += 1
            return SerializedValue(item.length, f"stored through {', '.join(item.transforms)}")
        try:
            _, mm, size = self.files.open(item.rel, fqn)
            self._check_span(item, size)
            if mm is None or mm[item.offset : item.offset + 4] != b"PK\x03\x04":
                return SerializedValue(item.length, "not a torch.save archive")
            return self._unpickle_item(item, mm, fqn)
        except _ItemError as exc:
            self.ckpt.problems.append(f"value {short(fqn)}: {exc}")
            return SerializedValue(item.length, "unreadable")

    # -- nested torch.save archives --------------------------------------------------------------
    def _unpickle_item(self, item: _Item, mm: mmap.mmap, fqn: str) -> Any:
        members = _zip_members(mm, item.offset, item.length)
        prefix = next(
            (
                n[: -len("data.pkl")]
                for n in members
                if n.endswith("data.pkl") and n.count("/") == 1
            ),
            None,
        )
        if prefix is None:
            raise _ItemError(f"archive in {item.rel} at byte {item.offset:,} has no data.pkl")
        start, pkl_size, method = members[f"{prefix}data.pkl"]
        if method != 0 or pkl_size > MAX_ITEM_PICKLE:
            return SerializedValue(item.length, "pickle compressed or too large to show")
        byteorder = "little"
        order = members.get(f"{prefix}byteorder")
        if order is not None and order[1] <= 16 and order[2] == 0:
            byteorder = "big" if mm[order[0] : order[0] + order[1]].strip() == b"big" else "little"
        storages = _ItemStorages(item.path, members, prefix, byteorder)
        source = f"{item.rel}@{item.offset}:{prefix}data.pkl"
        try:
            value, refs, _ = safe_load(
                mm[start : start + pkl_size], source=source, persistent_load=storages
            )
        except MscopeError as exc:
            raise _ItemError(exc.message) from exc
        except _ItemError as exc:
            raise _ItemError(f"{source}: {exc}") from exc
        for ref in refs:
            merge_global(self.item_globals, ref, item.rel)
        return value

    # -- nesting ---------------------------------------------------------------------------------
    def _nest(self, values: dict[str, Any], planner_data: Any) -> dict:
        """Rebuild the saved state_dict's nesting from DefaultSavePlanner's flatten mapping
        ({fqn: original key path}), so `{"model": ..., "optim": ...}` gets the same model section
        and names as the torch.save of that dict. Without a usable mapping, names stay flat."""
        if not isinstance(planner_data, dict) or not planner_data:
            return dict(values)
        root: dict = {}
        made = {id(root)}
        for fqn, value in values.items():
            path = planner_data.get(fqn, (fqn,))
            if (
                not isinstance(path, (tuple, list))
                or not 1 <= len(path) <= MAX_DEPTH
                or not all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in path)
                or ".".join(map(str, path)) != fqn
            ):
                self.ckpt.warnings.append(
                    "DCP planner_data does not match the saved names; keys shown flat"
                )
                return dict(values)
            node = root
            for key in path[:-1]:
                child = node.get(key)
                if child is None:
                    child = node[key] = {}
                    made.add(id(child))
                elif id(child) not in made:  # a value already sits where a container goes
                    return dict(values)
                node = child
            if path[-1] in node:
                return dict(values)
            node[path[-1]] = value
        return root


def _zip_members(mm: mmap.mmap, base: int, length: int) -> dict[str, tuple[int, int, int]]:
    """Members of the zip archive occupying mm[base:base+length]: name -> (absolute data start,
    stored size, compression method). Every offset is checked against the archive's bounds."""
    if base < 0 or length < 0 or base + length > len(mm):
        raise _ItemError(f"archive at byte {base:,} runs past the end of its file")
    try:
        return _zip_members_in(mm, base, length)
    except struct.error as exc:  # a last guard: every read below is bounds-checked first
        raise _ItemError(f"archive at byte {base:,} has a malformed record ({exc})") from exc


def _zip_members_in(mm: mmap.mmap, base: int, length: int) -> dict[str, tuple[int, int, int]]:
    end = base + length
    where = f"archive at byte {base:,}"
    pos = mm.rfind(b"PK\x05\x06", max(base, end - _EOCD.size - 0xFFFF), end)
    if pos < 0 or pos + _EOCD.size > end:
        raise _ItemError(f"{where} has no zip end record")
    _, _, _, _, count, cd_size, cd_offset, _ = _unpack(_EOCD, mm, pos)
    locator = pos - _EOCD64_LOCATOR.size
    if locator >= base and mm[locator : locator + 4] == b"PK\x06\x07":
        _, _, eocd64, _ = _unpack(_EOCD64_LOCATOR, mm, locator)
        if eocd64 + _EOCD64.size > length or mm[base + eocd64 : base + eocd64 + 4] != b"PK\x06\x06":
            raise _ItemError(f"{where} has a bad zip64 end record")
        fields = _unpack(_EOCD64, mm, base + eocd64)
        count, cd_size, cd_offset = fields[7], fields[8], fields[9]
    if cd_offset + cd_size > length or count > MAX_ITEM_MEMBERS or count * _CENTRAL.size > cd_size:
        raise _ItemError(f"{where} has a central directory outside it")
    members: dict[str, tuple[int, int, int]] = {}
    p, cd_end = base + cd_offset, base + cd_offset + cd_size
    for _ in range(count):
        if p + _CENTRAL.size > cd_end:
            raise _ItemError(f"{where} has a truncated central directory")
        fields = _unpack(_CENTRAL, mm, p)
        if fields[0] != b"PK\x01\x02":
            raise _ItemError(f"{where} has a bad central directory entry")
        method, csize, usize, nlen, xlen, clen, offset = (
            fields[i] for i in (4, 8, 9, 10, 11, 12, 16)
        )
        name_start = p + _CENTRAL.size
        name = mm[name_start : name_start + nlen].decode("utf-8", "replace")
        if 0xFFFFFFFF in (csize, usize, offset):
            if name_start + nlen + xlen > cd_end:
                raise _ItemError(f"{where}: the extra field of {short(name)} runs past its directory")
            usize, csize, offset = _zip64_sizes(
                mm, name_start + nlen, xlen, usize, csize, offset, where
            )
        p = name_start + nlen + xlen + clen
        local = base + offset
        if offset + _LOCAL.size > length or mm[local : local + 4] != b"PK\x03\x04":
            raise _ItemError(f"{where}: local header of {short(name)} is missing")
        lf = _unpack(_LOCAL, mm, local)
        start = local + _LOCAL.size + lf[9] + lf[10]
        if start + csize > end:
            raise _ItemError(f"{where}: member {short(name)} runs past the archive's end")
        members[name] = (start, csize if method else usize, method)
    if p > cd_end:
        raise _ItemError(f"{where} has a truncated central directory")
    return members


def _zip64_sizes(
    mm: mmap.mmap, start: int, length: int, usize: int, csize: int, offset: int, where: str
) -> tuple[int, int, int]:
    p, end = start, min(start + length, len(mm))
    while p + 4 <= end:
        tag, size = _unpack(_TAG, mm, p)
        if p + 4 + size > end:
            raise _ItemError(f"{where} has a zip64 extra field that runs past its end")
        if tag == 1:
            q, values = p + 4, []
            for wanted in (usize, csize, offset):
                if wanted == 0xFFFFFFFF:
                    if q + 8 > min(end, p + 4 + size):
                        raise _ItemError(f"{where} has a bad zip64 extra field")
                    values.append(_unpack(_U64, mm, q)[0])
                    q += 8
                else:
                    values.append(wanted)
            return values[0], values[1], values[2]
        p += 4 + size
    raise _ItemError(f"{where} lacks its zip64 sizes")
