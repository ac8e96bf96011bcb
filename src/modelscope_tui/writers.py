"""Saves that never lose the user's file: temp file in the same directory, fsync, rename.

A save goes to a new path by default; overwriting needs `overwrite=True` and keeps a backup.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import MscopeError

TEMP_MARK = ".mscope-tmp-"


class SaveError(MscopeError):
    """A save could not complete; the original and destination are as they were."""


def backup_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".bak")


def next_free_path(path: Path) -> Path:
    """`path`, or `stem-1.ext`, `stem-2.ext`... whichever does not exist yet."""
    if not path.exists():
        return path
    stem, suffix = path.stem, path.suffix
    for i in range(1, 10_000):
        candidate = path.with_name(f"{stem}-{i}{suffix}")
        if not candidate.exists():
            return candidate
    raise SaveError("no free file name", path)


def sibling_path(source: Path, tag: str, suffix: str | None = None) -> Path:
    """A new file next to `source`: model.pt -> model.<tag>.pt (never an existing file)."""
    suffix = source.suffix if suffix is None else suffix
    stem = source.name[: -len(source.suffix)] if source.suffix else source.name
    return next_free_path(source.with_name(f"{stem}.{tag}{suffix}"))


def atomic_write(dest: str | os.PathLike, write: Callable[[BinaryIO], None], *, overwrite: bool = False) -> Path:
    """Write `dest` through a temp file + fsync + rename.

    Without `overwrite`, an existing `dest` is an error. With it, the old file is kept as
    `dest.bak` first. On any failure the temp file is removed and `dest` is untouched.
    """
    dest = Path(dest)
    if dest.is_dir():
        raise SaveError("destination is a directory", dest, "choose a file name")
    if dest.is_symlink():
        raise SaveError("destination is a symbolic link", dest, "save to the link's target or a new name")
    if dest.exists() and not overwrite:
        raise SaveError("destination exists", dest, "choose a new name or confirm overwriting")
    directory = dest.parent if str(dest.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}{TEMP_MARK}", dir=directory)
    except OSError as exc:
        raise SaveError(f"cannot write here: {exc.strerror or exc}", dest) from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if dest.exists():
            shutil.copy2(dest, backup_path(dest))
        os.replace(tmp, dest)
        _fsync_dir(directory)
    except MscopeError:
        tmp.unlink(missing_ok=True)
        raise
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SaveError(f"save failed: {exc.strerror or exc}", dest, "nothing was changed") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
