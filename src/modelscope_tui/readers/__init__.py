"""Readers: pick the format from the bytes, return a metadata-only Checkpoint.

No reader imports torch, reads tensor bytes, or runs code from the file.
"""

from __future__ import annotations

import errno
import operator
import os
import struct
from pathlib import Path

from ..checkpoint import Checkpoint, Format
from ..errors import (
    CorruptCheckpointError,
    MscopeError,
    NotFoundError,
    SeveralCheckpointsError,
    UnsupportedFormatError,
)
from ..gcpause import paused_gc

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
SAFETENSORS_MAX_HEADER = 100 << 20

FORMAT_LABELS = {
    Format.TORCH_ZIP: "torch.save zip archive",
    Format.TORCH_LEGACY: "torch.save legacy (pre-1.6) file",
    Format.TORCHSCRIPT: "TorchScript archive",
    Format.PICKLE: "plain pickle",
    Format.SAFETENSORS: "safetensors",
    Format.SHARDED_SAFETENSORS: "sharded safetensors",
    Format.SHARDED_TORCH: "sharded torch .bin",
    Format.DCP: "torch.distributed.checkpoint directory",
    Format.GGUF: "GGUF (llama.cpp)",
}


ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header, or an empty archive's end record


def is_zip(path: Path) -> bool:
    """Whether the file starts like a zip archive (torch zip, TorchScript): sniff's own test,
    for callers that only ask this (False when unreadable)."""
    try:
        return _read_head(path, 4) in ZIP_MAGICS
    except OSError:
        return False


def sniff(path: Path) -> str:
    """The format name of a file or directory, decided by content (never by extension alone)."""
    if path.is_dir():
        return _sniff_directory(path)
    head = _read_head(path, 16)
    kind = sniff_head(head, path.name, lambda: path.stat().st_size, path)
    if kind is not None:
        return kind
    if _is_headerless_pickle(path):
        return Format.PICKLE
    if len(head) >= 8 and head[:5] in (b"\x1f\x8b\x08\x00\x00",) or _is_tar(path):
        raise UnsupportedFormatError(
            "this is a compressed or tar file, not a checkpoint", path, "extract it first"
        )
    raise not_a_checkpoint(path)


def not_a_checkpoint(path: object) -> UnsupportedFormatError:
    return UnsupportedFormatError(
        "not a PyTorch checkpoint (unknown file format)", path,
        "mscope reads torch.save, TorchScript, safetensors, sharded HF, DCP and GGUF checkpoints",
    )  # fmt: skip


def sniff_head(head: bytes, name: str, size, where: object) -> str | None:
    """The format its first 16 bytes (and its name, for JSON indexes and DCP) give a file, or
    None: the one place of these rules, for local files and byte sources alike. `size` is a
    callable (only a bad safetensors length asks for it)."""
    if not head:
        raise UnsupportedFormatError("file is empty", where, "the save was interrupted or the download failed")
    if head[:4] in ZIP_MAGICS:
        return "zip"
    if head[:4] == b"GGUF":  # before safetensors: a GGUF of 123 tensors has '{' at byte 8
        return Format.GGUF
    if head[:4] == b"\x80\x02\x8a\x0a" and int.from_bytes(head[4:14], "little") == LEGACY_MAGIC:
        return Format.TORCH_LEGACY
    if len(head) >= 9 and head[8:9] == b"{":
        n = struct.unpack("<Q", head[:8])[0]
        if 2 <= n <= SAFETENSORS_MAX_HEADER:
            return Format.SAFETENSORS
        raise CorruptCheckpointError(f"safetensors header length {n:,} is impossible for a {size():,}-byte file", where)
    if head[:1] == b"{" and name.endswith(".json"):
        return "index-json"
    if name == ".metadata":
        return Format.DCP
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return Format.PICKLE
    return None


# A directory holding one file of these is that checkpoint (`mscope DIR`); several: a list to pick from.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _sniff_directory(path: Path) -> str:
    if (path / "adapter_config.json").is_file():  # readers.peft: PeftModel.save_pretrained's directory
        return "peft-adapter"
    if (path / ".metadata").is_file():
        return Format.DCP
    indexes = sorted(path.glob("*.index.json"))
    if indexes:
        return "index-dir"
    singles = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if len(singles) == 1:
        return "single-in-dir"
    sets = [] if len(singles) == 1 else sorted(p for p in path.iterdir() if p.is_dir() and _is_checkpoint_set(p))
    if len(singles) > 1 or sets:
        others = sorted(p for p in path.iterdir() if p.suffix == ".ckpt" and p.is_file())
        candidates = singles + others + sets
        names = [p.name for p in candidates]
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        raise SeveralCheckpointsError(
            f"directory holds {len(names)} checkpoints, not one set: {shown}", path,
            f"name one, e.g. mscope summary {path / names[0]}", candidates,
        )  # fmt: skip
    raise UnsupportedFormatError(
        "directory holds no checkpoint (no *.index.json, no DCP .metadata, no single weights file)", path
    )


def _is_checkpoint_set(path: Path) -> bool:
    """A sharded set or DCP checkpoint in a subdirectory (listed, not opened, by a parent)."""
    try:
        return (path / ".metadata").is_file() or any(path.glob("*.index.json"))
    except OSError:
        return False


def _read_head(path: Path, n: int) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def _is_headerless_pickle(path: Path, limit: int = 64 << 20) -> bool:
    """Protocol 0/1 pickles (old files, hand-written payloads) have no magic bytes: accept a small
    file whose opcodes parse cleanly to a STOP at its very end."""
    from ..errors import UnsafePickleError
    from .pickle.scan import scan_pickle

    if path.stat().st_size > limit:
        return False
    data = path.read_bytes()
    try:
        return scan_pickle(data, 0, path.name) == len(data.rstrip(b"\n"))
    except UnsafePickleError:
        return False


def _is_tar(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(257)
        return fh.read(5) == b"ustar"


def open_checkpoint(path: str | os.PathLike, strict: bool = True) -> Checkpoint:
    """Read any supported checkpoint's metadata.

    strict: raise CorruptCheckpointError when tensor bytes are missing or short (the CLI's
    summary); audits pass False and report `checkpoint.problems` as findings instead.
    """
    from .sources.location import RemotePath, as_location

    location = as_location(path)
    with paused_gc():
        if isinstance(location, RemotePath):
            from .remote import open_remote

            return open_remote(location, strict, _finish)
        return _open_checkpoint(location, strict)


def _open_checkpoint(path: Path, strict: bool) -> Checkpoint:
    try:
        ckpt = _dispatch(path)
    except MscopeError as exc:
        if exc.path is None:
            exc.path = str(path)
        name = Path(exc.path).name  # "/x/model.pt: model.pt:archive/data.pkl: ..." says it twice
        if name and exc.message.startswith(f"{name}:"):
            exc.message = exc.message[len(name) + 1 :].lstrip()
        if not isinstance(exc, NotFoundError):
            _payloads_of_unreadable(path, exc)
        raise
    except FileNotFoundError as exc:
        raise NotFoundError("no such file or directory", path) from exc
    except PermissionError as exc:
        raise NotFoundError("permission denied", path, "check the file's permissions") from exc
    except IsADirectoryError as exc:
        raise NotFoundError("is a directory", path) from exc
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise NotFoundError("no such file or directory", path) from exc
        raise NotFoundError(f"cannot read: {exc.strerror or exc}", path) from exc
    except RecursionError as exc:  # a last guard: every walk is iterative, but data is hostile
        raise CorruptCheckpointError(
            "the file's objects nest too deeply to read", path, "corrupt or hostile pickle"
        ) from exc
    except MemoryError as exc:
        raise CorruptCheckpointError(
            "reading the file's metadata ran out of memory", path, "corrupt or hostile file"
        ) from exc
    return _finish(ckpt, path, strict)


def _finish(ckpt: Checkpoint, path: object, strict: bool) -> Checkpoint:
    """What every checkpoint goes through after its reader, local or remote."""
    ckpt.cap_names()
    ckpt.link_shared_storages()
    ckpt.check_storage_bounds()
    from ..quant import annotate

    annotate(ckpt)  # before anything builds the module tree: companions sit with their weight
    _check_view_sizes(ckpt, path)
    check_view_budget(ckpt)
    if strict and ckpt.problems:
        more = f" (and {len(ckpt.problems) - 1} more problems)" if len(ckpt.problems) > 1 else ""
        raise CorruptCheckpointError(
            ckpt.problems[0] + more, path, "the file is truncated or corrupt; re-download or re-save it"
        )
    return ckpt


def _payloads_of_unreadable(path: Path, exc: MscopeError) -> None:
    """A file we cannot read may still run code in a loader that reads less carefully: give the
    error every dangerous global a loader would reach (`exc.pickle_globals`; see readers.payloads),
    and make its one line say what would run."""
    from .payloads import dangerous, file_globals, merge
    from .pickle.unpickler import would_call

    found = dangerous(getattr(exc, "pickle_globals", ()))
    said = bool(found)  # safe_load already put them in the message
    if path.is_file():
        found = merge(found, file_globals(path))
    exc.pickle_globals = found  # type: ignore[attr-defined]
    if found and not said:
        exc.message += would_call(found)


MAX_VIEW_EXPANSION = 64


def _check_view_sizes(ckpt: Checkpoint, path: Path) -> None:
    """Refuse a view that repeats its storage's bytes (stride 0, overlapping strides) into more
    than 1 GiB and more than 64x the file: the bounds check cannot see it (the view stays inside
    its storage), and a 1 KB file declaring a 4 TB tensor this way made `audit --stats` read for
    hours. torch.save writes views of real tensors; nothing real expands a file this much."""
    limit = None
    for t in ckpt.tensors:
        s = t.storage
        if s is None or t.nbytes <= 1 << 30 or t.nbytes <= s.nbytes:
            continue
        if limit is None:
            limit = max(1 << 30, MAX_VIEW_EXPANSION * sum(_size(f) for f in ckpt.files))
        if t.nbytes > limit:
            raise CorruptCheckpointError(
                f"tensor {t.qualified_name[:80]!r} {list(t.shape)[:8]} declares {t.nbytes:,} bytes by "
                f"repeating the {s.nbytes:,} bytes of its storage (strides {list(t.stride)[:8]})",
                path,
                "damaged or deliberately crafted; do not load it",
            )


MIN_VIEW_BUDGET = 256 << 20
VIEW_BUDGET_RATIO = 16


_NBYTES = operator.attrgetter("nbytes")


def check_view_budget(ckpt: Checkpoint) -> None:
    """Bound what all of a file's views together make audit and diff read.

    Each view is under the per-tensor limit (_check_view_sizes), but 120 stride-0 views over one
    storage took 30 s in `audit --stats` and 125 s in `diff`. A storage's own bytes are free
    (views that split it, as torch.save writes them, cost nothing); what views read beyond that
    (stride 0, overlapping views) is charged to one budget per file: max(256 MiB, 16x the file).
    Views past it go to `ckpt.over_budget` with a warning that names them; nothing is refused."""
    # What every view reads together bounds what they can be charged: under the smallest budget,
    # nothing is over it (a 100k-tensor state dict skips the per-tensor walk below).
    if sum(map(_NBYTES, ckpt.tensors)) <= MIN_VIEW_BUDGET:
        return
    free: dict[int, int] = {}
    spent = 0
    budget = None
    skipped: list[str] = []
    for t in ckpt.tensors:  # aliases too: diff reads every name, even the same view twice
        s = t.storage
        if s is None or t.numel == 0:
            continue
        left = free.get(id(s))
        if left is None:
            left = s.nbytes
        charge = max(0, t.nbytes - left)
        free[id(s)] = max(0, left - t.nbytes)
        if not charge:
            continue
        if budget is None:
            budget = max(MIN_VIEW_BUDGET, VIEW_BUDGET_RATIO * sum(_size(f) for f in ckpt.files))
        if spent + charge > budget:
            ckpt.over_budget.add(id(t))
            skipped.append(t.qualified_name)
            continue
        spent += charge
    if skipped:
        names = ", ".join(repr(n[:80]) for n in skipped[:3]) + (f" and {len(skipped) - 3:,} more" if len(skipped) > 3 else "")
        ckpt.warnings.append(
            f"{len(skipped):,} view(s) repeat their storage's bytes past the file's budget of "
            f"{budget:,} bytes; their values are not read: {names}"
        )


def _size(path: Path) -> int:
    from .sources.location import file_size

    return file_size(path)


def _dispatch(path: Path) -> Checkpoint:
    if not path.exists():
        raise NotFoundError("no such file or directory", path)
    if not path.is_dir() and not path.is_file():  # opening a FIFO would block forever
        raise UnsupportedFormatError(
            "not a regular file (a pipe, socket or device)", path, "save the checkpoint to a file first"
        )
    kind = sniff(path)
    if kind == "zip":
        from .torchzip import read_torch_zip
        from .ziparchive import ZipArchive

        with ZipArchive(path) as archive:
            return read_torch_zip(path, archive)
    if kind == Format.TORCH_LEGACY:
        from .legacy import read_legacy

        return read_legacy(path)
    if kind == Format.PICKLE:
        from .legacy import read_plain_pickle

        return read_plain_pickle(path)
    if kind == Format.SAFETENSORS:
        from .safetensors import read_safetensors

        return read_safetensors(path)
    if kind == Format.GGUF:
        from .gguf import read_gguf

        return read_gguf(path)
    if kind == "index-json":
        from .sharded import read_sharded

        return read_sharded(path)
    if kind == "index-dir":
        from .sharded import read_sharded

        indexes = sorted(path.glob("*.index.json"))
        preferred = [p for p in indexes if p.name.endswith(".safetensors.index.json")]
        return read_sharded((preferred or indexes)[0])
    if kind == "peft-adapter":
        from .peft import read_adapter

        return read_adapter(path, _dispatch)
    if kind == "single-in-dir":
        single = next(p for p in sorted(path.iterdir()) if p.suffix in WEIGHT_SUFFIXES)
        return _dispatch(single)
    if kind == Format.DCP:
        from .dcp import read_dcp

        return read_dcp(path if path.is_dir() else path.parent)
    raise UnsupportedFormatError(f"unsupported format {kind}", path)

