"""Where a checkpoint is: a local path or a URL. No network library is imported here.

A URL never goes through `Path()` (which turns `s3://b/x` into `s3:/b/x`); it becomes a
`RemotePath`, the file identity of every record read from it. RemotePath has no `__fspath__`:
nothing can `open()` it as a local file by mistake, whatever a file's content names.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

SCHEMES = ("http", "https", "s3", "gs", "gcs", "hf")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def url_scheme(location: object) -> str | None:
    """The scheme of a URL we read (lower case), None for a local path. An unknown scheme
    (`ftp://`) is still a URL: it must not fall through to a local path named `ftp:/...`."""
    if isinstance(location, RemotePath):
        return location.scheme
    if not isinstance(location, str):
        return None
    m = _URL.match(location)
    return m.group(1).lower() if m else None


def is_url(location: object) -> bool:
    return url_scheme(location) is not None


def redact(url: str) -> str:
    """The URL as messages show it: no user:password, no query (signed URLs carry secrets there)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.split("?", 1)[0]
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "?…" if parts.query else ""
    return f"{parts.scheme}://{netloc}{parts.path}{query}"


class RemotePath:
    """A file or folder behind a URL: the part of PurePath's API the readers use (name, suffix,
    parent, `/`), plus what the byte source learnt (size, version identity)."""

    __slots__ = ("url", "size", "etag")

    def __init__(self, url: str, size: int | None = None, etag: str | None = None):
        self.url = url
        self.size = size
        self.etag = etag

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0].lower()

    def _split(self) -> tuple[str, str, str]:
        """(scheme://netloc, path, ?query) of the URL."""
        parts = urlsplit(self.url)
        head = f"{parts.scheme}://{parts.netloc}"
        return head, parts.path, (f"?{parts.query}" if parts.query else "")

    @property
    def name(self) -> str:
        _, path, _ = self._split()
        return path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        name = self.name
        i = name.rfind(".")
        return name[i:] if 0 < i < len(name) - 1 else ""

    @property
    def stem(self) -> str:
        name, suffix = self.name, self.suffix
        return name[: -len(suffix)] if suffix else name

    @property
    def parent(self) -> RemotePath:
        head, path, _ = self._split()
        path = path.rstrip("/")
        return RemotePath(f"{head}{path.rsplit('/', 1)[0] if '/' in path else ''}/")

    def is_dir(self) -> bool:
        """A folder URL ends with '/' (what callers asking Path.is_dir() of a checkpoint mean)."""
        return self.url.split("?", 1)[0].endswith("/")

    def __truediv__(self, name: str) -> RemotePath:
        head, path, query = self._split()
        return RemotePath(f"{head}{path.rstrip('/')}/{name}{query}")

    def __str__(self) -> str:
        return redact(self.url)

    def __repr__(self) -> str:
        return f"RemotePath({redact(self.url)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(("remote", self.url))

    def __lt__(self, other: object) -> bool:
        return str(self) < str(other)


def as_location(location: str | os.PathLike | RemotePath) -> Path | RemotePath:
    """The one parse of what a user typed: a URL stays a URL, anything else is a local path."""
    if isinstance(location, (Path, RemotePath)):
        return location
    if is_url(location):
        return RemotePath(str(location))
    return Path(location)


def file_size(location: Path | RemotePath | str) -> int:
    """Size of a record's file (0 when unknown or unreadable): what the source learnt for a URL."""
    if isinstance(location, RemotePath):
        return location.size or 0
    try:
        return os.stat(location).st_size
    except OSError:
        return 0
