"""The footer at the sizes users run: whole keys only, and `? Help` / `q Quit` always there.

At 80 columns Textual's footer cut its row at the edge, mid-key (`s S`), and the help and quit
keys, the last in the row, were never on screen."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import settle
from modelscope_tui.tui.app import MscopeApp
from modelscope_tui.tui.widgets.footer import fit_keys, key_width

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"


def shown_keys(app) -> list:
    return [k for k in app.query("FooterKey") if hasattr(k, "action")]


def actions(keys) -> list[str]:
    return [k.action.removeprefix("app.") for k in keys]


@pytest.mark.parametrize("size", [(80, 24), (60, 24), (100, 30), (200, 50)])
async def test_footer_keys_are_whole_and_help_and_quit_always_shown(size):
    app = MscopeApp(SAMPLES / "transformer_tied.pt", show_gpus=False)
    async with app.run_test(size=size) as pilot:
        await settle(pilot)
        keys = shown_keys(app)
        assert {"help", "quit_app"} <= set(actions(keys)), actions(keys)
        for key in keys:  # every key lies wholly on screen
            region = key.region
            assert region.width > 0 and region.right <= size[0], (key.action, region)


async def test_footer_gives_way_from_the_end_and_comes_back_when_the_terminal_grows():
    app = MscopeApp(SAMPLES / "transformer_tied.pt", show_gpus=False)
    async with app.run_test(size=(200, 40)) as pilot:
        await settle(pilot)
        wide = actions(shown_keys(app))
        assert {"filter", "toggle_details", "compare", "help", "quit_app"} <= set(wide)
        await pilot.resize_terminal(80, 24)
        await settle(pilot)
        narrow = actions(shown_keys(app))
        assert {"help", "quit_app"} <= set(narrow) and len(narrow) < len(wide)
        # what stays is the start of the row, in order: keys give way from its end
        rest = [a for a in narrow if a not in ("help", "quit_app", "command_palette")]
        assert rest == [a for a in wide if a in rest][: len(rest)] == wide[: len(rest)]
        await pilot.resize_terminal(200, 40)
        await settle(pilot)
        assert actions(shown_keys(app)) == wide


class FakeKey:
    def __init__(self, action: str, key: str, description: str, classes: tuple[str, ...] = ()):
        self.action, self.key_display, self.description, self.classes = action, key, description, classes


def test_fit_keys_drops_whole_keys_from_the_end_but_never_help_quit_or_palette():
    keys = [
        FakeKey("freeze", "f", "Freeze"),
        FakeKey("filter", "/", "Filter"),
        FakeKey("help", "?", "Help"),
        FakeKey("quit_app", "q", "Quit"),
        FakeKey("command_palette", "^p", "palette", ("-command-palette",)),
    ]
    total = sum(map(key_width, keys))
    assert fit_keys(keys, total) == keys
    assert [k.action for k in fit_keys(keys, total - 1)] == ["freeze", "help", "quit_app", "command_palette"]
    assert [k.action for k in fit_keys(keys, 5)] == ["help", "quit_app", "command_palette"]
    assert fit_keys(keys, 0) == keys  # not laid out yet: nothing to fit
