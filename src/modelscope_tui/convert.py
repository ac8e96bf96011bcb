"""Converted copies of a checkpoint: storages remapped to another device, or a cast model part.

Both write a new file through `writers.atomic_write` (temp file in the same directory, fsync,
rename; never over an existing file unless asked, and then with a `.bak`), and check what they
wrote before it replaces anything.

`remap_locations` rewrites only the location strings of the storages' persistent ids in the
pickle (the opcode walk in `readers.picklepatch`; nothing is unpickled for real) and copies every
other archive member byte for byte into a zip laid out as torch's own writer lays it out.

`cast_copy` writes the model part as a state dict (torch zip or safetensors), streaming one
chunk of one storage at a time from the mmap'ed source (`TensorData`): memory stays around one
chunk, whatever the size of the model.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import struct
import sys
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .checkpoint import DTYPE_ITEMSIZE, FLOATING_DTYPES, Checkpoint, TensorRecord
from .errors import MscopeError
from .jsonfile import compact_json, json_bytes
from .readers.picklepatch import PicklePatchError, contiguous_stride, rewrite_storage_locations
from .readers.torchzip import MAX_PICKLE_BYTES, archive_prefix, is_torchscript
from .readers.unpickler import scan_pickle
from .readers.ziparchive import DEFLATED, STORED, ZipArchive
from .writers import SaveError, atomic_write, copy_range, sibling_path

__all__ = [
    "CastPlan",
    "cast_copy",
    "plan_cast",
    "preview_cast",
    "remap_locations",
]

# ----------------------------------------------------------------------------------------------
# A zip written the way torch's PyTorchStreamWriter (miniz) writes it
# ----------------------------------------------------------------------------------------------
_LOCAL = struct.Struct("<4s5H3L2H")
_CENTRAL = struct.Struct("<4s6H3L5H2L")
_DESCRIPTOR32 = struct.Struct("<4s3L")
_DESCRIPTOR64 = struct.Struct("<4sL2Q")
_EOCD = struct.Struct("<4s4H2LH")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_FLAG_DESCRIPTOR, _FLAG_UTF8 = 0x0008, 0x0800
# Sizes and offsets at or past this go to zip64 extra fields (a module constant so tests can
# exercise the zip64 layout with small files).
ZIP64_LIMIT = 0xFFFFFFFF
DEFAULT_ALIGNMENT = 64


@dataclass(slots=True)
class _Written:
    name: bytes
    offset: int
    method: int
    crc: int
    compressed_size: int
    size: int
    flags: int


class TorchZipWriter:
    """Members as torch writes them: local headers with zeroed sizes and a data descriptor,
    the payload aligned to `alignment` bytes by an `FB` extra field padded with `Z`, zip64 extra
    fields only where a size or offset needs them, and always a zip64 end record."""

    def __init__(self, fh: BinaryIO, alignment: int = DEFAULT_ALIGNMENT):
        self.fh = fh
        self.alignment = alignment
        self.pos = 0
        self.members: list[_Written] = []
        self._open: _Written | None = None
        self._crc = 0
        self._count = 0

    def _out(self, data: bytes | memoryview) -> None:
        self.fh.write(data)
        self.pos += len(data)

    def begin(
        self, name: str, compressed_size: int, size: int | None = None, method: int = STORED
    ) -> None:
        size = compressed_size if size is None else size
        raw_name = name.encode("utf-8")
        offset = self.pos
        big = max(size, compressed_size) >= ZIP64_LIMIT
        fields = ([size, compressed_size] if big else []) + (
            [offset] if offset >= ZIP64_LIMIT else []
        )
        zip64 = struct.pack(f"<2H{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
        start = offset + _LOCAL.size + len(raw_name) + len(zip64) + 4
        pad = -start % self.alignment
        extra = zip64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
        flags = _FLAG_UTF8 | (_FLAG_DESCRIPTOR if compressed_size else 0)
        header = _LOCAL.pack(
            b"PK\x03\x04", 0, flags, method, 0, 0, 0, 0, 0, len(raw_name), len(extra)
        )
        self._out(header + raw_name + extra)
        self._open = _Written(raw_name, offset, method, 0, compressed_size, size, flags)
        self._crc = 0
        self._count = 0

    def write(self, data: bytes | memoryview) -> None:
        self._crc = zlib.crc32(data, self._crc)
        self._count += len(data)
        self._out(data)

    def copy(self, src_fd: int, offset: int, length: int) -> None:
        """Append bytes of another file (kernel copy where it can); their CRC is the caller's."""
        self.fh.flush()
        copy_range(src_fd, self.fh.fileno(), offset, length)
        self._count += length
        self.pos += length

    def end(self, crc: int | None = None) -> None:
        member = self._open
        assert member is not None
        if self._count != member.compressed_size:
            raise SaveError(
                f"member {member.name.decode()!r} came out {self._count:,} bytes, not {member.compressed_size:,}"
            )
        member.crc = self._crc if crc is None else crc
        if member.flags & _FLAG_DESCRIPTOR:
            if (
                member.offset >= ZIP64_LIMIT
                or max(member.size, member.compressed_size) >= ZIP64_LIMIT
            ):
                self._out(
                    _DESCRIPTOR64.pack(
                        b"PK\x07\x08", member.crc, member.compressed_size, member.size
                    )
                )
            else:
                self._out(
                    _DESCRIPTOR32.pack(
                        b"PK\x07\x08", member.crc, member.compressed_size, member.size
                    )
                )
        self.members.append(member)
        self._open = None

    def add(self, name: str, data: bytes) -> None:
        self.begin(name, len(data))
        self.write(data)
        self.end()

    def finish(self, order: Iterable[str] | None = None) -> None:
        """The central directory (in `order` of names when given) and the end records."""
        members = self.members
        if order is not None:
            by_name = {m.name.decode("utf-8"): m for m in members}
            members = [by_name[n] for n in order]
        cd_offset = self.pos
        for m in members:
            big = max(m.size, m.compressed_size) >= ZIP64_LIMIT
            far = m.offset >= ZIP64_LIMIT
            fields = ([m.size, m.compressed_size] if big else []) + ([m.offset] if far else [])
            extra = (
                struct.pack(f"<2H{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
            )
            self._out(
                _CENTRAL.pack(
                    b"PK\x01\x02",
                    0,
                    0,
                    m.flags,
                    m.method,
                    0,
                    0,
                    m.crc,
                    0xFFFFFFFF if big else m.compressed_size,
                    0xFFFFFFFF if big else m.size,
                    len(m.name),
                    len(extra),
                    0,
                    0,
                    0,
                    0,
                    0xFFFFFFFF if far else m.offset,
                )  # fmt: skip
                + m.name
                + extra
            )
        cd_size = self.pos - cd_offset
        count = len(members)
        eocd64_offset = self.pos
        self._out(
            _EOCD64.pack(b"PK\x06\x06", 44, 0x031E, 0x2D, 0, 0, count, count, cd_size, cd_offset)
        )
        self._out(_EOCD64_LOCATOR.pack(b"PK\x06\x07", 0, eocd64_offset, 1))
        small = count < 0xFFFF
        self._out(
            _EOCD.pack(
                b"PK\x05\x06",
                0,
                0,
                count if small else 0xFFFF,
                count if small else 0xFFFF,
                cd_size if cd_size < ZIP64_LIMIT else 0xFFFFFFFF,
                cd_offset if cd_offset < ZIP64_LIMIT else 0xFFFFFFFF,
                0,
            )  # fmt: skip
        )


# ----------------------------------------------------------------------------------------------
# Shared checks
# ----------------------------------------------------------------------------------------------
_DEVICE = re.compile(r"[a-z][a-z0-9_]*(:[0-9]{1,4})?")


def _check_device(value: Any, path: Path) -> str:
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        raise SaveError(f"{str(value)[:40]!r} is not a device name (like 'cpu' or 'cuda:0')", path)
    return value


def _file_state(paths: Iterable[Path]) -> dict[Path, tuple[int, int]]:
    state = {}
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as exc:
            raise SaveError(f"cannot read the source: {exc.strerror or exc}", p) from exc
        state[p] = (st.st_size, st.st_mtime_ns)
    return state


def _check_unchanged(before: dict[Path, tuple[int, int]]) -> None:
    for p, old in before.items():
        try:
            st = os.stat(p)
        except OSError as exc:
            raise SaveError("the source disappeared while it was being copied", p) from exc
        if (st.st_size, st.st_mtime_ns) != old:
            raise SaveError("the source changed while it was being copied", p, "try again")


def _as_save_error(exc: MscopeError, path: Path) -> SaveError:
    if isinstance(exc, SaveError):
        return exc
    return SaveError(exc.message, exc.path or path, exc.hint)


def _keep_mode(fh: BinaryIO, source: Path) -> None:
    try:
        os.fchmod(fh.fileno(), os.stat(source).st_mode & 0o7777)
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------
# Remap storage locations
# ----------------------------------------------------------------------------------------------
REMAP_FORMATS = ("torch-zip", "torch-legacy")


def remap_locations(
    ckpt: Checkpoint,
    mapping: Mapping[str, str] | str = "cpu",
    dest: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a copy of `ckpt`'s file whose storages say they live on another device.

    mapping: a device name for every storage (`"cpu"`, the default), or `{"cuda:1": "cpu"}` for
    exact stored locations (others keep theirs). This is the fix for files that fail with
    "Attempting to deserialize object on a CUDA device" on machines without that device, for
    loaders that pass no `map_location`.

    torch zip archives (state dicts, training checkpoints, full modules) and legacy (pre-1.6)
    files. Only the location strings that feed storage persistent ids change (see
    `picklepatch.rewrite_storage_locations` for the one exception: a persistent id tuple that
    is itself read elsewhere). Every other member is copied byte for byte; the zip is rebuilt
    as torch writes it, each member's data aligned to the archive's `.storage_alignment` (64).
    Default destination: `model.cpu.pt` next to the source.
    """
    source = Path(ckpt.path)
    remap = _location_remap(mapping, source)
    if ckpt.format == "torchscript":
        raise SaveError(
            "TorchScript archives are not remapped (their code may name devices too)",
            source,
            'use torch.jit.load(f, map_location="cpu")',
        )
    if ckpt.format not in REMAP_FORMATS:
        raise SaveError(f"a {ckpt.format} file stores no device locations", source)
    if dest is None:
        targets = {mapping} if isinstance(mapping, str) else set(mapping.values())
        tag = targets.pop().replace(":", "") if len(targets) == 1 else "remapped"
        dest = sibling_path(source, tag)
    dest = Path(dest)
    try:
        src = open(source, "rb")
    except OSError as exc:
        raise SaveError(f"cannot read the source: {exc.strerror or exc}", source) from exc
    with src:
        before = _file_state([source])
        try:
            buf = mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise SaveError(f"cannot read the source: {exc}", source) from exc
        try:
            if ckpt.format == "torch-legacy":
                write = _remap_legacy(source, src.fileno(), buf, remap)
            else:
                write = _remap_zip(source, src.fileno(), buf, remap)

            def write_checked(fh: BinaryIO) -> None:
                write(fh)
                _check_unchanged(before)
                _keep_mode(fh, source)

            return atomic_write(dest, write_checked, overwrite=overwrite)
        finally:
            buf.close()


def _location_remap(mapping: Mapping[str, str] | str, path: Path) -> Callable[[str], str | None]:
    if isinstance(mapping, str):
        target = _check_device(mapping, path)
        return lambda location: target
    if not isinstance(mapping, Mapping) or not mapping:
        raise SaveError("the location mapping must be a device name or a non-empty dict", path)
    table: dict[str, str] = {}
    for old, new in mapping.items():
        if not isinstance(old, str):
            raise SaveError(f"{old!r} is not a stored location", path)
        table[old] = _check_device(new, path)
    return table.get


def _rewrite(pickle: bytes, remap: Callable[[str], str | None], path: Path, source: str) -> bytes:
    try:
        new, changed = rewrite_storage_locations(pickle, remap, source)
    except PicklePatchError as exc:
        raise SaveError(exc.message, path) from exc
    if not changed:
        raise SaveError("no storage location changes: nothing to write", path)
    return new


def _remap_zip(
    path: Path, src_fd: int, buf: mmap.mmap, remap: Callable[[str], str | None]
) -> Callable[[BinaryIO], None]:
    try:
        archive = ZipArchive(path, buf)
    except MscopeError as exc:
        raise _as_save_error(exc, path) from exc
    prefix = archive_prefix(archive)
    if prefix is None:
        raise SaveError("zip archive without a data.pkl: not a torch checkpoint", path)
    if is_torchscript(archive, prefix):
        raise SaveError(
            "TorchScript archives are not remapped",
            path,
            'use torch.jit.load(f, map_location="cpu")',
        )
    if archive.duplicates:
        raise SaveError(
            f"archive holds {archive.duplicates[0]!r} twice", path, "re-save it with torch"
        )
    entries = list(archive.entries.values())
    for e in entries:
        if e.flags & 0x1:
            raise SaveError(f"member {e.name!r} is encrypted", path)
        if e.method not in (STORED, DEFLATED):
            raise SaveError(f"member {e.name!r} uses compression method {e.method}", path)
        if "\ufffd" in e.name:
            raise SaveError("archive member names are not UTF-8", path)
    member = f"{prefix}data.pkl"
    try:
        pickle = archive.read(member, MAX_PICKLE_BYTES, verify=True)
        starts = {e.name: archive.data_offset(e) for e in entries}
    except MscopeError as exc:
        raise _as_save_error(exc, path) from exc
    new_pickle = _rewrite(pickle, remap, path, f"{path.name}:{member}")
    alignment = _storage_alignment(archive, prefix)
    physical = sorted(entries, key=lambda e: e.header_offset)
    try:
        reference = _read_zip_records(path, buf)
    except MscopeError as exc:
        raise _as_save_error(exc, path) from exc

    def write(fh: BinaryIO) -> None:
        zw = TorchZipWriter(fh, alignment)
        for e in physical:
            if e.name == member:
                zw.add(member, new_pickle)
                continue
            zw.begin(e.name, e.compressed_size, e.size, e.method)
            zw.copy(src_fd, starts[e.name], e.compressed_size)
            zw.end(e.crc)
        zw.finish(e.name for e in entries)
        fh.flush()
        _verify_remap(reference, _read_fd(fh, path, _read_zip_records), remap, path)

    return write


def _remap_legacy(
    path: Path, src_fd: int, buf: mmap.mmap, remap: Callable[[str], str | None]
) -> Callable[[BinaryIO], None]:
    source = path.name
    try:
        start = 0
        for _ in range(3):  # magic number, protocol version, sys_info
            start = scan_pickle(buf, start, source)
        end = scan_pickle(buf, start, source)
    except MscopeError as exc:
        raise _as_save_error(exc, path) from exc
    new_pickle = _rewrite(bytes(buf[start:end]), remap, path, source)
    size = len(buf)
    try:
        reference = _read_legacy_records(path, buf)
    except MscopeError as exc:
        raise _as_save_error(exc, path) from exc

    def write(fh: BinaryIO) -> None:
        fh.flush()
        copy_range(src_fd, fh.fileno(), 0, start)
        fh.write(new_pickle)
        fh.flush()
        copy_range(src_fd, fh.fileno(), end, size - end)
        fh.flush()
        _verify_remap(reference, _read_fd(fh, path, _read_legacy_records), remap, path)

    return write


def _storage_alignment(archive: ZipArchive, prefix: str) -> int:
    entry = archive.entries.get(f"{prefix}.storage_alignment")
    if entry is None or entry.size > 16:
        return DEFAULT_ALIGNMENT
    try:
        value = int(archive.read(entry.name, 16).decode("ascii").strip())
    except (MscopeError, ValueError, UnicodeDecodeError):
        return DEFAULT_ALIGNMENT
    return value if 0 < value <= 1 << 20 and value & (value - 1) == 0 else DEFAULT_ALIGNMENT


def _read_zip_records(path: Path, buf: Any) -> Checkpoint:
    from .readers.torchzip import read_torch_zip

    return read_torch_zip(path, ZipArchive(path, buf))


def _read_legacy_records(path: Path, buf: Any) -> Checkpoint:
    from .readers.legacy import read_legacy_mapped

    return read_legacy_mapped(path, buf)


def _read_fd(fh: BinaryIO, path: Path, read: Callable[[Path, Any], Checkpoint]) -> Checkpoint:
    """Read back what was just written (the temp file, through its descriptor)."""
    try:
        written = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:
        raise SaveError(f"cannot read back the new file: {exc}", path) from exc
    try:
        return read(path, written)
    except MscopeError as exc:
        raise SaveError(f"the new file does not read back: {exc.message}", path) from exc
    finally:
        written.close()


def _records(ckpt: Checkpoint) -> list[tuple]:
    return [
        (
            t.section,
            t.name,
            t.shape,
            t.dtype,
            t.stride,
            t.storage_offset,
            t.requires_grad,
            t.kind,
            t.note,
            t.storage.key if t.storage is not None else None,
            t.storage.numel if t.storage is not None else None,
        )  # fmt: skip
        for t in ckpt.tensors
    ]


def _verify_remap(
    old: Checkpoint, new: Checkpoint, remap: Callable[[str], str | None], path: Path
) -> None:
    same = (
        _records(old) == _records(new)
        and (old.kind, old.model_path) == (new.kind, new.model_path)
        and [(e.path, e.type, e.value) for e in old.entries]
        == [(e.path, e.type, e.value) for e in new.entries]
        and [(g.qualname, g.count) for g in old.globals]
        == [(g.qualname, g.count) for g in new.globals]
    )
    if not same:
        raise SaveError(
            "the new file does not describe the same tensors; nothing was written", path
        )
    for a, b in zip(old.tensors, new.tensors):
        if a.storage is None or b.storage is None:
            continue
        if b.storage.location != (remap(a.storage.location) or a.storage.location):
            raise SaveError(
                f"storage {a.storage.key!r} did not get its new location; nothing was written", path
            )


# ----------------------------------------------------------------------------------------------
# Cast the model part
# ----------------------------------------------------------------------------------------------
CAST_TARGETS = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}  # fmt: skip
_TAGS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
FORMATS = ("torch", "safetensors")
CHUNK_BYTES = 16 << 20
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
TIED_METADATA_KEY = "mscope.tied"


@dataclass(eq=False, slots=True)
class CastBlock:
    """One run of output bytes: a storage in a torch file, a tensor's data in safetensors."""

    source: TensorRecord  # what to read (a model tensor, or the span of a shared storage)
    src_dtype: str
    dtype: str  # output dtype
    numel: int
    key: str = ""

    @property
    def cast(self) -> bool:
        return self.dtype != self.src_dtype

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_ITEMSIZE[self.dtype]

    @property
    def nbytes_before(self) -> int:
        return self.numel * DTYPE_ITEMSIZE[self.src_dtype]


@dataclass(slots=True)
class CastTensor:
    name: str
    block: CastBlock
    offset: int  # in elements of the block
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    alias_of: str | None = None  # the name it was tied to in the source (same storage and view)


@dataclass
class CastPlan:
    """What `cast_copy` writes: tensors in the source's order, and the blocks holding their bytes."""

    fmt: str
    dtype: str
    tensors: list[CastTensor] = field(default_factory=list)
    blocks: list[CastBlock] = field(default_factory=list)

    @property
    def bytes_before(self) -> int:
        return sum(b.nbytes_before for b in self.blocks)

    @property
    def bytes_after(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    @property
    def tensors_changed(self) -> int:
        return sum(1 for t in self.tensors if t.block.cast)


def preview_cast(
    ckpt: Checkpoint, dtype: str, names: Iterable[str] | None = None, fmt: str | None = None
) -> tuple[int, int, int]:
    """(bytes before, bytes after, tensors changed) for `cast_copy` with the same arguments.

    Bytes are the tensor bytes of the output file (its storages for torch, with tied tensors
    once; each tensor for safetensors, which clones tied ones), in the source's dtypes and in the
    cast ones. Reads no tensor bytes and imports no torch.
    """
    plan = plan_cast(ckpt, dtype, names, fmt)
    return plan.bytes_before, plan.bytes_after, plan.tensors_changed


def cast_copy(
    ckpt: Checkpoint,
    dtype: str,
    names: Iterable[str] | None = None,
    dest: str | os.PathLike | None = None,
    fmt: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the model part of `ckpt` as a state dict with floating-point tensors cast to `dtype`.

    dtype: "float32", "bfloat16" or "float16". names: only these model tensors (a tensor tied to
    a chosen one is cast with it, so ties stay); complex, integer and bool tensors never change.
    fmt: "safetensors" or "torch" (a torch.save zip); default: safetensors for safetensors
    sources, torch otherwise. Tied tensors stay one storage in torch files; safetensors refuses
    shared tensors, so there each gets its own copy and `__metadata__["mscope.tied"]` (JSON)
    maps every copy to the name it was tied to. Default destination: `model.bf16.pt` (or
    `.safetensors`) next to the source. Full modules and TorchScript are refused.
    """
    plan = plan_cast(ckpt, dtype, names, fmt)
    source = Path(ckpt.path)
    if dest is None:
        dest = _default_cast_dest(ckpt, plan)
    dest = Path(dest)
    _preflight(plan, source)
    files = {Path(b.source.storage.file) for b in plan.blocks if b.source.storage is not None}
    before = _file_state(files)
    _check_current(ckpt, source)
    metadata = _safetensors_metadata(ckpt, plan) if plan.fmt == "safetensors" else None

    def write(fh: BinaryIO) -> None:
        from .values.data import TensorData

        try:
            with TensorData() as data:
                if plan.fmt == "safetensors":
                    _write_safetensors(fh, plan, data, metadata or {})
                else:
                    _write_torch(fh, plan, data)
        except MscopeError as exc:
            raise _as_save_error(exc, source) from exc
        except RuntimeError as exc:  # torch refusing a conversion or a view
            raise SaveError(f"cast failed: {' '.join(str(exc).split())[:120]}", source) from exc
        _check_unchanged(before)

    return atomic_write(dest, write, overwrite=overwrite)


def _check_current(ckpt: Checkpoint, path: Path) -> None:
    """The records still describe the file (tensor bytes are read at the offsets they give)."""
    from .readers import open_checkpoint

    try:
        fresh = open_checkpoint(ckpt.path, strict=False)
    except MscopeError as exc:
        raise SaveError(f"cannot read the source again: {exc.message}", path) from exc

    def layout(c: Checkpoint) -> list[tuple]:
        return [
            (
                t.name,
                t.shape,
                t.dtype,
                t.stride,
                t.storage_offset,
                t.storage.file,
                t.storage.data_offset,
            )
            if t.storage is not None
            else (t.name,)
            for t in c.model_tensors
        ]

    if layout(fresh) != layout(ckpt):
        raise SaveError("the file changed since it was opened", path, "reopen it and try again")


def plan_cast(
    ckpt: Checkpoint, dtype: str, names: Iterable[str] | None = None, fmt: str | None = None
) -> CastPlan:
    """The output of `cast_copy` without writing it (raises SaveError for unsupported input)."""
    path = Path(ckpt.path)
    target = CAST_TARGETS.get(str(dtype).removeprefix("torch.")) if dtype is not None else None
    if target is None:
        raise SaveError(
            f"cannot cast to {str(dtype)[:40]!r}; choose float32, bfloat16 or float16", path
        )
    fmt = _output_format(ckpt, fmt)
    if ckpt.format == "torchscript" or ckpt.kind == "torchscript":
        raise SaveError(
            "TorchScript archives cannot be cast here",
            path,
            "cast the scripted module in Python and save it",
        )
    if ckpt.module_root is not None:
        raise SaveError(
            "the model is a pickled nn.Module (full module); only state dicts are cast",
            path,
            "load it, call .to(dtype) and save it, or save its state_dict and cast that",
        )
    records = ckpt.model_tensors
    if not records:
        raise SaveError("the file holds no model tensors to cast", path)
    selected = _selected_names(names, records, path)
    groups: dict[int, list[TensorRecord]] = {}
    for r in records:
        _check_readable(r, path)
        groups.setdefault(id(r.storage), []).append(r)
    plan = CastPlan(fmt, target)
    blocks_of: dict[int, CastBlock] = {}  # torch: per storage
    placement: dict[int, tuple[int, tuple[int, ...], tuple[int, ...]]] = {}  # id(record) -> view
    out_dtype: dict[int, str] = {}
    for sid, group in groups.items():
        src = group[0].dtype
        if any(r.dtype != src for r in group):
            raise SaveError(
                f"tensors sharing the storage of {group[0].name!r} have different dtypes", path
            )
        chosen = selected is None or any(r.name in selected for r in group)
        out_dtype[sid] = target if chosen and src in FLOATING_DTYPES else src
        if fmt == "safetensors":
            continue
        views = {(r.storage_offset, r.shape, r.stride) for r in group if r.numel}
        if len(views) <= 1:
            head = next((r for r in group if r.numel), group[0])
            blocks_of[sid] = CastBlock(head, src, out_dtype[sid], head.numel)
            for r in group:
                placement[id(r)] = (0, r.shape, contiguous_stride(r.shape))
            continue
        # Different views of one storage (e.g. slices of a fused weight): keep them one storage,
        # holding just the elements from the first one any view reads to the last.
        lo = min(r.storage_offset for r in group if r.numel)
        hi = max(_last_element(r) + 1 for r in group if r.numel)
        span = TensorRecord(
            group[0].name, (hi - lo,), src, (1,), lo, group[0].storage, section=group[0].section
        )
        blocks_of[sid] = CastBlock(span, src, out_dtype[sid], hi - lo)
        for r in group:
            placement[id(r)] = (r.storage_offset - lo if r.numel else 0, r.shape, r.stride)
    seen: dict[int, CastBlock] = {}
    for r in records:
        sid = id(r.storage)
        if fmt == "safetensors":
            block = CastBlock(r, r.dtype, out_dtype[sid], r.numel)
            tensor = CastTensor(r.name, block, 0, r.shape, contiguous_stride(r.shape), r.alias_of)
        else:
            block = blocks_of[sid]
            offset, shape, stride = placement[id(r)]
            tensor = CastTensor(r.name, block, offset, shape, stride, r.alias_of)
        if id(block) not in seen:
            seen[id(block)] = block
            block.key = str(len(plan.blocks))
            plan.blocks.append(block)
        plan.tensors.append(tensor)
    return plan


def _selected_names(
    names: Iterable[str] | None, records: list[TensorRecord], path: Path
) -> set[str] | None:
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    selected = set(names)
    known = {r.name for r in records}
    unknown = sorted(n for n in selected if n not in known)
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise SaveError(f"{str(unknown[0])[:80]!r} is not a tensor of the model{more}", path)
    return selected


def _check_readable(r: TensorRecord, path: Path) -> None:
    from .values.data import UNLOADABLE_DTYPES

    s = r.storage
    if r.note is not None or s is None:
        raise SaveError(f"tensor {r.name!r} ({r.note or 'no storage'}) cannot be copied", path)
    if r.dtype not in DTYPE_ITEMSIZE or r.dtype in UNLOADABLE_DTYPES:
        raise SaveError(f"tensor {r.name!r} is {r.dtype}, which cannot be copied", path)
    if s.file is None or s.data_offset is None:
        raise SaveError(f"the bytes of tensor {r.name!r} are missing from the file", path)
    if s.compressed:
        raise SaveError(
            f"the bytes of tensor {r.name!r} are compressed in the archive",
            path,
            "re-save it with torch",
        )


def _last_element(r: TensorRecord) -> int:
    return r.storage_offset + sum((n - 1) * st for n, st in zip(r.shape, r.stride))


def _output_format(ckpt: Checkpoint, fmt: str | None) -> str:
    if fmt is None:
        return "safetensors" if ckpt.format in ("safetensors", "sharded-safetensors") else "torch"
    value = {"pt": "torch", "torch-zip": "torch", "st": "safetensors"}.get(fmt, fmt)
    if value not in FORMATS:
        raise SaveError(
            f"unknown output format {str(fmt)[:30]!r}; choose torch or safetensors", ckpt.path
        )
    return value


def _default_cast_dest(ckpt: Checkpoint, plan: CastPlan) -> Path:
    path = Path(ckpt.path)
    tag = _TAGS[plan.dtype]
    if plan.fmt == "safetensors":
        suffix = ".safetensors"
    else:
        suffix = path.suffix if path.suffix in _TORCH_SUFFIXES else ".pt"
    if path.is_dir():  # a DCP or sharded directory: a file next to it
        return sibling_path(path.with_name(path.name + suffix), tag)
    if ckpt.format.startswith("sharded") or path.name.endswith(".index.json"):
        stem = path.name.split(".", 1)[0] or "model"
        return sibling_path(path.with_name(stem + suffix), tag)
    return sibling_path(
        path.with_name(path.name[: len(path.name) - len(path.suffix)] + suffix), tag
    )


def _preflight(plan: CastPlan, path: Path) -> None:
    """Fail before any file exists: every dtype readable and each conversion supported by torch."""
    import torch

    from .errors import TensorDataError
    from .values.data import torch_dtype

    pairs = {(b.src_dtype, b.dtype) for b in plan.blocks}
    for src, dst in pairs:
        try:
            a, b = torch_dtype(src), torch_dtype(dst)
            if a != b:
                torch.zeros(1, dtype=a).to(b)
        except TensorDataError as exc:
            raise SaveError(exc.message, path) from exc
        except (RuntimeError, TypeError) as exc:
            raise SaveError(f"torch cannot cast {src} to {dst}", path) from exc
    if plan.fmt == "safetensors":
        from .readers.safetensors import SAFETENSORS_DTYPES

        codes = {v: k for k, v in SAFETENSORS_DTYPES.items()}
        for t in plan.tensors:
            if t.block.dtype not in codes:
                raise SaveError(
                    f"safetensors has no dtype for {t.name!r} ({t.block.dtype})",
                    path,
                    "write a torch file",
                )


def _block_chunks(data: Any, block: CastBlock) -> Iterator[memoryview]:
    """The block's output bytes, cast, in pieces of at most CHUNK_BYTES of the source."""
    import torch

    target = getattr(torch, block.dtype)
    for chunk in data.chunks(block.source, CHUNK_BYTES):
        if block.cast:
            chunk = chunk.to(target)
        piece = chunk.contiguous()
        n = piece.numel() * piece.element_size()
        if n:
            # A zero-copy view of the tensor's memory; `piece` stays alive until the next step.
            yield memoryview((ctypes.c_char * n).from_address(piece.data_ptr())).cast("B")


def _write_blocks(sink: Callable[[memoryview], None], data: Any, block: CastBlock) -> int:
    written = 0
    for piece in _block_chunks(data, block):
        sink(piece)
        written += len(piece)
    if written != block.nbytes:
        raise SaveError(
            f"tensor {block.source.name!r} came out {written:,} bytes, not {block.nbytes:,}"
        )
    return written


def _state_dict_pickle(plan: CastPlan) -> bytes:
    """data.pkl of a state dict, as torch.save writes it (protocol 2, `_rebuild_tensor_v2` with
    typed storages; `_rebuild_tensor_v3` with an untyped storage for dtypes without one)."""
    import io
    import pickle
    from collections import OrderedDict

    import torch
    import torch._utils

    storage_types = torch.storage._dtype_to_storage_type_map()

    class StorageRef:
        __slots__ = ("pid",)

    class TensorOut:
        __slots__ = ("reduce",)

        def __reduce_ex__(self, protocol: int) -> Any:
            return self.reduce

    refs: dict[int, StorageRef] = {}
    out: OrderedDict[str, TensorOut] = OrderedDict()
    for t in plan.tensors:
        block = t.block
        dtype = getattr(torch, block.dtype)
        typed = storage_types.get(dtype)
        ref = refs.get(id(block))
        if ref is None:
            ref = refs[id(block)] = StorageRef()
            if typed is not None:
                ref.pid = ("storage", getattr(torch, typed), block.key, "cpu", block.numel)
            else:
                ref.pid = ("storage", torch.UntypedStorage, block.key, "cpu", block.nbytes)
        args: tuple = (ref, t.offset, tuple(t.shape), tuple(t.stride), False, OrderedDict())
        tensor = TensorOut()
        if typed is not None:
            tensor.reduce = (torch._utils._rebuild_tensor_v2, args)
        else:
            tensor.reduce = (torch._utils._rebuild_tensor_v3, (*args, dtype))
        out[t.name] = tensor

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return obj.pid if type(obj) is StorageRef else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(out)
    return buf.getvalue()


def _write_torch(fh: BinaryIO, plan: CastPlan, data: Any) -> None:
    zw = TorchZipWriter(fh, DEFAULT_ALIGNMENT)
    prefix = "archive/"
    zw.add(prefix + "data.pkl", _state_dict_pickle(plan))
    zw.add(prefix + ".format_version", b"1")
    zw.add(prefix + ".storage_alignment", str(DEFAULT_ALIGNMENT).encode())
    zw.add(prefix + "byteorder", sys.byteorder.encode())
    for block in plan.blocks:
        zw.begin(f"{prefix}data/{block.key}", block.nbytes)
        _write_blocks(zw.write, data, block)
        zw.end()
    zw.add(prefix + "version", b"3\n")
    zw.add(prefix + ".data/serialization_id", f"{uuid.uuid4().int:040d}"[:40].encode())
    zw.finish()


def _safetensors_metadata(ckpt: Checkpoint, plan: CastPlan) -> dict[str, str]:
    metadata: dict[str, str] = {}
    source = ckpt.metadata.get("safetensors_metadata")
    if isinstance(source, dict):
        metadata.update(
            {k: v for k, v in source.items() if isinstance(k, str) and isinstance(v, str)}
        )
    metadata.setdefault("format", "pt")
    metadata.pop(TIED_METADATA_KEY, None)
    tied = {t.name: t.alias_of for t in plan.tensors if t.alias_of is not None}
    if tied:
        metadata[TIED_METADATA_KEY] = compact_json(tied)
    return metadata


def _write_safetensors(fh: BinaryIO, plan: CastPlan, data: Any, metadata: dict[str, str]) -> None:
    from .readers.safetensors import SAFETENSORS_DTYPES

    codes = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in plan.tensors:
        size = t.block.nbytes
        header[t.name] = {
            "dtype": codes[t.block.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json_bytes(header, separators=(",", ":"))
    raw += b" " * (-len(raw) % 8)
    fh.write(struct.pack("<Q", len(raw)) + raw)
    for t in plan.tensors:
        _write_blocks(fh.write, data, t.block)
