"""Shared fixtures: run the CLI as a user does, and small real checkpoints to break."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
TESTS = Path(__file__).resolve().parent

# Test modules reuse each other's cases across folders (hostile/ reuses the CLI's bad inputs,
# functional/ the Pilot helpers): every folder is importable by module name.
for _folder in ("unit", "functional", "hostile"):
    if str(TESTS / _folder) not in sys.path:
        sys.path.append(str(TESTS / _folder))

# The fast loop (`pytest -m "not slow"`, under a minute) leaves out what starts terminals,
# subprocess CLIs per case, builds wheels or walks corpora; the full suite is the README's command.
SLOW_FILES = {
    "test_corpus.py", "test_exit_codes.py", "test_inflate.py", "test_differential.py", "test_limits.py",
    "test_grammar.py", "test_crash_safe_saves.py", "test_native.py", "test_fuzz.py", "test_nesting_memo.py",
    "test_names.py", "test_dangerous_calls.py", "test_payload_anywhere.py", "test_terminal_text.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        folder = item.path.parent.name
        if folder in ("unit", "functional", "hostile"):
            item.add_marker(getattr(pytest.mark, folder))
        if folder == "functional" or item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)


@dataclass
class CliResult:
    rc: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(
    *args: str | os.PathLike, timeout: float = 30, columns: int = 100, memory: int | None = None
) -> CliResult:
    """`python -m modelscope_tui ARGS` in a subprocess; raises on timeout (a hang is a bug).

    memory: cap the address space (bytes, `ulimit -v`), so an allocation the file asks for
    fails loudly instead of quietly succeeding on a big machine.
    """
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "dumb", "NO_COLOR": "1"}
    env.pop("PYTHONSTARTUP", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # let imports use cached bytecode: 2x faster startup
    argv = [sys.executable, "-m", "modelscope_tui", *map(str, args)]
    if memory is not None:  # a shell, not preexec_fn: that would force a slow fork of a big parent
        argv = ["/bin/sh", "-c", f'ulimit -v {memory // 1024} && exec "$0" "$@"', *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli():
    return run_cli


def small_state_dict(seed: int = 0) -> dict:
    """A real state_dict of a tiny conv net (weights, biases, BatchNorm buffers)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2)
    )
    return net.state_dict()


@pytest.fixture
def state_dict():
    return small_state_dict()


@pytest.fixture
def torch_file(tmp_path):
    """A real torch.save zip of `small_state_dict()`."""
    import torch

    path = tmp_path / "model.pt"
    torch.save(small_state_dict(), path)
    return path


@pytest.fixture
def legacy_file(tmp_path):
    """The same state_dict in the pre-1.6 format."""
    import torch

    path = tmp_path / "legacy.pt"
    torch.save(small_state_dict(), path, _use_new_zipfile_serialization=False)
    return path


async def settle(pilot) -> None:
    """Wait until the app's workers stop starting new ones (streams start follow-up workers)."""
    for _ in range(200):
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()
        if not any(w.is_running for w in pilot.app.workers):
            return
