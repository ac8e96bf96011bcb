"""What the explorer tells the user, and when: dialogs answer once however fast keys come,
toasts never cover a dialog and never repeat without a change, and every message of the run
is in the history (M)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from textual import events

from conftest import settle
from modelscope_tui.tui.app import MscopeApp

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"
SETTLE = "|"  # in a key list: wait until the app is idle before the next keys


async def type_at_once(pilot, keys: list[str]) -> None:
    """Keys as a fast typist sends them: queued together, the app gets no turn between them
    (Pilot.press waits for idle after each key), except at SETTLE."""
    app = pilot.app
    for key in keys:
        if key == SETTLE:
            await settle(pilot)
            continue
        event = events.Key(key, key if len(key) == 1 else None)
        event.set_sender(app)
        app._driver.send_message(event)
    await settle(pilot)
    await pilot.pause()


@pytest.fixture
def dirty_copy(tmp_path):
    path = tmp_path / "model.pt"
    shutil.copy(SAMPLES / "transformer_tied.pt", path)
    return path


@pytest.mark.parametrize(
    "keys",
    [
        # q, then Save… and esc before the dialog took the first answer: the button's Pressed
        # came after esc had closed it, and it dismissed again (ScreenStackError)
        ["q", "enter", "escape"],
        ["q", "enter", "enter", "escape"],
        # the save dialog open: enter then esc at once; its Input.Submitted came after esc had
        # closed it and read `#path` from a dialog being taken down (NoMatches, ScreenStackError)
        ["q", SETTLE, "enter", SETTLE, "enter", "escape"],
        ["q", "enter", SETTLE, "enter", "escape"],
    ],
    ids=["confirm-esc", "confirm-enter-esc", "save-enter-esc", "fast-save-enter-esc"],
)
async def test_a_dialog_answers_once_however_fast_the_keys(dirty_copy, keys):
    app = MscopeApp(dirty_copy, show_gpus=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("space")  # unsaved changes: q asks
        await settle(pilot)
        assert app.session.dirty
        await type_at_once(pilot, keys)
        assert len(app.screen_stack) == 1 and app.is_running  # esc won: back in the explorer
        assert app.focused is app.tree
        await pilot.press("q")  # and the explorer still works: q asks again
        await settle(pilot)
        assert type(app.screen).__name__ == "ConfirmScreen"
    assert not list(dirty_copy.parent.glob("*.json"))  # no plan saved behind the user's back
