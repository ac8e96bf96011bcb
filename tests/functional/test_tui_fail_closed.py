"""Issue #12 in the explorer (Pilot): hostile names are shown escaped everywhere on screen;
every way out asks about unsaved work; F acts on what a filter shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostile.textattack import SPELLINGS, bad_chars, safetensors_file, torch_zip_file
from modelscope_tui.tui.app import MscopeApp
from modelscope_tui.tui.screens.confirm import ConfirmScreen
from test_tui import started

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_models"
ALL = "".join(SPELLINGS.values())




def painted(app) -> str:
    """What is on screen, as the SVG screenshot sees it (text only)."""
    return app.export_screenshot()


@pytest.mark.parametrize("fmt", ["safetensors", "torchzip"])
async def test_hostile_names_are_escaped_on_screen(tmp_path: Path, fmt: str) -> None:
    path = (
        safetensors_file(tmp_path / "m.safetensors", ALL)
        if fmt == "safetensors"
        else torch_zip_file(tmp_path / "m.pt", ALL)
    )
    app = MscopeApp(path)
    async with app.run_test(size=(200, 50)) as pilot:
        await started(pilot)
        app.action_expand_all()
        await pilot.pause()
        tree = app.tree
        labels = [str(tree.render_label(line.path[-1], tree.rich_style, tree.rich_style)) for line in tree._tree_lines]
        joined = "\n".join(labels)
        assert not bad_chars(joined), bad_chars(joined)
        assert "\\x1b" in joined  # shown, escaped (the rest is cut at the column width)
        header = str(app.query_one("#header").render())
        assert not bad_chars(header)
        # The details pane of the file (entries, metadata, globals) and of every row.
        shown = []
        for line in tree._tree_lines:
            tree.move_cursor(line.path[-1])
            await pilot.pause()
            rendered = _render_text(app, app.query_one("#details"))
            assert not bad_chars(rendered), bad_chars(rendered)
            shown.append(rendered)
        details = "".join(shown).replace("\n", "")
        for escaped in ("\\x1b]52;", "\\u202e", "\\x9b", "\\x7f", "\\u200d", "\\ud800", "[bold red]x[/]"):
            assert escaped in details, escaped
        svg = painted(app)
        assert not bad_chars(svg.replace("\n", "")), bad_chars(svg)
        app.notify(f"name {ALL}")
        await pilot.pause()
        shown = [n for n in app._notifications if n.message.startswith("name ")]
        assert shown and not bad_chars(shown[0].message)
        assert "[bold red]x[/]" in shown[0].message and not shown[0].markup  # literal text


def _render_text(app, widget) -> str:
    from rich.console import Console

    console = Console(width=100, record=True, file=open("/dev/null", "w"), color_system=None)
    console.print(widget.content)
    return console.export_text()


async def _dirty_app(pilot) -> MscopeApp:
    app = await started(pilot)
    await pilot.press("F")
    await pilot.pause()
    assert app.session.dirty
    return app


@pytest.mark.parametrize("key", ["ctrl+q", "ctrl+c", "q"])
async def test_every_quit_key_asks_with_unsaved_changes(key: str) -> None:
    app = MscopeApp(SAMPLES / "cnn_state_dict.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await _dirty_app(pilot)
        await pilot.press(key)
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        assert app.return_code is None  # still running
        await pilot.click("#cancel")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen)
        assert app.is_running


async def test_command_palette_quit_asks() -> None:
    app = MscopeApp(SAMPLES / "cnn_state_dict.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await _dirty_app(pilot)
        quits = [c for c in app.get_system_commands(app.screen) if c.title.lower().startswith("quit")]
        assert quits
        for command in quits:
            result = command.callback()
            if hasattr(result, "__await__"):
                await result
            await pilot.pause()
            assert isinstance(app.screen, ConfirmScreen), command.title
            await pilot.click("#cancel")
            await pilot.pause()
        assert app.is_running


async def test_ctrl_q_quits_at_once_when_nothing_is_unsaved() -> None:
    app = MscopeApp(SAMPLES / "cnn_state_dict.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        await pilot.press("ctrl+q")
        await pilot.pause()
    assert app.return_code == 0


# -- no terminal ---------------------------------------------------------------------------------
def test_open_without_a_terminal_exits_2_with_one_line(cli) -> None:
    """`mscope open` asked for the explorer: with stdin from /dev/null it says why not (it ran
    blind at 96% CPU before); `mscope FILE` prints the summary instead."""
    result = cli("open", SAMPLES / "cnn_state_dict.pt")  # run_cli: stdout piped
    assert result.rc == 2
    assert result.stderr.count("\n") == 1 and "needs a terminal" in result.stderr
    assert "Traceback" not in result.stderr
    result = cli(SAMPLES / "cnn_state_dict.pt")
    assert result.rc == 0 and "trainable params" in result.stdout


def test_open_with_stdin_not_a_terminal_but_stdout_a_pty(tmp_path: Path) -> None:
    """stdout a terminal, stdin /dev/null (cron with a tty, `</dev/null`): no blind TUI."""
    import os
    import pty
    import subprocess
    import sys

    main_fd, child_fd = pty.openpty()
    env = {**os.environ, "TERM": "xterm"}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    for args in (["open"], []):
        proc = subprocess.run(
            [sys.executable, "-m", "modelscope_tui", *args, str(SAMPLES / "cnn_state_dict.pt")],
            stdin=subprocess.DEVNULL, stdout=child_fd, stderr=subprocess.PIPE, env=env, timeout=60,
        )  # fmt: skip
        assert proc.returncode == (2 if args else 0), proc.stderr
    os.close(child_fd)
    os.close(main_fd)


# -- plan file modes -------------------------------------------------------------------------------
@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_plan_files_respect_the_umask(cli, tmp_path: Path, mask: int, mode: int) -> None:
    import os
    import stat

    old = os.umask(mask)  # inherited by the subprocess
    try:
        out = tmp_path / "plan.json"
        result = cli("plan", SAMPLES / "cnn_state_dict.pt", "--freeze", "*", "-o", out)
    finally:
        os.umask(old)
    assert result.rc == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == mode


# -- F acts on what is shown ------------------------------------------------------------------------
async def test_freeze_all_with_a_filter_freezes_only_shown_tensors() -> None:
    app = MscopeApp(SAMPLES / "transformer_tied.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        await pilot.press("slash", *"norm1")
        await app.workers.wait_for_complete()
        await pilot.pause()
        app.set_focus(app.tree)
        await pilot.press("F")
        await pilot.pause()
        session = app.session
        shown = [n for n in session.canonical if "norm1" in n]
        hidden = [n for n in session.canonical if "norm1" not in n]
        assert shown and hidden
        assert not any(session.is_trainable(n) for n in shown)
        assert all(session.is_trainable(n) for n in hidden)
        assert any("hidden tensor(s) unchanged" in n.message for n in app._notifications)
        await pilot.press("U")
        await pilot.pause()
        assert all(session.is_trainable(n) for n in session.canonical)
        # Without a filter F is the whole model again.
        await pilot.press("slash")
        await pilot.press("escape")
        await app.workers.wait_for_complete()
        await pilot.pause()
        app.set_focus(app.tree)
        await pilot.press("F")
        await pilot.pause()
        assert not any(session.is_trainable(n) for n in session.canonical)


# -- plans made for another model ------------------------------------------------------------------
def test_estimate_with_a_plan_for_another_model_warns(cli, tmp_path: Path) -> None:
    plan = tmp_path / "other.json"
    result = cli("plan", SAMPLES / "transformer_tied.pt", "--freeze", "*", "-o", plan)
    assert result.rc == 0, result.stderr
    result = cli("estimate", SAMPLES / "cnn_state_dict.pt", "--plan", plan)
    assert result.rc == 0
    assert "different model" in result.stderr
    assert "not in this checkpoint" in result.stderr and "not in the plan" in result.stderr
