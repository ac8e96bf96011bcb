"""Byte sources: one interface (size, read, read_ranges, etag, name, close) over a local mmap or
remote ranges (https via http.client; s3, gs, hf and other schemes via fsspec).

Nothing here imports fsspec until a non-http URL is opened: local paths never pay for it.
"""

from __future__ import annotations

import os
import threading

from .base import READ_AHEAD, CachedRemote, Source, SourceBuffer, SourceFile
from .location import RemotePath, as_location, file_size, is_url, redact, url_scheme

__all__ = [
    "READ_AHEAD",
    "CachedRemote",
    "RemotePath",
    "Source",
    "SourceBuffer",
    "SourceFile",
    "as_location",
    "check_unchanged",
    "file_size",
    "is_url",
    "open_source",
    "redact",
    "remember",
    "remote_source",
    "url_scheme",
]

_OPEN: dict[str, Source] = {}  # url -> the source its records were read through (values reuse it)
_LOCK = threading.Lock()


def open_source(location: str | os.PathLike | RemotePath) -> Source:
    """A byte source for a path or URL, decided by scheme: http(s) -> HttpSource, other URLs ->
    fsspec, anything else a local file (mmap)."""
    loc = as_location(location)
    if not isinstance(loc, RemotePath):
        from .local import LocalSource

        return LocalSource(loc)
    if loc.scheme in ("http", "https"):
        from .http import HttpSource

        return HttpSource(loc.url)
    from .fs import FsspecSource

    return FsspecSource(loc.url)


def remember(url: str, source: Source) -> None:
    with _LOCK:
        _OPEN[url] = source


def remote_source(loc: RemotePath) -> Source:
    """The source a remote record's bytes come through: the one its reader used, else a new one
    whose version must still be the one the records were read from."""
    with _LOCK:
        src = _OPEN.get(loc.url)
    if src is None:
        src = open_source(loc)
        if loc.etag is not None and src.etag != loc.etag:
            from ...errors import CorruptCheckpointError

            raise CorruptCheckpointError(
                "the file changed since its metadata was read (its ETag differs)",
                str(loc),
                "open it again",
            )
        remember(loc.url, src)
    if isinstance(src, CachedRemote) and not src.values_read:
        src.values_read = True  # once per source: the first value read after the metadata
        src.verify()
    return src


def check_unchanged(files: object) -> None:
    """Once at the end of an audit or diff: every remote file among `files` whose values were
    read is still the version its metadata came from (one identity request each, at once), so
    a report never mixes two versions. Raises the `changed` line otherwise."""
    with _LOCK:
        sources = [
            src
            for f in files  # type: ignore[attr-defined]
            if isinstance(f, RemotePath)
            for src in [_OPEN.get(f.url)]
            if isinstance(src, CachedRemote) and src.values_read
        ]
    if len(sources) <= 1:
        for src in sources:
            src.verify()
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(16, len(sources)), thread_name_prefix="mscope-verify") as pool:
        for _ in pool.map(lambda s: s.verify(), sources):
            pass
