"""Diff mode at fixed sizes (80x24 and 160x48). Update baselines on purpose: --snapshot-update."""

from __future__ import annotations

import pytest

from diffpair import write_pair
from modelscope_tui.tui.app import MscopeApp

SIZES = [(80, 24), (160, 48)]


@pytest.fixture
def pair_here(tmp_path, monkeypatch):
    write_pair(tmp_path)
    monkeypatch.chdir(tmp_path)  # relative names on screen, wherever the test runs


async def compared(pilot) -> None:
    """Values compared, then blocks and blocks.1 opened and blocks.1 selected."""
    app = pilot.app
    for _ in range(200):
        await app.workers.wait_for_complete()
        await pilot.pause()
        if app.diff.live is not None and not app.diff.live.running and not any(w.is_running for w in app.workers):
            break
    await pilot.press("down", "down", "right")
    await pilot.pause()
    await pilot.press("down", "down", "right")
    await app.workers.wait_for_complete()
    await pilot.pause()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_diff_mode(snap_compare, size, pair_here):
    app = MscopeApp("after.safetensors", compare="before.pt", show_gpus=False)
    assert snap_compare(app, terminal_size=size, run_before=compared)
