"""A copy of a checkpoint whose storages say they live on another device (`remap_locations`).

The fix for "Attempting to deserialize object on a CUDA device" on machines without that device.
Only the location strings of the storages' persistent ids change in the pickle (the opcode walk
in `readers.pickle.patch`; nothing is unpickled for real); every other archive member is copied
byte for byte into a zip laid out as torch's own writer lays it out (zipwriter.py). The new file
is read back and compared with the source before atomic_write renames it into place.
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from ..checkpoint import Checkpoint, Format
from ..errors import MscopeError
from ..readers.pickle.patch import PicklePatchError, rewrite_storage_locations
from ..readers.pickle.scan import scan_pickle
from ..readers.torchzip import MAX_PICKLE_BYTES, archive_prefix, is_torchscript
from ..readers.ziparchive import DEFLATED, STORED, ZipArchive
from .atomic import (
    SaveError,
    as_save_error,
    atomic_write,
    check_unchanged,
    copy_range,
    file_state,
    keep_mode,
    local_source,
    sibling_path,
)
from .zipwriter import DEFAULT_ALIGNMENT, TorchZipWriter

REMAP_FORMATS = (Format.TORCH_ZIP, Format.TORCH_LEGACY)
_DEVICE = re.compile(r"[a-z][a-z0-9_]*(:[0-9]{1,4})?")


def _check_device(value: Any, path: Path) -> str:
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        raise SaveError(f"{str(value)[:40]!r} is not a device name (like 'cpu' or 'cuda:0')", path)
    return value


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
    `readers.pickle.patch.rewrite_storage_locations` for the one exception: a persistent id tuple that
    is itself read elsewhere). Every other member is copied byte for byte; the zip is rebuilt
    as torch writes it, each member's data aligned to the archive's `.storage_alignment` (64).
    Default destination: `model.cpu.pt` next to the source.
    """
    source = local_source(ckpt.path)
    remap = _location_remap(mapping, source)
    if ckpt.format == Format.TORCHSCRIPT:
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
        before = file_state([source])
        try:
            buf = mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise SaveError(f"cannot read the source: {exc}", source) from exc
        try:
            if ckpt.format == Format.TORCH_LEGACY:
                write = _remap_legacy(source, src.fileno(), buf, remap)
            else:
                write = _remap_zip(source, src.fileno(), buf, remap)

            def write_checked(fh: BinaryIO) -> None:
                write(fh)
                check_unchanged(before)
                keep_mode(fh, source)

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
        raise as_save_error(exc, path) from exc
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
        raise as_save_error(exc, path) from exc
    new_pickle = _rewrite(pickle, remap, path, f"{path.name}:{member}")
    alignment = _storage_alignment(archive, prefix)
    physical = sorted(entries, key=lambda e: e.header_offset)
    try:
        reference = _read_zip_records(path, buf)
    except MscopeError as exc:
        raise as_save_error(exc, path) from exc

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
        raise as_save_error(exc, path) from exc
    new_pickle = _rewrite(bytes(buf[start:end]), remap, path, source)
    size = len(buf)
    try:
        reference = _read_legacy_records(path, buf)
    except MscopeError as exc:
        raise as_save_error(exc, path) from exc

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
    from ..readers.torchzip import read_torch_zip

    return read_torch_zip(path, ZipArchive(path, buf))


def _read_legacy_records(path: Path, buf: Any) -> Checkpoint:
    from ..readers.legacy import read_legacy_mapped

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
