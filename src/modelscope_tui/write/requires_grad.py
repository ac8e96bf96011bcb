"""A copy of a full-module checkpoint whose parameters load with other requires_grad flags.

Byte patches, never a re-pickle: the file is copied and only the flag bytes of the changed
parameters are rewritten (plus data.pkl's CRC-32, in every place a zip stores it), so tensors,
globals, memo and layout stay byte-identical. Where a flag cannot be located exactly, nothing is
written and the user is told to save a freeze plan instead.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..checkpoint import PARAMETER, Checkpoint, Format, TensorRecord, can_require_grad
from ..errors import MscopeError
from ..readers.pickle.patch import PicklePatchError, TensorRebuild, scan_tensor_rebuilds
from ..readers.pickle.scan import scan_pickle
from ..readers.torchzip import archive_prefix
from ..readers.ziparchive import STORED, ZipArchive, ZipEntry
from .atomic import SaveError, atomic_write, copy_range, local_source, sibling_path, write_all
from .zipwriter import CENTRAL, EOCD, EOCD64, EOCD64_LOCATOR, FLAG_DESCRIPTOR

PATCHABLE_FORMATS = (Format.TORCH_ZIP, Format.TORCH_LEGACY, Format.TORCHSCRIPT)


@dataclass(slots=True)
class BytePatch:
    """Replace `old` at absolute file offset `offset` with `new` (same length)."""

    offset: int
    old: bytes
    new: bytes
    what: str = ""


@dataclass(slots=True)
class RequiresGradPatch:
    """Everything a save changes: flag bytes (and, in zips, the CRC fields of data.pkl)."""

    source: Path
    patches: list[BytePatch] = field(default_factory=list)
    changed: dict[str, bool] = field(default_factory=dict)  # parameter name -> new requires_grad
    member: str | None = None  # the patched archive member, for zips


def save_with_requires_grad(
    ckpt: Checkpoint,
    trainable: Mapping[str, bool],
    dest: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a copy of `ckpt`'s file whose parameters load with `requires_grad = trainable[name]`.

    Works for full-module pickles (`torch.save(model)`, zip and legacy formats) and TorchScript
    archives. The file is copied and only the flag bytes of the changed parameters are rewritten
    (plus data.pkl's CRC-32 in zips): tensors, globals, memo, layout and every other archive
    member stay byte-identical. Names missing from `trainable` keep their saved flag (a tied
    alias follows its first name). Default destination: `model.frozen.pt` next to the source.
    """
    source = local_source(ckpt.path)
    dest = Path(dest) if dest is not None else sibling_path(source, "frozen")
    _check_patchable(ckpt)
    try:
        src = open(source, "rb")
    except OSError as exc:
        raise SaveError(f"cannot read the source: {exc.strerror or exc}", source) from exc
    with src:
        before = os.fstat(src.fileno())
        plan = plan_requires_grad(ckpt, trainable, src)

        def write(fh: BinaryIO) -> None:
            _copy_with_patches(src.fileno(), fh, before.st_size, plan.patches, source)
            after = os.fstat(src.fileno())
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                raise SaveError("the source changed while it was being copied", source, "try again")
            try:
                os.fchmod(fh.fileno(), stat.S_IMODE(before.st_mode))
            except OSError:
                pass

        return atomic_write(dest, write, overwrite=overwrite)


def plan_requires_grad(
    ckpt: Checkpoint, trainable: Mapping[str, bool], src: BinaryIO | None = None
) -> RequiresGradPatch:
    """The byte patches `save_with_requires_grad` would apply (raises SaveError if unsafe)."""
    _check_patchable(ckpt)
    if src is None:
        with open(local_source(ckpt.path), "rb") as fh:
            return plan_requires_grad(ckpt, trainable, fh)
    wanted = _wanted_flags(ckpt, trainable)
    try:
        buf = mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:
        raise SaveError(f"cannot read the source: {exc}", ckpt.path) from exc
    try:
        if ckpt.format == Format.TORCH_LEGACY:
            return _plan_legacy(ckpt, wanted, buf)
        return _plan_zip(ckpt, wanted, buf)
    finally:
        buf.close()


def _check_patchable(ckpt: Checkpoint) -> None:
    if ckpt.format not in PATCHABLE_FORMATS:
        raise SaveError(
            f"a {ckpt.format} file stores no requires_grad flags",
            ckpt.path,
            "save a freeze plan instead",
        )
    if ckpt.format != Format.TORCHSCRIPT and ckpt.module_root is None:
        raise SaveError(
            "this file holds a state_dict, which stores no requires_grad flags",
            ckpt.path,
            "save a freeze plan instead",
        )


def _wanted_flags(
    ckpt: Checkpoint, trainable: Mapping[str, bool]
) -> dict[int, tuple[bool, list[str]]]:
    """pickle_seq -> (requires_grad wanted, names) for every model parameter the mapping decides."""
    for name, value in trainable.items():
        record = ckpt.tensor(name)
        if record is None or record.kind != PARAMETER:
            raise SaveError(f"{name!r} is not a parameter of this model", ckpt.path)
        if value and not can_require_grad(record.dtype):
            raise SaveError(
                f"parameter {name!r} is {record.dtype}; only floating-point tensors can require grad",
                ckpt.path,
            )
    wanted: dict[int, tuple[bool, list[str]]] = {}
    for record in ckpt.model_tensors:
        if record.kind != PARAMETER:
            continue
        value = trainable.get(record.name)
        if value is None and record.alias_of is not None:
            value = trainable.get(record.alias_of)
        if value is None:
            continue
        if record.pickle_seq is None:
            raise SaveError(
                f"cannot tell where parameter {record.name!r} sits in the file", ckpt.path
            )
        value = bool(value)
        previous = wanted.get(record.pickle_seq)
        if previous is not None and previous[0] != value:
            raise SaveError(
                f"{previous[1][0]!r} and {record.name!r} are one parameter; they cannot differ in requires_grad",
                ckpt.path,
            )
        wanted.setdefault(record.pickle_seq, (value, []))[1].append(record.name)
    return wanted


def _pickle_records(ckpt: Checkpoint) -> list[TensorRecord]:
    """The records that came from the main pickle (data.pkl), one per tensor object, in creation order."""
    by_seq: dict[int, TensorRecord] = {}
    for record in ckpt.tensors:
        if ckpt.format == Format.TORCHSCRIPT and record.section == "constants":
            continue
        if record.pickle_seq is not None:
            by_seq.setdefault(record.pickle_seq, record)
    return [by_seq[s] for s in sorted(by_seq)]


def _record_signature(record: TensorRecord) -> tuple:
    key = record.storage.key if record.storage is not None else None
    return (key, record.storage_offset, tuple(record.shape), tuple(record.stride))


def _align(
    ckpt: Checkpoint, records: list[TensorRecord], rebuilds: list[TensorRebuild]
) -> dict[int, TensorRebuild]:
    """pickle_seq -> rebuild. seq - ordinal is one constant per pickle; find it and check every
    tensor's storage, offset, shape and stride (and saved flag) against the stream."""
    if not records:
        return {}
    first = records[0].pickle_seq
    assert first is not None
    signatures = [_record_signature(r) for r in records]
    for k in range(len(rebuilds)):
        base = first - k
        matched: dict[int, TensorRebuild] = {}
        for record, signature in zip(records, signatures):
            ordinal = record.pickle_seq - base  # type: ignore[operator]
            if ordinal >= len(rebuilds):
                break
            rebuild = rebuilds[ordinal]
            if rebuild.signature != signature:
                break
            matched[record.pickle_seq] = rebuild  # type: ignore[index]
        else:
            return matched
    # Readers on other threads can interleave creation counters; then match by order alone,
    # and only when the match is unique.
    matched = _unique_embedding(records, signatures, rebuilds)
    if matched is not None:
        return matched
    raise SaveError(
        "the file's tensors do not match what was read (was it changed since it was opened?)",
        ckpt.path,
        "reopen the file and save again",
    )


def _unique_embedding(
    records: list[TensorRecord], signatures: list[tuple], rebuilds: list[TensorRebuild]
) -> dict[int, TensorRebuild] | None:
    """Records are a subsequence of the rebuilds (same order). The earliest and the latest
    embedding bound every other one; when they agree the embedding is unique."""
    n, m = len(signatures), len(rebuilds)
    earliest, j = [], 0
    for sig in signatures:
        while j < m and rebuilds[j].signature != sig:
            j += 1
        if j == m:
            return None
        earliest.append(j)
        j += 1
    latest, j = [0] * n, m - 1
    for i in range(n - 1, -1, -1):
        while j >= 0 and rebuilds[j].signature != signatures[i]:
            j -= 1
        latest[i] = j
        j -= 1
    if earliest != latest:
        return None
    return {r.pickle_seq: rebuilds[k] for r, k in zip(records, earliest)}  # type: ignore[misc]


def _flag_patches(
    ckpt: Checkpoint,
    wanted: dict[int, tuple[bool, list[str]]],
    pickle: bytes,
    base: int,
    source: str,
) -> tuple[list[BytePatch], dict[str, bool]]:
    """Flag patches (absolute offsets) for the pickle that starts at file offset `base`."""
    try:
        scan = scan_tensor_rebuilds(pickle, source)
    except PicklePatchError as exc:
        raise SaveError(exc.message, ckpt.path) from exc
    records = _pickle_records(ckpt)
    matched = _align(ckpt, records, scan.tensors)
    by_seq = {r.pickle_seq: r for r in records}
    patches: list[BytePatch] = []
    changed: dict[str, bool] = {}
    for seq, (value, names) in sorted(wanted.items()):
        rebuild = matched.get(seq)
        if rebuild is None:
            raise SaveError(f"cannot find parameter {names[0]!r} in the pickle", ckpt.path)
        saved = rebuild.loaded_requires_grad()
        record = by_seq[seq]
        if saved is not None and saved != record.requires_grad:
            raise SaveError(
                f"the saved flag of {names[0]!r} does not match what was read",
                ckpt.path,
                "reopen the file",
            )
        if (record.requires_grad if saved is None else saved) == value:
            continue  # already as wanted (a non-literal flag is taken as the reader read it)
        flag = rebuild.controlling_flag()
        if flag is None:
            raise SaveError(
                f"cannot locate the requires_grad flag of {names[0]!r} in the pickle",
                ckpt.path,
                "nothing was written; save a freeze plan instead",
            )
        old = bytes(pickle[flag.pos : flag.pos + len(flag.current())])
        if old != flag.current():
            raise SaveError(
                f"unexpected bytes at the requires_grad flag of {names[0]!r}", ckpt.path
            )
        patches.append(BytePatch(base + flag.pos, old, flag.encode(value), names[0]))
        for name in names:
            changed[name] = value
    return patches, changed


def _plan_legacy(
    ckpt: Checkpoint, wanted: dict[int, tuple[bool, list[str]]], buf: mmap.mmap
) -> RequiresGradPatch:
    source = ckpt.path.name
    try:
        pos = 0
        for _ in range(3):  # magic number, protocol version, sys_info
            pos = scan_pickle(buf, pos, source)
        end = scan_pickle(buf, pos, source)
    except MscopeError as exc:
        raise SaveError(exc.message, ckpt.path) from exc
    patches, changed = _flag_patches(ckpt, wanted, bytes(buf[pos:end]), pos, source)
    return RequiresGradPatch(ckpt.path, patches, changed)


def _plan_zip(
    ckpt: Checkpoint, wanted: dict[int, tuple[bool, list[str]]], buf: mmap.mmap
) -> RequiresGradPatch:
    path = ckpt.path
    try:
        archive = ZipArchive(path, buf)
    except MscopeError as exc:
        raise SaveError(exc.message, path) from exc
    prefix = archive_prefix(archive)
    member = f"{prefix}data.pkl" if prefix is not None else None
    entry = archive.entries.get(member) if member else None
    if member is None or entry is None:
        raise SaveError("archive has no data.pkl", path)
    if member in archive.duplicates:
        raise SaveError(
            f"archive holds {member!r} twice", path, "the file is ambiguous; re-save it with torch"
        )
    if entry.method != STORED or entry.size != entry.compressed_size:
        raise SaveError(f"{member!r} is compressed; it cannot be patched in place", path)
    try:
        start = archive.data_offset(entry)
    except MscopeError as exc:
        raise SaveError(exc.message, path) from exc
    pickle = bytes(buf[start : start + entry.size])  # a copy: no view outlives the mmap
    old_crc = zlib.crc32(pickle) & 0xFFFFFFFF
    if old_crc != entry.crc:
        raise SaveError(f"{member!r} fails its CRC check", path, "the file is corrupt")
    patches, changed = _flag_patches(ckpt, wanted, pickle, start, f"{path.name}:{member}")
    plan = RequiresGradPatch(path, patches, changed, member)
    if not patches:
        return plan
    patched = bytearray(pickle)
    for p in patches:
        patched[p.offset - start : p.offset - start + len(p.new)] = p.new
    new_crc = zlib.crc32(patched) & 0xFFFFFFFF
    plan.patches.extend(_crc_patches(buf, path, entry, member, start, old_crc, new_crc))
    return plan


def _crc_patches(
    buf: mmap.mmap, path: Path, entry: ZipEntry, member: str, start: int, old: int, new: int
) -> list[BytePatch]:
    """Every copy of the member's CRC-32: local header, data descriptor, central directory."""
    old_b, new_b = _U32.pack(old), _U32.pack(new)
    out: list[BytePatch] = []
    local = entry.header_offset + 14
    flags = _U16.unpack_from(buf, entry.header_offset + 6)[0]
    if buf[local : local + 4] == old_b:
        out.append(BytePatch(local, old_b, new_b, "local header CRC"))
    elif not (flags & FLAG_DESCRIPTOR and buf[local : local + 4] == b"\0\0\0\0"):
        raise SaveError(f"local header of {member!r} has an unexpected CRC", path)
    if flags & FLAG_DESCRIPTOR:
        pos = start + entry.compressed_size
        if buf[pos : pos + 4] == b"PK\x07\x08":
            pos += 4
        if buf[pos : pos + 4] != old_b:
            raise SaveError(f"data descriptor of {member!r} not found", path)
        out.append(BytePatch(pos, old_b, new_b, "data descriptor CRC"))
    central = _central_entries(buf, member.encode("utf-8"))
    if len(central) != 1:
        raise SaveError(f"central directory lists {member!r} {len(central)} times", path)
    pos = central[0] + 16
    if buf[pos : pos + 4] != old_b:
        raise SaveError(f"central directory CRC of {member!r} does not match its data", path)
    out.append(BytePatch(pos, old_b, new_b, "central directory CRC"))
    return out


_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


def _central_entries(buf: mmap.mmap, name: bytes) -> list[int]:
    """Offsets of the central directory entries named `name` (zip64 aware)."""
    size = len(buf)
    eocd = buf.rfind(b"PK\x05\x06", max(0, size - EOCD.size - 0xFFFF))
    if eocd < 0:
        return []
    _, _, _, _, count, cd_size, cd_offset, _ = EOCD.unpack_from(buf, eocd)
    locator = eocd - EOCD64_LOCATOR.size
    if locator >= 0 and buf[locator : locator + 4] == b"PK\x06\x07":
        eocd64 = EOCD64_LOCATOR.unpack_from(buf, locator)[2]
        fields = EOCD64.unpack_from(buf, eocd64)
        count, cd_size, cd_offset = fields[7], fields[8], fields[9]
    found = []
    pos = cd_offset
    end = min(size, cd_offset + cd_size)
    for _ in range(count):
        if pos + CENTRAL.size > end:
            break
        fields = CENTRAL.unpack_from(buf, pos)
        if fields[0] != b"PK\x01\x02":
            break
        nlen, xlen, clen = fields[10], fields[11], fields[12]
        if buf[pos + CENTRAL.size : pos + CENTRAL.size + nlen] == name:
            found.append(pos)
        pos += CENTRAL.size + nlen + xlen + clen
    return found


def _copy_with_patches(
    src_fd: int, fh: BinaryIO, size: int, patches: list[BytePatch], source: Path
) -> None:
    """Copy the source into `fh`, writing each patch's bytes in place of the old ones."""
    fh.flush()
    dst_fd = fh.fileno()
    pos = 0
    for patch in sorted(patches, key=lambda p: p.offset):
        copy_range(src_fd, dst_fd, pos, patch.offset - pos)
        if os.pread(src_fd, len(patch.old), patch.offset) != patch.old:
            raise SaveError("the source changed while it was being copied", source, "try again")
        write_all(dst_fd, patch.new)
        pos = patch.offset + len(patch.new)
    copy_range(src_fd, dst_fd, pos, size - pos)
    if os.fstat(dst_fd).st_size != size:
        raise SaveError("the copy came out the wrong size", source, "nothing was changed")
