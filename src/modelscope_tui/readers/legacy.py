"""The pre-1.6 torch.save format, and plain pickles.

Legacy layout: pickled magic number, protocol version, sys_info, the object (storages as
persistent ids), the sorted list of storage keys, then per key an int64 element count followed by
the raw bytes. Offsets are computed by walking those headers; no storage is read.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from ..checkpoint import Checkpoint, Format
from ..errors import CorruptCheckpointError
from .pickle.unpickler import safe_load
from .torchzip import StorageTable
from .walk import Walker


def read_legacy(path: Path) -> Checkpoint:
    with open(path, "rb") as fh:
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return read_legacy_mapped(path, buf)
    finally:
        buf.close()


def read_legacy_mapped(path: Path, buf: mmap.mmap) -> Checkpoint:
    source = path.name
    pos = 0
    header: list[object] = []
    header_globals = []  # torch.load unpickles these too: a payload here runs before the model's
    for _ in range(3):  # magic, protocol version, sys_info
        value, refs, pos = safe_load(buf, source=source, start=pos)
        header.append(value)
        header_globals.extend(refs)
    if header[1] != 1001:
        version = header[1] if type(header[1]) is int and header[1].bit_length() < 64 else "?"
        raise CorruptCheckpointError(
            f"unsupported legacy protocol version {version}{_would_call(header_globals)}", path
        )
    sys_info = header[2] if isinstance(header[2], dict) else {}
    if sys_info.get("little_endian") is False:
        byteorder = "big"
    else:
        byteorder = "little"
    storages = StorageTable(path, None, "", byteorder)
    root, globals_, pos = safe_load(buf, source=source, start=pos, persistent_load=_legacy_pid(storages, path))
    keys, key_globals, pos = safe_load(buf, source=source, start=pos)
    ckpt = Checkpoint(path, Format.TORCH_LEGACY, files=[path])
    ckpt.globals = header_globals + globals_ + key_globals
    ckpt.metadata["byteorder"] = byteorder
    ckpt.metadata["sys_info"] = _plain_sys_info(sys_info)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CorruptCheckpointError(f"legacy storage key list is malformed{_would_call(key_globals)}", path)
    size = len(buf)
    order = "<" if byteorder == "little" else ">"
    for key in keys:
        record = storages.records.get(key)
        if pos + 8 > size:
            if record is not None:
                record.data_offset = None
            ckpt.problems.append(f"storage {key!r} is missing: the file ends at byte {size:,}")
            break
        count = struct.unpack_from(order + "q", buf, pos)[0]
        pos += 8
        if record is None:
            ckpt.problems.append(f"storage {key!r} is listed but no tensor uses it")
            break
        if count != record.numel:
            ckpt.problems.append(f"storage {key!r} holds {count:,} elements, the pickle says {record.numel:,}")
        nbytes = max(count, 0) * record.itemsize
        record.data_offset = pos
        record.data_size = max(0, min(nbytes, size - pos))
        pos += nbytes
    Walker(ckpt).walk_root(root)
    return ckpt


def _would_call(refs: list) -> str:
    """`; it would call os.system('touch x')` for the dangerous globals of a refused pickle."""
    calls = [c for r in refs if r.safety == "dangerous" for c in (r.calls or [r.qualname])]
    return f"; it would call {', '.join(calls[:2])}" if calls else ""


def _plain_sys_info(sys_info: dict) -> dict:
    """The header's facts, only as short plain values (it is data from the file like the rest)."""

    def plain(v: object) -> bool:
        if isinstance(v, (bool, str)):
            return len(str(v)) <= 200
        return type(v) is int and v.bit_length() <= 64

    out: dict = {}
    for k, v in list(sys_info.items())[:32]:
        if not isinstance(k, str):
            continue
        if plain(v):
            out[k] = v
        elif isinstance(v, dict):
            out[k] = {ik: iv for ik, iv in list(v.items())[:32] if isinstance(ik, str) and plain(iv)}
    return out


def _legacy_pid(storages: StorageTable, path: Path):
    def load(pid: object):
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            # Full-module legacy saves record each class with its source text (never executed).
            return pid[1]
        if isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage":
            if pid[5] is not None:
                raise CorruptCheckpointError("storage views of the pre-0.4 format are not supported", path)
            pid = pid[:5]
        return storages.load(pid)

    return load


def read_plain_pickle(path: Path, data: bytes | None = None) -> Checkpoint:
    """A pickle not written by torch.save (e.g. `pickle.dump` of numpy weights): entries only.
    `data`: the whole file, already fetched (a remote `path`)."""
    if data is not None:
        root, globals_, end = safe_load(data, source=path.name)
        size = len(data)
    else:
        with open(path, "rb") as fh:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            root, globals_, end = safe_load(buf, source=path.name)
            size = len(buf)
        finally:
            buf.close()
    ckpt = Checkpoint(path, Format.PICKLE, files=[path])
    ckpt.globals = globals_
    if type(root) is int:
        # torch.save's legacy layout starts with a pickled magic number; torch.load reads any
        # pickle that way and refuses a wrong one. A damaged legacy file must not pass as a
        # one-number pickle.
        ckpt.refusals.append(
            f"torch.load refuses this file: it starts with the number {root if root.bit_length() < 128 else '(huge)'}, "
            f"not torch.save's magic number{f', and {size - end:,} more bytes follow' if size > end else ''} "
            "(a damaged pre-1.6 torch.save file?)"
        )
    Walker(ckpt).walk_root(root)
    return ckpt
