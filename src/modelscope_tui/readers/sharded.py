"""Sharded Hugging Face checkpoints: `*.safetensors.index.json` / `pytorch_model.bin.index.json`.

The index is `{"metadata": {"total_size": N}, "weight_map": {tensor: shard file}}`. Each shard is
read once with its own reader and the records are merged into one Checkpoint.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from ..checkpoint import Checkpoint, Entry, Format, GlobalRef, TensorRecord, infer_kind
from ..errors import CorruptCheckpointError, MscopeError, NotFoundError, UnsupportedFormatError
from .safetensors import natural_key, read_safetensors, short

MAX_INDEX_BYTES = 64 << 20


@functools.lru_cache(maxsize=8)
def _allowed_roots(base: Path) -> tuple[Path, ...]:
    """Where shards of `base` may live (resolved once per directory: an index naming 5,000
    shards resolved it 10,000 times)."""
    root = base.resolve()
    if root.parent.name == "snapshots":
        return (root, (root.parent.parent / "blobs").resolve())
    return (root,)


def resolve_inside(base: Path, name: Any, what: str, source: Path) -> Path:
    """`base / name`, refusing names that could reach outside `base` (also through symlinks).

    A Hugging Face cache snapshot (`.../snapshots/<rev>/file -> ../../blobs/<hash>`) may point
    into its repository's `blobs/` folder; nothing else outside `base` is accepted.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CorruptCheckpointError(f"{what} {short(name)}: not a valid file name", source)
    parts = name.replace("\\", "/").split("/")
    if (
        PurePosixPath(name).is_absolute()
        or PureWindowsPath(name).is_absolute()
        or PureWindowsPath(name).drive
        or name.startswith(("/", "\\"))
    ):
        raise CorruptCheckpointError(
            f"{what} {short(name)}: absolute paths are not allowed", source
        )
    if ".." in parts:
        raise CorruptCheckpointError(
            f"{what} {short(name)}: paths with '..' are not allowed", source
        )
    target = base / name
    allowed = _allowed_roots(base)
    try:
        resolved = target.resolve()
    except (OSError, RuntimeError) as exc:  # symlink loops
        raise CorruptCheckpointError(
            f"{what} {short(name)}: cannot be resolved ({exc})", source
        ) from exc
    if not any(resolved == r or resolved.is_relative_to(r) for r in allowed):
        raise CorruptCheckpointError(
            f"{what} {short(name)}: resolves outside the checkpoint directory (to {resolved})",
            source,
        )
    return target


def read_sharded(
    index_path: Path,
    doc: Any = None,
    locate: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    read_shard: Callable[[Any], tuple[Checkpoint, str]] | None = None,
) -> Checkpoint:
    """A sharded set from its index. A remote index (readers.remote) passes its parsed `doc`,
    `locate` (shard name -> URL, refusing names outside the set's folder) and `read_shard`
    (headers fetched concurrently); local files are resolved and read here."""
    from ..jsonfile import read_json_file

    if doc is None:
        index_path = Path(index_path)
        doc = read_json_file(index_path, CorruptCheckpointError, "a shard index", MAX_INDEX_BYTES)
    if not isinstance(doc, dict) or "weight_map" not in doc:
        raise UnsupportedFormatError(
            'JSON file without a "weight_map": not a sharded checkpoint index', index_path
        )
    weight_map = doc["weight_map"]
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptCheckpointError(
            '"weight_map" must map tensor names to shard file names', index_path
        )
    meta = doc.get("metadata") or {}
    if not isinstance(meta, dict):
        raise CorruptCheckpointError('"metadata" must be a JSON object', index_path)
    total_size = meta.get("total_size")
    if total_size is not None and (
        isinstance(total_size, bool)
        or not isinstance(total_size, (int, float))
        or not math.isfinite(total_size)
        or total_size < 0
    ):
        raise CorruptCheckpointError(
            f'"total_size" {short(total_size)} is not a byte count', index_path
        )

    base = index_path.parent
    wanted: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        wanted.setdefault(shard, []).append(tensor)
    if locate is None:
        shard_paths = {shard: resolve_inside(base, shard, "shard", index_path) for shard in wanted}
    else:
        shard_paths = locate(wanted)

    ckpt = Checkpoint(index_path, Format.SHARDED_SAFETENSORS, files=[index_path])
    found: dict[str, str] = {}  # tensor -> shard it was found in
    formats: set[str] = set()
    st_metadata: dict[str, dict] = {}
    globals_: dict[tuple[str, str, str], GlobalRef] = {}
    entries_seen: set[tuple[str, str]] = set()
    for shard in sorted(wanted):
        shard_path = shard_paths[shard]
        if read_shard is None and not shard_path.is_file():
            raise CorruptCheckpointError(
                f"shard {short(shard)} listed in the index is missing", index_path
            )
        try:
            part, kind = (read_shard or _read_shard)(shard_path)
        except MscopeError as exc:
            raise type(exc)(f"shard {short(shard)}: {exc.message}", index_path, exc.hint) from exc
        except OSError as exc:
            raise NotFoundError(
                f"shard {short(shard)}: cannot read ({exc.strerror or exc})", index_path
            ) from exc
        formats.add(kind)
        ckpt.files.append(shard_path)
        if "safetensors_metadata" in part.metadata:
            st_metadata[shard] = part.metadata["safetensors_metadata"]
        listed = set(wanted[shard])
        unlisted = []
        for t in _flat_tensors(part, shard, ckpt):
            other = found.get(t.name)
            if other is not None:
                raise CorruptCheckpointError(
                    f"tensor {short(t.name)} is in two shards: {other} and {shard}", index_path
                )
            found[t.name] = shard
            t.shard = shard
            ckpt.tensors.append(t)
            if t.name not in listed:
                unlisted.append(t.name)
        missing = [name for name in wanted[shard] if found.get(name) != shard]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CorruptCheckpointError(
                f"tensor {short(missing[0])} is mapped to shard {short(shard)} but is not in it{more}",
                index_path,
            )
        if unlisted:
            more = f" and {len(unlisted) - 1} more" if len(unlisted) > 1 else ""
            ckpt.warnings.append(
                f"shard {shard} holds {short(unlisted[0])}{more} not listed in the index's weight_map"
            )
        for e in part.entries:
            key = (e.path, repr(e.value))
            if key not in entries_seen:
                entries_seen.add(key)
                ckpt.entries.append(Entry(e.path, e.type, e.value))
        for ref in part.globals:
            merge_global(globals_, ref, shard)
        ckpt.warnings.extend(f"shard {shard}: {w}" for w in part.warnings)
        ckpt.problems.extend(f"shard {shard}: {p}" for p in part.problems)
        ckpt.refusals.extend(f"shard {shard}: {r}" for r in part.refusals)

    ckpt.format = Format.SHARDED_SAFETENSORS if formats == {Format.SAFETENSORS} else Format.SHARDED_TORCH
    if ckpt.format == Format.SHARDED_SAFETENSORS:  # shards split the set arbitrarily: one name order
        ckpt.tensors.sort(key=lambda t: natural_key(t.name))
    ckpt.globals = list(globals_.values())
    ckpt.metadata["index"] = index_path.name
    ckpt.metadata["shards"] = len(wanted)
    ckpt.metadata["shard_formats"] = sorted(formats)
    ckpt.metadata["index_metadata"] = {
        k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))
    }
    if total_size is not None:
        ckpt.metadata["total_size"] = total_size
        _check_total_size(ckpt, total_size)
    if st_metadata:
        values = list(st_metadata.values())
        same = all(v == values[0] for v in values)
        ckpt.metadata["safetensors_metadata"] = dict(values[0]) if same else st_metadata
    return ckpt


def _read_shard(path: Path) -> tuple[Checkpoint, str]:
    """Read one shard with the reader its bytes call for; only weight files are accepted."""
    from . import sniff

    kind = sniff(path)
    if kind == Format.SAFETENSORS:
        return read_safetensors(path), kind
    if kind == "zip":
        from .torchzip import read_torch_zip
        from .ziparchive import ZipArchive

        with ZipArchive(path) as archive:
            return read_torch_zip(path, archive), Format.TORCH_ZIP
    if kind == Format.TORCH_LEGACY:
        from .legacy import read_legacy

        return read_legacy(path), kind
    raise UnsupportedFormatError(f"not a weights file (its bytes read as {kind})", path)


def _flat_tensors(part: Checkpoint, shard: str, ckpt: Checkpoint) -> list[TensorRecord]:
    """The shard's tensors under their full state_dict keys (HF shards are flat state_dicts)."""
    if part.module_root is not None:
        ckpt.warnings.append(f"shard {shard} holds a pickled module; only its tensors are listed")
    result = []
    for t in part.tensors:
        if t.section:
            t.name = f"{t.section}.{t.name}"
            t.section = ""
            t.kind = infer_kind(t.name, t.dtype)
            t.kind_from_file = False
        elif part.model_path:
            t.name = f"{part.model_path}.{t.name}"
        result.append(t)
    return result


def merge_global(merged: dict[tuple[str, str, str], GlobalRef], ref: GlobalRef, shard: str) -> None:
    key = (ref.module, ref.name, ref.safety)
    have = merged.get(key)
    if have is None:
        merged[key] = GlobalRef(
            ref.module, ref.name, ref.safety, ref.count, list(ref.calls), shard, ref.reason
        )
        return
    have.count += ref.count
    have.calls.extend(c for c in ref.calls[: max(0, 3 - len(have.calls))] if c not in have.calls)
    shards = have.pickle.split(", ")
    if shard not in shards:
        have.pickle = f"{have.pickle}, {shard}"


def _check_total_size(ckpt: Checkpoint, total_size: float) -> None:
    """Hugging Face writes the bytes of every tensor, counting storages shared by several tensors
    once; older writers counted each tensor (and bool as 1/8 byte). Anything else is a warning:
    the loaders never use the number."""
    every = unique = 0
    seen: set[int] = set()
    for t in ckpt.tensors:
        every += t.nbytes
        if t.storage is None or id(t.storage) not in seen:
            unique += t.nbytes
            if t.storage is not None:
                seen.add(id(t.storage))
    if total_size in (every, unique):
        return
    ckpt.warnings.append(
        f"index metadata total_size is {total_size:,} bytes but the shards' tensors hold {unique:,}"
    )
