"""s3://, gs://, hf:// (and any other fsspec protocol) as byte sources: fsspec's async
filesystems fetch several ranges concurrently (`cat_ranges`), with the credentials each
ecosystem keeps (AWS env/profiles/AWS_ENDPOINT_URL, Google ADC, HF_TOKEN / huggingface login)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...errors import MscopeError, NotFoundError
from .base import CachedRemote, changed
from .http import RemoteError
from .location import redact

INSTALL_HINT = "install modelscope-tui[remote]"

_PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub"}


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, its path) for a URL, with one clear line when the extra is missing."""
    scheme = url.split("://", 1)[0].lower()
    try:
        import fsspec
        import fsspec.core
    except ImportError:
        raise MscopeError(
            f"reading {scheme}:// URLs needs fsspec", redact(url), INSTALL_HINT
        ) from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        package = _PACKAGES.get(scheme, str(exc.name or "its fsspec backend"))
        raise MscopeError(
            f"reading {scheme}:// URLs needs {package}", redact(url), INSTALL_HINT
        ) from None
    except ValueError as exc:
        if "Protocol not known" in str(exc) or "not known" in str(exc):
            raise MscopeError(
                f"unsupported URL scheme {scheme}://",
                redact(url),
                "use https://, s3://, gs:// or hf://",
            ) from None
        raise MscopeError(f"not a valid URL ({str(exc)[:100]})", redact(url)) from None


def translate(exc: BaseException, name: str) -> MscopeError:
    """One line for what a filesystem raised; never its credentials (messages carry none)."""
    if isinstance(exc, MscopeError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return NotFoundError("no such file or directory", name)
    if isinstance(exc, PermissionError):
        return RemoteError("access denied", name, "check the credentials (see docs/remote.md)")
    if isinstance(exc, TimeoutError):
        return RemoteError("the storage service did not answer in time", name, "check the network")
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    hint = None
    if "Credential" in type(exc).__name__ or "credential" in text.lower():
        hint = "set up credentials for this storage: see docs/remote.md"
    return RemoteError(f"cannot read: {type(exc).__name__}: {text}", name, hint)


def _etag(info: dict) -> str | None:
    for key in (
        "ETag",
        "etag",
        "VersionId",
        "version_id",
        "generation",
        "blob_id",
        "sha",
        "md5Hash",
        "LastModified",
        "last_modified",
        "mtime",
    ):
        value = info.get(key)
        if value:
            return f"{key}:{value}"
    lfs = info.get("lfs")
    if isinstance(lfs, dict) and lfs.get("sha256"):
        return f"sha256:{lfs['sha256']}"
    return None


class FsspecSource(CachedRemote):
    def __init__(self, url: str, fs: Any = None, path: str | None = None, info: dict | None = None):
        super().__init__()
        self.url = url
        self.name = redact(url)
        if fs is None:
            fs, path = filesystem(url)
        self.fs, self.path = fs, path
        try:
            info = info if info is not None else fs.info(path)
        except BaseException as exc:  # noqa: BLE001 (each filesystem raises its own types)
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise translate(exc, self.name) from None
        if info.get("type") == "directory":
            raise IsADirectoryError(url)
        self.size = int(info.get("size") or 0)
        self.etag = _etag(info)
        from . import cache

        entry = cache.load(url)  # info() above was the identity check
        if entry is not None and (entry.size, entry.etag) == (self.size, self.etag):
            self.preload(entry)

    def verify(self) -> None:
        """Ask the storage for the object's identity again (ETag / version id / generation / Hub
        blob id), past fsspec's listing cache, and compare with the one the metadata came from."""
        if self.offline:
            return
        try:
            self.fs.invalidate_cache(self.path)
            info = self.fs.info(self.path)
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, KeyboardInterrupt):
                raise
            if isinstance(exc, FileNotFoundError):
                raise changed(self.name, "it was deleted") from None
            raise translate(exc, self.name) from None
        size, etag = int(info.get("size") or 0), _etag(info)
        if size != self.size:
            raise changed(self.name, f"its size went from {self.size:,} to {size:,} bytes")
        if etag != self.etag:
            raise changed(self.name, "its ETag / version changed")

    def _fetch(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        try:
            if len(ranges) == 1:
                o, n = ranges[0]
                out = [self.fs.cat_file(self.path, start=o, end=o + n)]
            else:
                out = self.fs.cat_ranges(
                    [self.path] * len(ranges),
                    [o for o, _ in ranges],
                    [o + n for o, n in ranges],
                    on_error="raise",
                )
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise translate(exc, self.name) from None
        for (o, n), data in zip(ranges, out):
            if isinstance(data, BaseException):
                raise translate(data, self.name)
            if len(data) != n:
                raise RemoteError(
                    f"the storage service sent {len(data):,} bytes for a read of {n:,} at {o:,}",
                    self.name,
                    "try again",
                )
            self.count(n)
        return list(out)


def list_directory(url: str) -> tuple[Any, str, list[dict]]:
    """(fs, path, entries of the folder) or raise NotADirectoryError when `url` is a file."""
    fs, path = filesystem(url)
    try:
        entries = fs.ls(path.rstrip("/"), detail=True)
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise translate(exc, redact(url)) from None
    return fs, path, entries
