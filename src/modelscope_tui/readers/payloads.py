"""Pickles a loader can reach outside the checkpoint's own layout, and in files we cannot read.

Python's pickle loader, torch.load without weights_only, joblib and custom loaders run a pickle's opcodes
one by one: a payload placed before a corruption runs before the loader notices it (nullifAI), and
a pickle in a zip member that torch's layout does not name (at the root, `x.bin`, another folder,
a copy whose local header names something else) is still one `zipfile.open` away. So a file we
refuse to read is still searched for payloads, and a torch zip's other members are too.

Everything goes through the one scanner and restricted unpickler (`reachable_globals`); only the
globals a real load would find dangerous are reported from these pickles: the others are no
part of what `torch.load` checks, and listing them would change its weights_only verdict.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable
from pathlib import Path

from ..checkpoint import GlobalRef
from ..errors import MscopeError
from .pickle.unpickler import reachable_globals
from .ziparchive import STORED, ZipArchive, ZipEntry

MAX_MEMBER_BYTES = 64 << 20  # per stored member scanned (torch pickles are read whole up to 2 GB)
MAX_INFLATED_BYTES = 4 << 20  # per deflated member: a payload sits at a pickle's start, and a
# zip bomb must not cost more here than where the reader refused it
MAX_TOTAL_BYTES = 256 << 20  # read or inflated per archive, all members together
MAX_MEMBERS = 10_000  # members scanned per archive (storages a tensor uses are skipped)
MAX_CHAIN = 8  # consecutive pickles in one stream (a legacy file has 5, then raw storages)


def dangerous(refs: Iterable[GlobalRef]) -> list[GlobalRef]:
    return [r for r in refs if r.safety == "dangerous"]


def stream_globals(data: bytes | memoryview, source: str) -> list[GlobalRef]:
    """Globals of the pickles at the start of `data`, one after another until one is broken or
    the data ends (a loader reads a stream of pickles the same way)."""
    found: list[GlobalRef] = []
    pos = 0
    for i in range(MAX_CHAIN):
        if pos >= len(data):
            break
        refs, end = reachable_globals(data, source=source if i == 0 else f"{source} (pickle {i + 1})", start=pos)
        found.extend(refs)
        if end is None or end <= pos:
            break
        pos = end
    return found


def zip_member_globals(archive: ZipArchive, skip: Iterable[str] = (), include_shadowed: bool = True) -> list[GlobalRef]:
    """Dangerous globals of every member a loader could unpickle, read leniently (local header
    names and flag bits ignored, as torch's reader does). `skip`: members already loaded as
    pickles, and storages that tensors use (raw tensor bytes, never unpickled by anyone)."""
    skipped = skip if isinstance(skip, set) else set(skip)
    by_name = archive.entries
    # a set difference at C speed (100k storages skipped), then what is left in file order
    left = by_name.keys() - skipped
    entries: list[ZipEntry] = sorted((by_name[n] for n in left), key=lambda e: e.header_offset)
    if include_shadowed:  # earlier copies of a repeated name: another reader may take them
        entries += archive.shadowed
    found: list[GlobalRef] = []
    name = archive.path.name
    seen: set[int] = set()  # overlapping entries (one local header, thousands of names): once
    budget = MAX_TOTAL_BYTES
    for count, entry in enumerate(entries):
        if count >= MAX_MEMBERS or budget <= 0:
            break
        if entry.header_offset in seen or (entry.size > MAX_MEMBER_BYTES and entry.compressed_size > MAX_MEMBER_BYTES):
            continue
        seen.add(entry.header_offset)
        try:
            limit = MAX_MEMBER_BYTES if entry.method == STORED else min(entry.size, MAX_INFLATED_BYTES)
            data = archive.loose_bytes(entry, min(limit, budget))
            budget -= len(data or b"")
        except (MscopeError, ValueError, OverflowError):
            continue
        if not data:
            continue
        found.extend(dangerous(stream_globals(data, f"{name}:{entry.name}")))
    return found


def file_globals(path: Path) -> list[GlobalRef]:
    """Dangerous globals a loader would reach in a file we could not read as a checkpoint: each
    zip member, or the stream of pickles at the start of any other file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
            if not head:
                return []
            if head in (b"PK\x03\x04", b"PK\x05\x06"):
                try:
                    with ZipArchive(path) as archive:
                        return zip_member_globals(archive)
                except MscopeError:
                    return []  # no readable directory: nothing a zip reader would open either
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)  # the scan reads no further than the pickles
            try:
                return dangerous(stream_globals(buf, path.name))
            finally:
                buf.close()
    except (OSError, ValueError):
        return []


def merge(known: Iterable[GlobalRef], more: Iterable[GlobalRef]) -> list[GlobalRef]:
    """`known` then the refs of `more` not already there (same pickle and global)."""
    out = list(known)
    seen = {(r.pickle, r.module, r.name) for r in out}
    for ref in more:
        key = (ref.pickle, ref.module, ref.name)
        if key not in seen:
            seen.add(key)
            out.append(ref)
    return out
