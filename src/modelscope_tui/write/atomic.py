"""Saves that never lose the user's file: temp file in the same directory, fsync, rename.

A save goes to a new path by default; overwriting needs `overwrite=True` and keeps a backup.
Every writer of mscope (checkpoints, plans, device maps) goes through `atomic_write`; the
copying helpers below move source bytes into it and check the source did not change meanwhile.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from ..errors import MscopeError
from ..readers.sources.location import RemotePath

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


def local_source(path: object) -> Path:
    """The local file a writer copies from: a checkpoint read over a URL has none (writers copy
    bytes they have not fetched), so say what to do instead of failing half way."""
    if isinstance(path, RemotePath):
        raise SaveError(
            "writing a changed copy needs the checkpoint on this disk", path,
            "download it, open the local copy, and write from there",
        )  # fmt: skip
    return Path(path)  # type: ignore[arg-type]


def sibling_path(source: Path, tag: str, suffix: str | None = None) -> Path:
    """A new file next to `source`: model.pt -> model.<tag>.pt (never an existing file). For a
    URL, in the current directory: a file's URL never becomes a local path."""
    if isinstance(source, RemotePath):
        source = Path.cwd() / (source.name or "checkpoint")
    suffix = source.suffix if suffix is None else suffix
    stem = source.name[: -len(source.suffix)] if source.suffix else source.name
    return next_free_path(source.with_name(f"{stem}.{tag}{suffix}"))


def check_destination(dest: Path, overwrite: bool) -> None:
    """What a save refuses before writing anything: a directory, a symbolic link (the write
    would replace the link, not its target), an existing file without `overwrite`."""
    if dest.is_dir():
        raise SaveError("destination is a directory", dest, "choose a file name")
    if dest.is_symlink():
        raise SaveError("destination is a symbolic link", dest, "save to the link's target or a new name")
    if dest.exists() and not overwrite:
        raise SaveError("destination exists", dest, "choose a new name or confirm overwriting")


def atomic_write(
    dest: str | os.PathLike, write: Callable[[BinaryIO], None], *, overwrite: bool = False
) -> Path:
    """Write `dest` through a temp file + fsync + rename.

    Without `overwrite`, an existing `dest` is an error. With it, the old file is kept as
    `dest.bak` first (a hard link renamed into place, so the backup is never partial either).
    On any failure the temp file is removed and `dest` is untouched. Temp files are named
    `.NAME.mscope-tmp-PID-XXXXXXXX`; one left by a process that was killed is removed by the next
    save into the same directory.
    """
    dest = Path(dest)
    check_destination(dest, overwrite)
    directory = dest.parent if str(dest.parent) else Path(".")
    remove_stale_temps(directory)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(dest.name), dir=directory)
    except OSError as exc:
        raise SaveError(f"cannot write here: {exc.strerror or exc}", dest, _hint(exc)) from exc
    tmp = Path(tmp_name)
    try:
        # mkstemp makes 0600; a new file should get what open() would give it (0666 less the
        # umask), so a teammate can read a plan on a shared box. Writers that copy the source's
        # mode (checkpoints) set it again inside write().
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if dest.exists():
            _backup(dest, directory)
        os.replace(tmp, dest)
        _fsync_dir(directory)
    except MscopeError:
        tmp.unlink(missing_ok=True)
        raise
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SaveError(f"save failed: {exc.strerror or exc}", dest, _hint(exc)) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def atomic_write_set(
    files: list[tuple[Path, Callable[[BinaryIO], None]]], *, overwrite: bool = False
) -> list[Path]:
    """Write several files as one set (shards and their index): every file to a temp name and
    fsync'ed first, then renamed in the order given (the index last), so a failure or Ctrl-C
    while writing leaves none of them, and a reader never finds an index before its shards.
    Each destination is checked as `atomic_write` checks it before anything is written; with
    `overwrite`, each replaced file is kept as `.bak`."""
    dests = [Path(d) for d, _ in files]
    for dest in dests:
        check_destination(dest, overwrite)
    temps: list[Path] = []
    try:
        for dest, write in zip(dests, (w for _, w in files)):
            directory = dest.parent if str(dest.parent) else Path(".")
            remove_stale_temps(directory)
            try:
                fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(dest.name), dir=directory)
            except OSError as exc:
                raise SaveError(
                    f"cannot write here: {exc.strerror or exc}", dest, _hint(exc)
                ) from exc
            temps.append(Path(tmp_name))
            os.fchmod(fd, 0o666 & ~current_umask())
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
        while temps:
            dest = dests[len(dests) - len(temps)]
            if dest.exists():
                _backup(dest, dest.parent)
            os.replace(temps[0], dest)
            temps.pop(0)
        for directory in {d.parent for d in dests}:
            _fsync_dir(directory)
    except MscopeError:
        _remove(temps)
        raise
    except OSError as exc:
        _remove(temps)
        raise SaveError(f"save failed: {exc.strerror or exc}", dests[0], _hint(exc)) from exc
    except BaseException:
        _remove(temps)
        raise
    return dests


def _remove(paths: list[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc); else
    the set-and-restore dance (a brief window in which another thread's new file gets 022)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_prefix(name: str) -> str:
    return f".{name[:120]}{TEMP_MARK}{os.getpid()}-"  # short enough for 255-byte names


def _hint(exc: OSError) -> str:
    reason = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EFBIG: "the file is too large for this file system or limit",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
    }.get(exc.errno)
    return f"{reason}; nothing was changed" if reason else "nothing was changed"


def _backup(dest: Path, directory: Path) -> None:
    """`dest` -> `dest.bak`, replacing an older backup only once the new one is complete."""
    bak = backup_path(dest)
    tmp = directory / f"{_temp_prefix(bak.name)}{os.urandom(4).hex()}"
    try:
        os.link(dest, tmp)  # instant, no copy: the rename of the new file leaves this inode alone
    except OSError:
        try:
            with open(dest, "rb") as src, open(tmp, "xb") as out:
                shutil.copyfileobj(src, out, COPY_CHUNK)
                out.flush()
                os.fsync(out.fileno())
            shutil.copystat(dest, tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    try:
        os.replace(tmp, bak)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove this directory's temp files whose writer is gone (its PID is not running, or now
    names a process younger than the file). Only our own regular files are touched."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        owner = temp_owner(entry.name)
        if owner is None:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                continue
            if _writer_alive(owner, st.st_mtime):
                continue
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed


def temp_owner(name: str) -> int | None:
    """The PID encoded in one of our temp file names, else None."""
    if not name.startswith(".") or TEMP_MARK not in name:
        return None
    pid, sep, _ = name.rsplit(TEMP_MARK, 1)[1].partition("-")
    return int(pid) if sep and pid.isdigit() and 0 < int(pid) < 1 << 32 else None


def _writer_alive(pid: int, mtime: float) -> bool:
    if pid == os.getpid():
        return True  # another save of ours, maybe on another thread
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # EPERM: running, as another user
    started = _process_start_time(pid)
    return started is None or started <= mtime + 1


def _process_start_time(pid: int) -> float | None:
    """Seconds since the epoch at which `pid` started (Linux /proc), or None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as fh:
            btime = next(int(line.split()[1]) for line in fh if line.startswith(b"btime "))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


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


# ----------------------------------------------------------------------------------------------
# Copying from a source that must not change meanwhile
# ----------------------------------------------------------------------------------------------
COPY_CHUNK = 8 << 20


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Append src[offset:offset+length] to dst at its current position (kernel copy if it can)."""
    end = offset + length
    copy_file_range = getattr(os, "copy_file_range", None)
    while offset < end and copy_file_range is not None:
        try:
            n = copy_file_range(src_fd, dst_fd, min(end - offset, 1 << 30), offset)
        except OSError as exc:
            if exc.errno in (
                errno.EXDEV,
                errno.ENOSYS,
                errno.EINVAL,
                errno.EOPNOTSUPP,
                errno.EPERM,
                errno.EBADF,
            ):
                break  # not across these file systems: plain reads and writes below
            raise
        if n == 0:
            break  # nothing copied (some file systems): finish with plain reads and writes
        offset += n
    while offset < end:
        chunk = os.pread(src_fd, min(end - offset, COPY_CHUNK), offset)
        if not chunk:
            raise OSError(errno.EIO, "the source ended early while it was being copied")
        write_all(dst_fd, chunk)
        offset += len(chunk)


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out (it may write fewer than asked)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def file_state(paths: Iterable[Path]) -> dict[Path, tuple[int, int]]:
    """(size, mtime) of each source before a copy; check_unchanged compares after it."""
    state = {}
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as exc:
            raise SaveError(f"cannot read the source: {exc.strerror or exc}", p) from exc
        state[p] = (st.st_size, st.st_mtime_ns)
    return state


def check_unchanged(before: dict[Path, tuple[int, int]]) -> None:
    for p, old in before.items():
        try:
            st = os.stat(p)
        except OSError as exc:
            raise SaveError("the source disappeared while it was being copied", p) from exc
        if (st.st_size, st.st_mtime_ns) != old:
            raise SaveError("the source changed while it was being copied", p, "try again")


def as_save_error(exc: MscopeError, path: Path) -> SaveError:
    """A reader's error met while writing, as the SaveError the caller expects (same line)."""
    if isinstance(exc, SaveError):
        return exc
    return SaveError(exc.message, exc.path or path, exc.hint)


def keep_mode(fh: BinaryIO, source: Path) -> None:
    """The copy gets the source's permission bits (best effort)."""
    try:
        os.fchmod(fh.fileno(), os.stat(source).st_mode & 0o7777)
    except OSError:
        pass
