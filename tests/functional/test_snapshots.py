"""Screens at fixed sizes (80x24 and 160x48). Update baselines on purpose: --snapshot-update."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelscope_tui.tui.app import MscopeApp

ROOT = Path(__file__).resolve().parents[2]
SIZES = [(80, 24), (160, 48)]


@pytest.fixture(autouse=True)
def relative_paths(monkeypatch):
    # The details pane shows the path as given; keep it independent of where the repo lives.
    monkeypatch.chdir(ROOT)


async def ready(pilot) -> None:
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


def opened(*keys: str, filter_text: str | None = None):
    async def run_before(pilot) -> None:
        await ready(pilot)
        if filter_text is not None:
            await pilot.press("slash", *filter_text)
            await pilot.app.workers.wait_for_complete()
            await pilot.pause()
            await pilot.press("enter")
        if keys:
            await pilot.press(*keys)
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()
        pilot.app.clear_notifications()
        await pilot.pause()

    return run_before


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_state_dict(snap_compare, size):
    app = MscopeApp("sample_models/transformer_tied.pt", show_gpus=False)
    assert snap_compare(app, terminal_size=size, run_before=opened("down", "down", "right"))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_full_module(snap_compare, size):
    app = MscopeApp("sample_models/notebook_full.pt", show_gpus=False)
    assert snap_compare(app, terminal_size=size, run_before=opened("down", "right", "down"))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_training_checkpoint(snap_compare, size):
    app = MscopeApp("sample_models/train_checkpoint.pt", show_gpus=False)
    assert snap_compare(app, terminal_size=size, run_before=opened())


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_filter_active(snap_compare, size):
    app = MscopeApp("sample_models/transformer_tied.pt", show_gpus=False)
    assert snap_compare(app, terminal_size=size, run_before=opened(filter_text="norm"))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_mixed_freeze_state(snap_compare, size):
    app = MscopeApp("sample_models/transformer_tied.pt", show_gpus=False)
    # freeze blocks.0 with the pattern dialog, then look at the blocks module
    keys = ("p", *"blocks.0.*", "enter", "down", "down", "down", "right")
    assert snap_compare(app, terminal_size=size, run_before=opened(*keys))
