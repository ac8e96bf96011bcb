"""The on-disk metadata cache of remote files: the byte ranges a reader fetched (headers, zip
directories, data.pkl), keyed by URL and checked against the file's version (ETag, S3 version,
Hub blob id) before use. A second open re-reads them from disk after one cheap identity check
(HEAD / info); offline, the cached ranges are used with a warning saying so.

Only bytes of the remote file are stored (never a parsed object): opening from the cache runs
the same readers with the same checks. Files are written atomically and the folder is kept under
MSCOPE_CACHE_MB (default 256) by dropping the least recently used entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ENABLED = True  # `--no-cache` (cli) turns it off while its command runs
MAGIC = b"MSCOPE-RANGES-1\n"
MAX_ENTRY_BYTES = 64 << 20


def enabled() -> bool:
    return ENABLED and os.environ.get("MSCOPE_NO_CACHE", "") in ("", "0")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mscope" / "remote"


def limit_bytes() -> int:
    try:
        return max(0, int(float(os.environ.get("MSCOPE_CACHE_MB", "256")) * (1 << 20)))
    except ValueError:
        return 256 << 20


@dataclass
class Entry:
    url: str
    size: int
    etag: str
    saved: float
    blocks: list[tuple[int, bytes]]


def _path(url: str) -> Path:
    return cache_dir() / (hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:40] + ".ranges")


def load(url: str) -> Entry | None:
    """The cached ranges of `url`, or None (absent, disabled, unreadable or damaged: a cache is
    never a reason to fail)."""
    if not enabled():
        return None
    path = _path(url)
    try:
        raw = path.read_bytes()
        if not raw.startswith(MAGIC) or len(raw) > MAX_ENTRY_BYTES + (1 << 20):
            return None
        pos = len(MAGIC)
        (n,) = struct.unpack_from("<I", raw, pos)
        head = json.loads(raw[pos + 4 : pos + 4 + n])
        pos += 4 + n
        if head.get("url") != url:
            return None
        blocks = []
        for offset, length in head["blocks"]:
            if type(offset) is not int or type(length) is not int or length < 0 or pos + length > len(raw):
                return None
            blocks.append((offset, raw[pos : pos + length]))
            pos += length
        os.utime(path)  # least recently used goes first
        return Entry(url, int(head["size"]), str(head["etag"]), float(head.get("saved", 0)), blocks)
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def save(url: str, size: int, etag: str | None, blocks: list[tuple[int, bytes]]) -> None:
    """Store what was fetched, when the file has a version to check it against."""
    if not enabled() or not etag or not blocks:
        return
    blocks = sorted(blocks)[:4096]
    total = sum(len(b) for _, b in blocks)
    if total > MAX_ENTRY_BYTES or total > limit_bytes():
        return
    head = json.dumps(
        {"url": url, "size": size, "etag": etag, "saved": time.time(), "blocks": [[o, len(b)] for o, b in blocks]}
    ).encode()
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(MAGIC + struct.pack("<I", len(head)) + head)
                for _, data in blocks:
                    fh.write(data)
            os.replace(tmp, _path(url))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _trim(folder)
    except OSError:
        pass  # a read-only or full disk: no cache, no failure


def _trim(folder: Path) -> None:
    entries = []
    for p in folder.glob("*.ranges"):
        try:
            st = p.stat()
        except OSError:
            continue
        entries.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in entries)
    for _, size, p in sorted(entries, key=lambda e: e[0]):
        if total <= limit_bytes():
            break
        p.unlink(missing_ok=True)
        total -= size
