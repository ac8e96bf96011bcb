"""The byte-source interface every reader can sit on: size, read at an offset, several ranges
at once, a version identity, a name for messages.

Remote sources keep what they fetched in a small block cache and read ahead: the first read
asks for READ_AHEAD bytes whatever it needs (a safetensors header or a small file comes in one
request, like huggingface_hub's get_safetensors_metadata).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from ...errors import CorruptCheckpointError

READ_AHEAD = 64 << 10
CACHE_BYTES = 32 << 20  # fetched metadata ranges kept per source (tensor data bypasses it)


def changed(name: str, what: str) -> CorruptCheckpointError:
    """The one line for a file replaced between two reads of one run (every remote kind)."""
    return CorruptCheckpointError(
        f"the file changed while being read ({what})",
        name,
        "open it again once the upload is finished",
    )


class Source:
    """Abstract byte source. `read` returns exactly `length` bytes or raises MscopeError."""

    name: str = ""
    size: int = 0
    etag: str | None = None
    remote: bool = False

    def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return [self.read(o, n) for o, n in ranges]

    def close(self) -> None:
        pass

    def verify(self) -> None:
        """Raise `changed(...)` when the file is no longer the version first read. Sources that
        check every response (https) or cannot change (local mmap) need not ask again."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise CorruptCheckpointError(
                f"read of {length:,} bytes at {offset:,} runs past the end of the {self.size:,}-byte file",
                self.name,
                "the file is truncated or its metadata is wrong",
            )


class CachedRemote(Source):
    """What every remote source shares: the block cache, read-ahead and request counters.
    Subclasses implement `_fetch(ranges) -> list[bytes]` (concurrently where they can)."""

    remote = True

    def __init__(self) -> None:
        self._blocks: list[tuple[int, bytes]] = []  # (offset, bytes), most recent last
        self._cached = 0
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes_fetched = 0
        self.url = ""
        self.cached_at: float | None = None  # set when the blocks came from the disk cache
        self.offline = False  # the identity check could not reach the server; the cache was used
        self._dirty = False  # metadata ranges fetched that the disk cache does not have yet
        self.values_read = False  # tensor values came through it: audit/diff re-check its version

    def preload(self, entry) -> None:
        """Start from the ranges the disk cache kept for this version of the file."""
        with self._lock:
            self._blocks = list(entry.blocks)
            self._cached = sum(len(b) for _, b in self._blocks)
        self.cached_at = entry.saved

    def persist(self) -> None:
        """Keep what the readers fetched (metadata only: tensor data never enters the blocks)."""
        if not self._dirty:
            return
        from . import cache

        with self._lock:
            blocks = list(self._blocks)
        cache.save(self.url, self.size, self.etag, blocks)


    def _fetch(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        raise NotImplementedError

    def _lookup(self, offset: int, length: int) -> bytes | None:
        with self._lock:
            for start, data in reversed(self._blocks):
                if start <= offset and offset + length <= start + len(data):
                    return data[offset - start : offset - start + length]
        return None

    def _keep(self, offset: int, data: bytes) -> None:
        if len(data) > CACHE_BYTES // 4:
            return
        with self._lock:
            self._dirty = True
            self._blocks.append((offset, data))
            self._cached += len(data)
            while self._cached > CACHE_BYTES and len(self._blocks) > 1:
                _, old = self._blocks.pop(0)
                self._cached -= len(old)

    def read(self, offset: int, length: int, ahead: int = READ_AHEAD) -> bytes:
        self.check_range(offset, length)
        if length == 0:
            return b""
        hit = self._lookup(offset, length)
        if hit is not None:
            return hit
        want = min(self.size - offset, max(length, ahead))
        if self.offline:
            from ...errors import MscopeError

            raise MscopeError(
                f"offline, and bytes {offset:,}..{offset + length:,} are not in the metadata cache", self.name,
                "connect to the network and open it again",
            )  # fmt: skip
        (data,) = self._fetch([(offset, want)])
        if ahead:
            self._keep(offset, data)
        return data[:length]

    def prefetch(self, ranges: Sequence[tuple[int, int]], merge_gap: int = 4096) -> None:
        """Fetch small metadata ranges the readers will ask for next, at once (concurrent
        requests), into the block cache. Ranges closer than `merge_gap` share one request."""
        spans: list[list[int]] = []
        for o, n in sorted(r for r in ranges if r[1] > 0):
            o, end = max(0, o), min(self.size, o + n)
            if end <= o or self._lookup(o, end - o) is not None:
                continue
            if spans and o - spans[-1][1] <= merge_gap and end - spans[-1][0] <= CACHE_BYTES // 8:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([o, end])
        if not spans or self.offline:
            return
        wanted = [(o, end - o) for o, end in spans]
        for (o, _), data in zip(wanted, self._fetch(wanted)):
            self._keep(o, data)

    def read_tail(self, length: int) -> bytes:
        """The last `length` bytes (the zip end records and central directory)."""
        length = min(length, self.size)
        return self.read(self.size - length, length)

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Several ranges at once (concurrent requests); for tensor data, not kept in the cache."""
        for o, n in ranges:
            self.check_range(o, n)
        out: list[bytes | None] = [self._lookup(o, n) if n else b"" for o, n in ranges]
        missing = [i for i, d in enumerate(out) if d is None]
        if missing:
            fetched = self._fetch([ranges[i] for i in missing])
            for i, data in zip(missing, fetched):
                out[i] = data
        return out  # type: ignore[return-value]

    def count(self, nbytes: int) -> None:
        with self._lock:
            self.requests += 1
            self.bytes_fetched += nbytes


class SourceFile:
    """A read-only file object over a Source (seek/tell/read), for readers written for files."""

    def __init__(self, source: Source):
        self.source = source
        self.pos = 0

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.source.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.source.size - self.pos)
        n = left if n is None or n < 0 else min(n, left)
        data = self.source.read(self.pos, n)
        self.pos += len(data)
        return data


class SourceBuffer:
    """Slicing (`buf[a:b]`) and `len()` over a Source: what ZipArchive asks of its buffer."""

    def __init__(self, source: Source):
        self.source = source

    def __len__(self) -> int:
        return self.source.size

    def __getitem__(self, key: slice) -> bytes:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("SourceBuffer supports plain slices only")
        start, stop, _ = key.indices(self.source.size)
        if stop <= start:
            return b""
        return self.source.read(start, stop - start)
