"""What the explorer tells the user, and when: dialogs answer once however fast keys come,
toasts never cover a dialog and never repeat without a change, and every message of the run
is in the history (M)."""

from __future__ import annotations

import re
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


# -- toasts and the history (M) -----------------------------------------------------------------------
def toasts(app, screen=None) -> list[str]:
    """The toasts shown on the top screen (or `screen`): its toast rack's toasts that are
    displayed (run_test draws toasts only with notifications=True)."""
    from textual.widgets._toast import Toast

    screen = screen or app.screen
    return [
        str(t._notification.message) for t in screen.query(Toast) if t.parent.display and t.display
    ]


def history(app) -> list[str]:
    return [m.text for m in app.feedback.history]


async def test_a_toast_raised_under_a_dialog_waits_until_it_closes():
    app = MscopeApp(SAMPLES / "transformer_tied.pt", show_gpus=False)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await settle(pilot)
        app.notify("said before the dialog", timeout=600)  # a toast up when the dialog opens...
        await settle(pilot)
        assert toasts(app) == ["said before the dialog"]
        await pilot.press("question_mark")
        await settle(pilot)
        assert type(app.screen).__name__ == "HelpScreen"
        explorer = app.screen_stack[0]  # a dialog shows the explorer behind it: both count
        assert toasts(app) == [] == toasts(app, explorer)  # ...hides: nothing covers the dialog
        app.notify("written while the help was open", severity="warning")
        await settle(pilot)
        await pilot.pause()
        assert len(app.screen_stack) == 2 and toasts(app) == [] == toasts(app, explorer)
        assert history(app)[-1] == "written while the help was open"  # said, and listed
        await pilot.press("escape")
        await settle(pilot)
        await pilot.pause()
        assert len(app.screen_stack) == 1
        shown = toasts(app)
        assert "written while the help was open" in shown  # shown once the dialog closed
        assert "said before the dialog" in shown  # and the earlier one is back


async def test_the_same_warning_twice_without_a_change_is_shown_once():
    app = MscopeApp(SAMPLES / "transformer_tied.pt", show_gpus=False)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await settle(pilot)
        await pilot.press("D", "D")  # export a device map, nothing placed: a warning, twice
        await settle(pilot)
        said = [m for m in app.feedback.history if "nothing placed yet" in m.text]
        assert len(said) == 1 and said[0].count == 2 and said[0].severity == "warning"
        assert sum("nothing placed yet" in t for t in toasts(app)) == 1
        await pilot.press("space")  # the state changes: the same warning is news again
        await settle(pilot)
        await pilot.press("D")
        await settle(pilot)
        assert len([m for m in app.feedback.history if "nothing placed yet" in m.text]) == 2


async def test_norm_caveat_comes_back_after_an_undo():
    """Undo went around the caveat's rule: after freeze, undo, freeze the caveat stayed silent."""
    app = MscopeApp(SAMPLES / "cnn_state_dict.pt", show_gpus=False)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await settle(pilot)
        app.tree.reveal(module_name="features.1")  # a BatchNorm2d: running statistics
        await pilot.pause()

        def caveats() -> int:
            return sum("running statistics" in m for m in history(app))

        await pilot.press("space")
        await settle(pilot)
        assert caveats() == 1
        await pilot.press("z")
        await settle(pilot)
        await pilot.press("space")
        await settle(pilot)
        assert caveats() == 2


async def test_toasts_never_pile_up_at_80x24():
    app = MscopeApp(SAMPLES / "transformer_tied.pt", show_gpus=False)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await settle(pilot)
        for i in range(6):
            app.notify(f"message {i}")
        await settle(pilot)
        await pilot.pause()
        assert toasts(app) == ["message 4", "message 5"]  # the newest; the rest in M
        assert [m for m in history(app) if m.startswith("message")] == [
            f"message {i}" for i in range(6)
        ]


async def test_messages_history_lists_every_message_newest_last():
    from modelscope_tui.tui.screens.messages import MessagesScreen

    app = MscopeApp(SAMPLES / "transformer_tied.pt", show_gpus=False)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await settle(pilot)
        for i in range(30):  # more than the dialog shows at once: it scrolls to the newest
            app.notify(f"message {i}", severity="warning" if i % 2 else "information")
        app.notify("[bold]not markup[/bold]", severity="error")
        await pilot.press("M")
        await settle(pilot)
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, MessagesScreen)
        body = "\n".join(painted_lines(screen.query_one("#messages")))
        assert (
            body.index("message 0")
            < body.index("message 29")
            < body.index("[bold]not markup[/bold]")
        )
        assert "warn" in body and "info" in body and "error" in body
        assert re.search(r"^\d\d:\d\d:\d\d warn +message 1$", body, re.M), body
        scroll = screen.query_one("#messages-list")
        assert scroll.max_scroll_y > 0 and scroll.scroll_y == scroll.max_scroll_y  # newest shown
        await pilot.press("escape")
        await settle(pilot)
        assert len(app.screen_stack) == 1


def painted_lines(widget) -> list[str]:
    from textual.geometry import Region

    strips = widget.render_lines(Region(0, 0, widget.size.width, widget.size.height))
    return ["".join(segment.text for segment in strip).rstrip() for strip in strips]


def test_palette_and_help_list_the_messages_key():
    from modelscope_tui.tui import keys

    assert any(action == "messages" for _, _, action in keys.palette(MscopeApp.BINDINGS))
    assert any(k == "M" and "messages" in text for k, text in MscopeApp.KEY_HELP)
