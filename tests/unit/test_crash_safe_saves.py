"""No save ever leaves the user without a good copy of their file.

Kill test: a subprocess performs a real save (a 42 MB full-module checkpoint with new
requires_grad flags, in place or to a new name, and a freeze plan) and is SIGKILLed at a random
moment. Afterwards the original is byte-identical (or, for an in-place save, is the complete new
file with the original kept as `.bak`), the destination is absent or complete, and the only
leftovers are temp files named `.NAME.mscope-tmp-PID-...`, which the next save into that directory
removes. Then the failures a save can meet: disk full (a real write limit in a subprocess, and
ENOSPC injected), permission denied, read-only file system, destination a directory or a symlink:
one clear line, nothing half-written, the original untouched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from modelscope_tui.readers import open_checkpoint
from modelscope_tui.training.plan import load_plan, save_plan
from modelscope_tui.training.session import Session
from modelscope_tui.write import atomic, requires_grad
from modelscope_tui.write.atomic import (
    TEMP_MARK,
    SaveError,
    atomic_write,
    remove_stale_temps,
    temp_owner,
)
from modelscope_tui.write.requires_grad import save_with_requires_grad

LAYERS = 10  # Linear(1024, 1024) each: 42 MB of float32
FROZEN = {f"{i}.{p}": False for i in range(0, LAYERS, 2) for p in ("weight", "bias")}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temps(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if TEMP_MARK in p.name)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> dict:
    """The source checkpoint, the expected result of the save, and their hashes."""
    root = tmp_path_factory.mktemp("crash")
    torch.manual_seed(0)
    src = root / "model.pt"
    torch.save(nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(LAYERS)]), src)
    expected = save_with_requires_grad(open_checkpoint(src), FROZEN, root / "expected.pt")
    loaded = torch.load(expected, weights_only=False)
    flags = {name: p.requires_grad for name, p in loaded.named_parameters()}
    assert flags == {name: name not in FROZEN for name in flags}
    return {"src": src, "src_sha": sha(src), "expected_sha": sha(expected), "root": root}


CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    mode, src, dest, overwrite = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    slow = float(os.environ.get("SLOW_FSYNC", "0"))
    if slow:  # widen the window between the last write and the rename (a slow disk)
        real_fsync = os.fsync
        def fsync(fd):
            time.sleep(slow)
            real_fsync(fd)
        os.fsync = fsync
    from modelscope_tui.readers import open_checkpoint
    ckpt = open_checkpoint(src)
    frozen = json.loads(os.environ["FROZEN"])
    if mode == "plan":
        from modelscope_tui.training.plan import save_plan
        from modelscope_tui.training.session import Session
        session = Session(ckpt)
        session.freeze(list(frozen))
    print("ready", flush=True)
    start = time.perf_counter()
    if mode == "plan":
        save_plan(session, dest, overwrite=overwrite)
    else:
        from modelscope_tui.write.requires_grad import save_with_requires_grad
        save_with_requires_grad(ckpt, frozen, dest, overwrite=overwrite)
    print(f"done {time.perf_counter() - start:.4f}", flush=True)
    """
)


def start_save(
    mode: str, src: Path, dest: Path, overwrite: bool, slow: float = 0
) -> subprocess.Popen:
    env = {**os.environ, "FROZEN": json.dumps(FROZEN), "SLOW_FSYNC": str(slow)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, str(src), str(dest), "1" if overwrite else "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = proc.stdout.readline()
    assert line.strip() == "ready", (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


def save_seconds(mode: str, src: Path, directory: Path, slow: float = 0) -> float:
    proc = start_save(mode, src, directory / "calibrate.out", False, slow)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    (directory / "calibrate.out").unlink()
    return float(out.split()[1])


def kill_at_random(proc: subprocess.Popen, delay: float) -> bool:
    """SIGKILL after `delay` seconds; True when the kill landed before the save finished."""
    time.sleep(delay)
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    return not finished and proc.returncode == -signal.SIGKILL


def check_leftovers(directory: Path, pid: int, keep: set[str]) -> int:
    """Only our clearly named temp files may be left, and the next save removes them."""
    stray = [p.name for p in directory.iterdir() if p.name not in keep and TEMP_MARK not in p.name]
    assert not stray, stray
    left = temps(directory)
    assert all(temp_owner(p.name) == pid for p in left), [p.name for p in left]
    atomic_write(directory / "next.json", lambda fh: fh.write(b"{}"))
    assert not temps(directory), "the next save did not remove a stale temp file"
    (directory / "next.json").unlink()
    return len(left)


# (mode, in place, trials): 24 kills in all
TRIALS = [("checkpoint", False, 12), ("checkpoint", True, 6), ("plan", False, 6)]


@pytest.mark.parametrize(
    ("mode", "in_place", "trials"),
    TRIALS,
    ids=[f"{m}-{'in-place' if i else 'new'}" for m, i, _ in TRIALS],
)
def test_sigkill_at_random_moments(model_file, tmp_path, mode, in_place, trials):
    src = model_file["src"]
    # the plan is small: slow its fsync so that kills also land between write and rename
    slow = 0.15 if mode == "plan" else 0
    window = save_seconds(mode, src, tmp_path, slow) * 2 + 0.05  # kills before, during, after
    src_stat = os.stat(src)
    rng = random.Random(f"{mode}{in_place}")
    outcomes = {"untouched": 0, "complete": 0, "mid-save kills": 0, "temps left": 0}
    for trial in range(trials):
        directory = tmp_path / f"trial{trial}"
        directory.mkdir()
        if in_place:
            target = directory / "model.pt"
            shutil.copyfile(src, target)
            source = target
        else:
            source, target = (
                src,
                directory / ("model.plan.json" if mode == "plan" else "model.frozen.pt"),
            )
        proc = start_save(mode, source, target, overwrite=in_place, slow=slow)
        delay = window * (trial + rng.random()) / trials  # stratified: the whole window is hit
        outcomes["mid-save kills"] += kill_at_random(proc, delay)

        after = os.stat(src)  # the shared source: never opened for writing (hashed at the end)
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
            src_stat.st_ino, src_stat.st_size, src_stat.st_mtime_ns,
        )  # fmt: skip
        bak = directory / "model.pt.bak"
        if in_place:  # the original, or the new file with the original as its backup
            if sha(target) == model_file["src_sha"]:
                outcomes["untouched"] += 1
                assert not bak.exists() or sha(bak) == model_file["src_sha"]
            else:
                assert sha(target) == model_file["expected_sha"], "torn in-place save"
                assert sha(bak) == model_file["src_sha"], "in-place save without a good backup"
                outcomes["complete"] += 1
        elif target.exists():
            if mode == "plan":
                plan = load_plan(target)  # parses and validates: a complete plan
                assert sorted(plan["frozen"]) == sorted(FROZEN)
            else:
                assert sha(target) == model_file["expected_sha"], "torn checkpoint"
            outcomes["complete"] += 1
        else:
            outcomes["untouched"] += 1
        keep = {"model.pt", "model.pt.bak", target.name}
        outcomes["temps left"] += check_leftovers(directory, proc.pid, keep)
    print(mode, "in place" if in_place else "new file", outcomes)
    assert sha(src) == model_file["src_sha"]
    assert outcomes["mid-save kills"] >= max(1, trials // 4), outcomes


# ----------------------------------------------------------------------------------------------
# Stale temp files
# ----------------------------------------------------------------------------------------------
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_cleanup_rules(tmp_path):
    dead = dead_pid()
    stale = tmp_path / f".model.pt{TEMP_MARK}{dead}-abcd1234"
    mine = tmp_path / f".model.pt{TEMP_MARK}{os.getpid()}-abcd1234"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = tmp_path / f".model.pt{TEMP_MARK}{live.pid}-abcd1234"
        reused = (
            tmp_path / f".other.pt{TEMP_MARK}{live.pid}-ffff0000"
        )  # older than its PID's process
        unrelated = [
            tmp_path / "model.pt",
            tmp_path / f"x{TEMP_MARK}{dead}-1",
            tmp_path / f".y{TEMP_MARK}abc-1",
        ]
        for path in [stale, mine, running, reused, *unrelated]:
            path.write_bytes(b"partial")
        old = time.time() - 3600
        os.utime(reused, (old, old))
        link = tmp_path / f".link{TEMP_MARK}{dead}-00000000"
        link.symlink_to(tmp_path / "model.pt")
        folder = tmp_path / f".dir{TEMP_MARK}{dead}-00000000"
        folder.mkdir()
        removed = remove_stale_temps(tmp_path)
        assert sorted(removed) == sorted([stale, reused])
        assert mine.exists() and running.exists() and link.is_symlink() and folder.is_dir()
        assert all(p.exists() for p in unrelated)
    finally:
        live.kill()
        live.wait()


def test_temp_names_are_clear_and_carry_the_pid(tmp_path, monkeypatch):
    seen = []

    def write(fh):
        seen.extend(p.name for p in temps(tmp_path))
        fh.write(b"data")

    long_name = "m" * 240 + ".pt"  # the temp name must still fit in 255 bytes
    for name in ("model.pt", long_name):
        atomic_write(tmp_path / name, write)
    assert len(seen) == 2
    for name in seen:
        assert name.startswith(".") and TEMP_MARK in name and len(name) <= 255
        assert temp_owner(name) == os.getpid()
    assert not temps(tmp_path)


# ----------------------------------------------------------------------------------------------
# Failures: one line, nothing half-written, the original untouched
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def small_source(tmp_path) -> tuple[Path, dict]:
    src = tmp_path / "small.pt"
    torch.save(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)), src)
    return src, {"0.weight": False, "0.bias": False}


def assert_clean_failure(info, directory: Path, before: dict[Path, str], *words: str) -> str:
    line = info.value.line()
    assert "\n" not in line and "Traceback" not in line
    for word in words:
        assert word in line, line
    assert not temps(directory), temps(directory)
    for path, digest in before.items():
        assert sha(path) == digest
    return line


def snapshot(*paths: Path) -> dict[Path, str]:
    return {p: sha(p) for p in paths}


def test_disk_full_real_write_limit(small_source, tmp_path):
    """A real short write: the save runs under RLIMIT_FSIZE (the kernel refuses with EFBIG)."""
    src, frozen = small_source
    code = textwrap.dedent(
        f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        from modelscope_tui.readers import open_checkpoint
        from modelscope_tui.write.atomic import SaveError
        from modelscope_tui.write.requires_grad import save_with_requires_grad
        try:
            save_with_requires_grad(open_checkpoint({str(src)!r}), {frozen!r}, {str(tmp_path / "out.pt")!r})
        except SaveError as exc:
            print(exc.line())
            sys.exit(2)
        """
    )
    before = snapshot(src)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert "save failed" in result.stdout and "nothing was changed" in result.stdout
    assert len(result.stdout.splitlines()) == 1 and not result.stderr
    assert not (tmp_path / "out.pt").exists() and not temps(tmp_path)
    assert snapshot(src) == before


def tmpfs(size_kb: int) -> Path | None:
    """A tiny tmpfs of our own (root in a container that allows mounts), else None."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return None
    where = Path(tempfile.mkdtemp(prefix="mscope-tmpfs-"))
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)],
        capture_output=True,
        timeout=30,
    )
    if result.returncode != 0:
        where.rmdir()
        return None
    return where


def test_disk_full_tiny_tmpfs(small_source):
    src, frozen = small_source
    where = tmpfs(64)
    if where is None:
        pytest.skip("cannot mount a tmpfs here (ENOSPC is injected in the next test instead)")
    try:
        local = where / "small.pt"
        shutil.copyfile(src, local)
        free = os.statvfs(where).f_bavail * os.statvfs(where).f_frsize
        (where / "filler").write_bytes(b"\0" * max(0, free - local.stat().st_size // 2))
        before = snapshot(local)
        with pytest.raises(SaveError) as info:
            save_with_requires_grad(open_checkpoint(local), frozen, where / "out.pt")
        assert_clean_failure(info, where, before, "disk is full")
        assert not (where / "out.pt").exists()
    finally:
        subprocess.run(["umount", str(where)], capture_output=True, timeout=30)
        where.rmdir()


@pytest.mark.parametrize("at", ["write", "fsync", "rename"])
def test_disk_full_injected(small_source, tmp_path, monkeypatch, at):
    src, frozen = small_source
    ckpt = open_checkpoint(src)
    dest = tmp_path / "out.pt"
    old = tmp_path / "existing.pt"
    old.write_bytes(b"the user's older file")
    before = snapshot(src, old)
    enospc = OSError(errno.ENOSPC, "No space left on device")
    if at == "write":
        real = atomic.write_all

        def write_all(fd, data):
            real(fd, data[: len(data) // 2])
            raise enospc

        monkeypatch.setattr(requires_grad, "copy_range", lambda *a: write_all(a[1], b"x" * 1000))
    elif at == "fsync":
        monkeypatch.setattr(atomic.os, "fsync", lambda fd: (_ for _ in ()).throw(enospc))
    else:
        monkeypatch.setattr(atomic.os, "replace", lambda a, b: (_ for _ in ()).throw(enospc))
    for target, overwrite in ((dest, False), (old, True)):
        with pytest.raises(SaveError) as info:
            save_with_requires_grad(ckpt, frozen, target, overwrite=overwrite)
        assert_clean_failure(info, tmp_path, before, "No space left", "disk is full")
    assert not dest.exists()


def test_plan_disk_full(small_source, tmp_path, monkeypatch):
    src, _ = small_source
    session = Session(open_checkpoint(src))
    session.freeze(["0.weight"])
    plan = tmp_path / "plan.json"
    save_plan(session, plan)
    before = snapshot(src, plan)

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            self.fh.write(data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")

    real = atomic.os.fdopen
    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: _Wrapped(real(fd, mode), Full))
    with pytest.raises(SaveError) as info:
        save_plan(session, plan, overwrite=True)
    assert_clean_failure(info, tmp_path, before, "disk is full")
    assert not (tmp_path / "plan.json.bak").exists()


class _Wrapped:
    """A file object whose write goes through `wrapper` (context manager and fileno kept)."""

    def __init__(self, fh, wrapper):
        self.fh, self.write = fh, wrapper(fh).write

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def __getattr__(self, name):
        return getattr(self.fh, name)


@pytest.mark.parametrize(
    ("err", "words"),
    [
        (errno.EACCES, ("cannot write here", "Permission denied", "permission denied")),
        (errno.EROFS, ("cannot write here", "Read-only file system", "read-only")),
    ],
    ids=["permission-denied", "read-only-fs"],
)
def test_cannot_create_temp(small_source, tmp_path, monkeypatch, err, words):
    """Root ignores permissions, so the refusal the kernel would give is injected."""
    src, frozen = small_source
    before = snapshot(src)

    def refuse(*args, **kwargs):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", refuse)
    with pytest.raises(SaveError) as info:
        save_with_requires_grad(open_checkpoint(src), frozen, tmp_path / "out.pt")
    assert_clean_failure(info, tmp_path, before, *words)
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_for_real(small_source, tmp_path):
    src, frozen = small_source
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(SaveError, match="cannot write here"):
            save_with_requires_grad(open_checkpoint(src), frozen, locked / "out.pt")
        assert not list(locked.iterdir())
    finally:
        locked.chmod(0o755)


def test_permission_denied_on_rename_keeps_everything(small_source, tmp_path, monkeypatch):
    src, frozen = small_source
    dest = tmp_path / "dest.pt"
    dest.write_bytes(b"older")
    before = snapshot(src, dest)

    def refuse(a, b):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(SaveError) as info:
        save_with_requires_grad(open_checkpoint(src), frozen, dest, overwrite=True)
    assert_clean_failure(info, tmp_path, before, "permission denied")


@pytest.mark.parametrize("kind", ["directory", "symlink", "dangling-symlink", "symlink-to-dir"])
def test_destination_directory_or_symlink(small_source, tmp_path, kind):
    src, frozen = small_source
    session = Session(open_checkpoint(src))
    target = tmp_path / "target.pt"
    target.write_bytes(b"the link's target")
    dest = tmp_path / "dest"
    if kind == "directory":
        dest.mkdir()
    elif kind == "symlink":
        dest.symlink_to(target)
    elif kind == "dangling-symlink":
        dest.symlink_to(tmp_path / "nowhere")
    else:
        (tmp_path / "adir").mkdir()
        dest.symlink_to(tmp_path / "adir")
    before = snapshot(src, target)
    for save in (
        lambda: save_with_requires_grad(open_checkpoint(src), frozen, dest, overwrite=True),
        lambda: save_plan(session, dest, overwrite=True),
    ):
        with pytest.raises(SaveError) as info:
            save()
        word = "directory" if kind in ("directory", "symlink-to-dir") else "symbolic link"
        assert_clean_failure(info, tmp_path, before, word)
    assert dest.is_dir() if kind == "directory" else dest.is_symlink()
    assert not (tmp_path / "nowhere").exists()


def test_overwrite_only_on_request_and_keeps_a_backup(small_source, tmp_path):
    src, frozen = small_source
    ckpt = open_checkpoint(src)
    original = sha(src)
    with pytest.raises(SaveError, match="destination exists"):
        save_with_requires_grad(ckpt, frozen, src)
    assert sha(src) == original and not temps(tmp_path)
    save_with_requires_grad(ckpt, frozen, src, overwrite=True)
    assert sha(tmp_path / "small.pt.bak") == original
    loaded = torch.load(src, weights_only=False)
    assert not loaded[0].weight.requires_grad and loaded[1].weight.requires_grad
    # a second in-place save replaces the backup only with a complete one
    second = sha(src)
    save_with_requires_grad(open_checkpoint(src), {"1.weight": False}, src, overwrite=True)
    assert sha(tmp_path / "small.pt.bak") == second
    session = Session(ckpt)
    plan = tmp_path / "plan.json"
    save_plan(session, plan)
    first_plan = plan.read_bytes()
    with pytest.raises(SaveError, match="destination exists"):
        save_plan(session, plan)
    session.freeze(["0.bias"])
    save_plan(session, plan, overwrite=True)
    assert (tmp_path / "plan.json.bak").read_bytes() == first_plan
    assert load_plan(plan)["frozen"] == ["0.bias"]
    assert not temps(tmp_path)


def test_backup_falls_back_to_a_copy_without_hard_links(small_source, tmp_path, monkeypatch):
    src, frozen = small_source
    original = sha(src)

    def no_links(a, b):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(atomic.os, "link", no_links)
    save_with_requires_grad(open_checkpoint(src), frozen, src, overwrite=True)
    assert sha(tmp_path / "small.pt.bak") == original
    assert not temps(tmp_path)
