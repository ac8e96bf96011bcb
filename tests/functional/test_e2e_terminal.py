"""The real `mscope` console script in a real terminal (tmux): keys in, screen text out."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"
MSCOPE = Path(sys.executable).parent / "mscope"

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None or not MSCOPE.exists(), reason="needs tmux and the mscope script")


class Terminal:
    def __init__(self, command: list[str], cwd: Path, width: int = 80, height: int = 24):
        self.name = f"mscope-test-{uuid.uuid4().hex[:8]}"
        shell = " ".join(command) + "; echo EXITED:$?; sleep 30"
        subprocess.run(
            ["tmux", "new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height), "-c", str(cwd), shell],
            check=True,
            env={"PATH": "/usr/bin:/bin", "TERM": "xterm-256color", "HOME": str(cwd), "LANG": "C.UTF-8"},
        )

    def screen(self) -> str:
        out = subprocess.run(["tmux", "capture-pane", "-t", self.name, "-p"], capture_output=True, text=True)
        return out.stdout

    def keys(self, *keys: str, literal: bool = False) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *(["-l"] if literal else []), *keys], check=True)

    def wait_for(self, text: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{text!r} never appeared; screen was:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def test_freeze_half_and_save_plan_in_a_real_terminal(tmp_path):
    shutil.copy(SAMPLES / "transformer_tied.pt", tmp_path / "model.pt")
    term = Terminal([str(MSCOPE), "model.pt"], tmp_path)
    try:
        term.wait_for("trainable 21.8K / 21.8K (100.0%)")
        screen = term.screen()
        assert "blocks" in screen and "embed" in screen
        term.keys("p")
        term.wait_for("Freeze by pattern")
        term.keys("blocks.0.*", literal=True)
        term.wait_for("12 tensors")
        term.keys("Enter")
        term.wait_for("(60.7%)")
        term.wait_for("unsaved")
        term.keys("s")
        term.wait_for("Save freeze plan")
        term.keys("Enter")
        term.wait_for("plan saved")
        term.keys("q")
        term.wait_for("EXITED:0")
    finally:
        term.close()
    plan = json.loads((tmp_path / "model.freeze-plan.json").read_text())
    assert "blocks.0.linear1.weight" in plan["frozen"] and "blocks.1.linear1.weight" in plan["trainable"]


def test_bad_file_prints_one_line(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    term = Terminal([str(MSCOPE), "junk.pt"], tmp_path)
    try:
        screen = term.wait_for("EXITED:2")
    finally:
        term.close()
    assert "mscope: error: junk.pt:" in screen
    assert "Traceback" not in screen


def test_gpu_panel_rows_update_in_a_real_terminal(tmp_path):
    """The panel repaints only the rows that changed (the sparkline, a figure or two): in a real
    terminal every changed row must still arrive. The sparkline gains a point each tick."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "from modelscope_tui.gpu.monitor import GpuMonitor\n"
        "from modelscope_tui.gpu.simulated import SimulatedBackend\n"
        "from modelscope_tui.tui.app import MscopeApp\n"
        "GpuMonitor.from_env = classmethod(lambda cls, env=None, **kw: cls(SimulatedBackend(1, seed=0, name='H200'), **kw))\n"
        f"MscopeApp({str(SAMPLES / 'transformer_tied.pt')!r}, show_gpus=True, gpu_interval=0.5).run()\n"
    )
    term = Terminal([sys.executable, str(launcher)], tmp_path, width=160, height=48)
    try:
        term.wait_for("SIMULATED H200")
        lengths = []
        for _ in range(4):
            time.sleep(1.1)
            rows = [line.split("▏")[-1].strip() for line in term.screen().splitlines()]
            spark = [r for r in rows if r and set(r) <= set("▁▂▃▄▅▆▇█")]
            assert spark, term.screen()
            lengths.append(len(spark[0]))
        assert lengths == sorted(lengths) and lengths[-1] >= lengths[0] + 2, lengths  # ~6 ticks pass
    finally:
        term.close()
