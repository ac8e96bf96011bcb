"""Checkpoints behind a URL: the same readers, over byte sources that fetch only the ranges the
metadata needs (safetensors length and header; zip end records, directory and data.pkl; the
shard headers of an index, concurrently). Never tensor data.

Records carry a `RemotePath` as their file: its URL is the identity, its size and ETag what the
source learnt, so values are read later from the same version.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..checkpoint import Checkpoint, Format
from ..errors import CorruptCheckpointError, MscopeError, NotFoundError, UnsupportedFormatError
from .sources import (
    CachedRemote,
    RemotePath,
    Source,
    SourceBuffer,
    SourceFile,
    open_source,
    remember,
)

MAX_REMOTE_PICKLE = 64 << 20  # legacy / plain pickles are read whole: only this small
MAX_INDEX_BYTES = 64 << 20
SHARD_CONCURRENCY = 16
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def open_remote(
    loc: RemotePath, strict: bool, finish: Callable[[Checkpoint, Any, bool], Checkpoint]
) -> Checkpoint:
    try:
        ckpt = _dispatch(loc)
    except MscopeError as exc:
        if exc.path is None:
            exc.path = str(loc)
        raise
    except IsADirectoryError:
        raise UnsupportedFormatError("is a folder; name a file in it", loc) from None
    except OSError as exc:  # a filesystem error fsspec did not translate
        raise MscopeError(f"cannot read: {exc.strerror or exc}", loc) from exc
    return finish(ckpt, loc, strict)


def _dispatch(loc: RemotePath) -> Checkpoint:
    if loc.scheme not in ("http", "https"):
        from .sources.fs import filesystem, translate

        fs, path = filesystem(loc.url)
        try:
            info = fs.info(path)
        except BaseException as exc:  # noqa: BLE001 (every filesystem raises its own)
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise translate(exc, str(loc)) from None
        if info.get("type") == "directory":
            return _read_folder(loc, fs, path)
        from .sources.fs import FsspecSource

        source: Source = FsspecSource(loc.url, fs, path, info)
    else:
        if loc.url.split("?", 1)[0].endswith("/"):
            raise UnsupportedFormatError(
                "an http(s) folder cannot be listed",
                loc,
                "name the index file or the weights file in it",
            )
        source = open_source(loc)
    return read_source(loc, source)


def read_source(
    loc: RemotePath,
    source: Source,
    weights_only: bool = False,
    opener: Callable[[RemotePath], Source] = open_source,
) -> Checkpoint:
    """Read one remote file through `source` (kept for its values: sources.remote_source), and
    keep the ranges it fetched in the metadata cache. `opener` opens the files a DCP `.metadata`
    names (a bucket listing passes one that reuses its entries)."""
    loc.size, loc.etag = source.size, source.etag
    remember(loc.url, source)
    ckpt = _read_source(loc, source, weights_only, opener)
    if isinstance(source, CachedRemote):
        source.persist()
        if source.offline:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(source.cached_at or 0))
            ckpt.warnings.append(f"offline: metadata from the cache of {when}; the file was not checked for changes")
    return ckpt


def _read_source(
    loc: RemotePath, source: Source, weights_only: bool, opener: Callable[[RemotePath], Source]
) -> Checkpoint:
    from . import not_a_checkpoint, sniff_head

    head = source.read(0, min(16, source.size))
    kind = sniff_head(head, loc.name, lambda: source.size, loc)
    if kind == "zip":
        from .torchzip import read_torch_zip
        from .ziparchive import ZipArchive

        with ZipArchive(loc, SourceBuffer(source)) as archive:
            return read_torch_zip(loc, archive)
    if kind == Format.SAFETENSORS:
        from .safetensors import read_safetensors

        return read_safetensors(loc, SourceFile(source))
    if weights_only and kind != Format.TORCH_LEGACY:
        raise UnsupportedFormatError(
            f"not a weights file (its bytes read as {kind or 'unknown'})", loc
        )
    if kind in (Format.TORCH_LEGACY, Format.PICKLE, None):
        if source.size > MAX_REMOTE_PICKLE:
            if kind is None:
                raise not_a_checkpoint(loc)
            raise UnsupportedFormatError(
                f"a {source.size:,}-byte pickle must be read whole, more than the {MAX_REMOTE_PICKLE:,} bytes fetched for one",
                loc,
                "download it and open the local copy (or re-save it with torch.save / safetensors)",
            )
        data = source.read(0, source.size)
        if kind == Format.TORCH_LEGACY:
            from .legacy import read_legacy_mapped

            return read_legacy_mapped(loc, data)
        if kind is None and not _headerless_pickle(data):
            raise not_a_checkpoint(loc)
        from .legacy import read_plain_pickle

        return read_plain_pickle(loc, data)
    if kind == "index-json":
        return _read_index(loc, source)
    if kind == Format.DCP:
        from .dcp import read_dcp_remote

        return read_dcp_remote(loc, source, opener)
    raise not_a_checkpoint(loc)


def _headerless_pickle(data: bytes) -> bool:
    from ..errors import UnsafePickleError
    from .pickle.scan import scan_pickle

    try:
        return scan_pickle(data, 0, "remote") == len(data.rstrip(b"\n"))
    except UnsafePickleError:
        return False


def shard_url(base: RemotePath, name: Any, index: RemotePath) -> RemotePath:
    """The URL of a shard an index names: a plain relative name inside the index's folder.
    Absolute paths, '..', URLs (another host or bucket), queries and backslashes are refused:
    the file's content never chooses where mscope reads."""
    from .safetensors import short

    def refuse(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"shard {short(name)}: {why}", index)

    if not isinstance(name, str) or not name or "\x00" in name:
        raise refuse("not a valid file name")
    if "://" in name or name.startswith(("/", "\\")) or ":" in name.split("/", 1)[0]:
        raise refuse("absolute paths and URLs are not allowed (shards must sit beside the index)")
    if "\\" in name or "?" in name or "#" in name or "%" in name:
        raise refuse("the name holds characters a shard file name does not ('\\', '?', '#', '%')")
    if any(part in ("..", ".", "") for part in name.split("/")):
        raise refuse("paths with '..' are not allowed")
    return base / name


def _read_index(loc: RemotePath, source: Source) -> Checkpoint:
    from .sharded import read_sharded

    if source.size > MAX_INDEX_BYTES:
        raise CorruptCheckpointError(f"too large for a shard index ({source.size:,} bytes)", loc)
    raw = source.read(0, source.size)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CorruptCheckpointError("not a shard index (not UTF-8 text)", loc) from None
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"not valid JSON ({str(exc)[:80]})", loc) from None
    base = loc.parent
    pool = ThreadPoolExecutor(SHARD_CONCURRENCY, thread_name_prefix="mscope-shards")
    futures: dict[str, Future] = {}

    def locate(wanted: dict[str, list[str]]) -> dict[str, RemotePath]:
        urls = {shard: shard_url(base, shard, loc) for shard in wanted}
        for shard in sorted(urls):  # every shard header in flight at once
            futures[urls[shard].url] = pool.submit(_read_shard, urls[shard])
        return urls

    def read_shard(url: RemotePath) -> tuple[Checkpoint, str]:
        return futures[url.url].result()

    config = pool.submit(side_file, base / "config.json")  # quantization_config (quant.annotate)
    try:
        ckpt = read_sharded(loc, doc, locate, read_shard)
        raw = config.result()
        if raw is not None:
            ckpt.side_files["config.json"] = raw
        return ckpt
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


MAX_SIDE_FILE = 4 << 20


def side_file(url: RemotePath, source: Source | None = None) -> bytes | None:
    """A small file beside a remote checkpoint (config.json), or None when it is absent,
    unreadable or too large: a neighbour never makes the checkpoint fail to open."""
    try:
        source = source or open_source(url)
        if source.size > MAX_SIDE_FILE:
            return None
        raw = source.read(0, source.size)
        if isinstance(source, CachedRemote):
            source.persist()
        return raw
    except MscopeError:
        return None


def _read_shard(url: RemotePath) -> tuple[Checkpoint, str]:
    try:
        source = open_source(url)
    except NotFoundError:
        raise CorruptCheckpointError("listed in the index but missing", url) from None
    ckpt = read_source(url, source, weights_only=True)
    return ckpt, (
        Format.TORCH_ZIP if ckpt.format in (Format.TORCH_ZIP, Format.TORCHSCRIPT) else ckpt.format
    )


def _read_folder(loc: RemotePath, fs: Any, path: str) -> Checkpoint:
    """A bucket prefix or Hub repo read like a local directory: DCP `.metadata`, an index (the
    safetensors one first), or its single weights file."""
    from .sources.fs import FsspecSource, translate

    try:
        listing = fs.ls(path.rstrip("/"), detail=True)
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise translate(exc, str(loc)) from None
    files = {
        str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: e
        for e in listing
        if e.get("type") != "directory"
    }
    folder = RemotePath(loc.url.rstrip("/") + "/")

    def pick(name: str) -> Checkpoint:
        child = folder / name
        entry = files[name]
        ckpt = read_source(child, FsspecSource(child.url, fs, f"{path.rstrip('/')}/{name}", entry))
        if "config.json" in files and "config.json" not in ckpt.side_files:
            config = folder / "config.json"
            try:
                source = FsspecSource(config.url, fs, f"{path.rstrip('/')}/config.json", files["config.json"])
            except MscopeError:
                source = None
            raw = side_file(config, source) if source is not None else None
            if raw is not None:
                ckpt.side_files["config.json"] = raw
        return ckpt

    if ".metadata" in files:  # a DCP folder, as locally (readers._sniff_directory)

        def open_item(url: RemotePath) -> Source:
            rel = url.url[len(folder.url) :]
            return FsspecSource(url.url, fs, f"{path.rstrip('/')}/{rel}", files.get(rel))

        meta = folder / ".metadata"
        source = FsspecSource(meta.url, fs, f"{path.rstrip('/')}/.metadata", files[".metadata"])
        return read_source(meta, source, opener=open_item)
    indexes = sorted(n for n in files if n.endswith(".index.json"))
    if indexes:
        preferred = [n for n in indexes if n.endswith(".safetensors.index.json")]
        return pick((preferred or indexes)[0])
    singles = sorted(n for n in files if n.endswith(WEIGHT_SUFFIXES))
    if len(singles) == 1:
        return pick(singles[0])
    if len(singles) > 1:
        shown = ", ".join(singles[:6]) + (
            f" and {len(singles) - 6} more" if len(singles) > 6 else ""
        )
        raise UnsupportedFormatError(
            f"folder holds {len(singles)} checkpoints, not one set: {shown}", loc,
            f"name one, e.g. mscope summary {folder / singles[0]}",
        )  # fmt: skip
    raise UnsupportedFormatError(
        "folder holds no checkpoint (no *.index.json, no DCP .metadata, no single weights file)",
        loc,
    )
