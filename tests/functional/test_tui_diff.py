"""Diff mode and norm profiles in the explorer, driven with Pilot: what is on screen."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import torch
from rich.console import Console
from rich.style import Style

from conftest import settle
from diffpair import after_state_dict, before_state_dict, write_pair
from modelscope_tui import cli
from modelscope_tui.diff import stream as diff_stream
from modelscope_tui.errors import Cancelled
from modelscope_tui.tui.app import MscopeApp
from modelscope_tui.tui.screens.compare import CompareScreen
from modelscope_tui.tui.screens.help import HelpScreen

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("pair"))


def header(app) -> str:
    return str(app.query_one("#header").render())


def details_text(app) -> str:
    console = Console(width=120, record=True, file=open("/dev/null", "w"))
    console.print(app.query_one("#details").content)
    return console.export_text()


def row(app, name: str, ghost: bool = False):
    """The tree line of a tensor or module (revealed), as (plain text, Text)."""
    tree = app.tree
    node = tree.reveal(tensor_name=name) if not app.session.ckpt.tree.children.get(name) and "." in name else None
    if node is None or (node.data.ghost != ghost):
        node = tree.reveal(module_name=name)
    assert node is not None, name
    assert node.data.ghost == ghost
    text = tree.render_label(node, Style(), Style())
    return text.plain, text


def style_of(text, needle: str) -> str:
    """The styles (as one string) of the spans covering the first character of `needle`."""
    at = text.plain.index(needle)
    return " ".join(str(s.style) for s in text.spans if s.start <= at < s.end)


async def test_diff_mode_colours_tree_summary_and_details(pair):
    a, b = pair
    app = MscopeApp(b, compare=a, show_gpus=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        assert app.diff.live is not None and not app.diff.live.running
        top = header(app)
        for part in ("Δ vs before.pt", "6 changed", "1 close", "1 shape", "1 dtype", "2 added", "2 removed", "1 renamed", "10 same"):
            assert part in top, top
        assert not app.query_one("#diff-progress").display

        plain, text = row(app, "blocks.2.attn.weight")
        assert "~ 1.0e-02" in plain and "yellow" in style_of(text, "weight")
        plain, text = row(app, "blocks.1.norm.weight")
        assert "≈" in plain and "cyan" in style_of(text, "weight")
        plain, text = row(app, "embed.weight")
        assert "= same" in plain and "green" in style_of(text, "weight")
        plain, text = row(app, "head.weight")
        assert "≠ shape" in plain and "#d7af00" in style_of(text, "12×16")
        plain, text = row(app, "blocks.0.mlp.bias")
        assert "≠ dtype" in plain and "float16" in plain and "#d7af00" in style_of(text, "float16")
        plain, text = row(app, "proj.weight")
        assert "→ renamed" in plain and "← old_proj.weight" in plain
        plain, text = row(app, "adapter.lora_A")
        assert "+ added" in plain and "#3f8cff" in style_of(text, "lora_A")
        # what only A has sits where it was, in red
        plain, text = row(app, "blocks.1.attn.bias", ghost=True)
        assert "- removed" in plain and "red" in style_of(text, "bias")
        plain, text = row(app, "dropped", ghost=True)
        assert "- removed" in plain and "red" in style_of(text, "dropped")
        plain, text = row(app, "old_proj.weight", ghost=True)
        assert "→ proj.weight" in plain and "#a070ff" in style_of(text, "weight")
        # modules take the aggregate of their children
        plain, text = row(app, "blocks.2")
        assert "~ 6/6" in plain and "yellow" in style_of(text, "2")
        plain, text = row(app, "embed")
        assert "= same" in plain and "green" in style_of(text, "embed")
        plain, text = row(app, "adapter")
        assert "+ added" in plain and "#3f8cff" in style_of(text, "adapter")

        # the details pane of a tensor shows its diff figures, equal to torch's
        ref_a, ref_b = before_state_dict(), after_state_dict(before_state_dict())
        x, y = ref_a["blocks.2.mlp.weight"].double(), ref_b["blocks.2.mlp.weight"].double()
        app.tree.reveal(tensor_name="blocks.2.mlp.weight")
        await settle(pilot)
        text = details_text(app)
        assert "~ changed" in text
        assert f"max |Δ|      {(x - y).abs().max().item():.4g}" in text
        assert f"rel. L2 Δ    {((x - y).norm() / x.norm()).item():.4g}" in text
        cos = torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), 0).item()
        assert f"cosine       {cos:.8g}" in text
        assert "512 of 512" in text
        assert "L2 norm" in text  # the tensor's own statistics are still there
        # a module: its aggregate, then the norm profile of its children
        app.tree.reveal(module_name="blocks.1")
        await settle(pilot)
        text = details_text(app)
        assert "2 of 6 differ" in text and "1 close · 1 removed · 4 identical" in text
        assert "norm profile" in text and "attn" in text
        # the root: both files and the summary
        app.tree.move_cursor(app.tree.root)
        await settle(pilot)
        text = details_text(app)
        assert "before.pt" in text and "after.safetensors" in text and "atol 1e-08, rtol 1e-05" in text


async def test_tree_comes_from_metadata_first_and_cancel_leaves_app_responsive(pair, monkeypatch):
    a, b = pair
    started = threading.Event()

    def blocked(*args, **kwargs):  # a comparison that only ends when cancelled
        cancel = args[7]
        started.set()
        if not cancel.wait(20):
            raise AssertionError("never cancelled")
        raise Cancelled()

    monkeypatch.setattr(diff_stream, "compare_values", blocked)
    app = MscopeApp(b, compare=a, show_gpus=False)
    async with app.run_test(size=(120, 36)) as pilot:
        for _ in range(200):
            await pilot.pause(0.02)
            if app.diff.live is not None and started.is_set():
                break
        assert app.diff.live is not None and app.diff.live.running
        await pilot.pause()
        top = header(app)
        # metadata-level statuses at once; values still pending
        for part in ("1 shape", "1 dtype", "3 added", "3 removed", "17 pending", "comparing 0%"):
            assert part in top, top
        assert "1 renamed" not in top  # renames need bytes
        assert app.query_one("#diff-progress").display
        assert "x stops" in str(app.query_one("#diff-progress").render())
        plain, text = row(app, "blocks.2.attn.weight")
        assert "…" in plain and "yellow" not in style_of(text, "weight")
        plain, _ = row(app, "head.weight")
        assert "≠ shape" in plain
        plain, _ = row(app, "blocks.2")
        assert "… 6" in plain
        app.tree.focus()
        await pilot.press("x")
        await settle(pilot)
        assert app.diff.live.cancelled and not app.diff.live.running
        assert "stopped" in header(app)
        assert not app.query_one("#diff-progress").display
        # still responsive: keys move the cursor and the details follow
        app.tree.move_cursor(app.tree.root)
        await pilot.press("down", "down")
        await settle(pilot)
        assert app.tree.cursor_node.data.module.name == "blocks"
        assert "pending" in details_text(app) or "still being compared" in details_text(app)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)


async def test_compare_from_inside_the_app_and_jump_between_changes(pair):
    a, b = pair
    app = MscopeApp(b, show_gpus=False)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        assert "trainable" in header(app) and app.diff.live is None
        commands = {c.title for c in app.get_system_commands(app.screen)}
        assert {"Compare", "Next change", "Previous change", "Stop comparing"} <= commands
        assert any(key == "v" for key, _ in app.KEY_HELP)
        await pilot.press("v")
        await pilot.pause()
        assert isinstance(app.screen, CompareScreen)
        app.screen.query_one("#path").value = str(a)
        await pilot.press("enter")
        await settle(pilot)
        assert app.diff.live is not None and "Δ vs before.pt" in header(app) and "6 changed" in header(app)
        # n / N walk through the changes in tree order (tensors, then modules)
        app.tree.move_cursor(app.tree.root)
        await pilot.press("n")
        await pilot.pause()
        first = app.tree.cursor_node.data
        assert first.tensor.name == "adapter.lora_A"
        await pilot.press("n", "n")
        await pilot.pause()
        assert app.tree.cursor_node.data.tensor.name == "blocks.0.mlp.bias"
        await pilot.press("N", "N")
        await pilot.pause()
        assert app.tree.cursor_node.data.tensor.name == "adapter.lora_A"
        await pilot.press("N")  # wraps to the last change: a ghost in A only
        await pilot.pause()
        last = app.tree.cursor_node.data
        assert last.ghost and last.tensor.name == "dropped.weight"
        # v again offers to leave diff mode
        await pilot.press("v")
        await pilot.pause()
        await pilot.click("#leave")
        await settle(pilot)
        assert app.diff.live is None and app.tree.diff is None and "trainable" in header(app)
        # a missing file is a message, not a crash
        await pilot.press("v")
        await pilot.pause()
        app.screen.query_one("#path").value = "/nonexistent/model.pt"
        await pilot.press("enter")
        await settle(pilot)
        assert app.diff.live is None


async def test_norm_profile_of_a_module_is_computed_once():
    path = SAMPLES / "transformer_tied.pt"
    ref = torch.load(path, weights_only=True)
    app = MscopeApp(path, show_gpus=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        assert "A (audit) computes it" in details_text(app) and not app.norms.stats  # never unasked
        app.tree.reveal(module_name="blocks.0")
        await settle(pilot)
        text = details_text(app)
        assert "norm profile" in text
        for child in ("self_attn", "linear1", "linear2", "norm1", "norm2"):
            expect = math.sqrt(sum(float(v.double().pow(2).sum()) for k, v in ref.items() if k.startswith(f"blocks.0.{child}.")))
            line = next(line for line in text.splitlines() if line.strip().startswith(child + " "))
            assert f"{expect:.4g}" in line and "█" in line, line
        assert "blocks.0" in app.norms.done
        runs = []
        original = app._compute_norms
        app._compute_norms = lambda *a, **k: (runs.append(a[0].module), original(*a, **k))
        app.tree.reveal(module_name="blocks.1")
        await settle(pilot)
        app.tree.reveal(module_name="blocks.0")
        await settle(pilot)
        assert runs == ["blocks.1"]  # blocks.0 came from the cache
        # a leaf module: one bar per parameter
        app.tree.reveal(module_name="blocks.0.linear1")
        await settle(pilot)
        text = details_text(app)
        w = float(ref["blocks.0.linear1.weight"].double().norm())
        assert any(line.strip().startswith("weight") and f"{w:.4g}" in line for line in text.splitlines())
        # after an audit the root shows the top level too, tied lm_head included
        await pilot.press("A")
        await settle(pilot)
        await pilot.press("escape")
        app.tree.move_cursor(app.tree.root)
        await settle(pilot)
        assert "lm_head (tied)" in details_text(app)


def test_cli_diff_in_a_terminal_opens_the_explorer(pair, monkeypatch, capsys):
    a, b = pair
    calls = []

    def fake_run_app(path, **kwargs):
        calls.append((path, kwargs))
        return 0, None

    import modelscope_tui.tui.app as app_module

    monkeypatch.setattr(app_module, "run_app", fake_run_app)
    monkeypatch.setattr(cli.common, "has_terminal", lambda: True)  # keys in and screen out
    assert cli.main(["diff", str(a), str(b), "--atol", "1e-3"]) == 0
    (path, kwargs), = calls
    assert path == str(b) and kwargs["compare"] == str(a) and kwargs["atol"] == 1e-3
    assert kwargs["compare_prefetch"].result().path == Path(a)
    # --text (and --json, --all-sections) print as before
    assert cli.main(["diff", str(a), str(b), "--text"]) == 0
    assert "6 changed" in capsys.readouterr().out and len(calls) == 1
    assert cli.main(["diff", str(a), "/nonexistent.pt"]) == 2
    assert len(calls) == 1


async def test_plan_check_shows_in_header_and_root_details(pair, tmp_path):
    import json

    a, b = pair
    plan = tmp_path / "plan.json"
    frozen = [f"blocks.0.{m}.{p}" for m in ("attn", "mlp", "norm") for p in ("weight", "bias")]
    plan.write_text(json.dumps({"format": "mscope.freeze-plan", "version": 1, "frozen": frozen, "trainable": []}))
    app = MscopeApp(b, compare=a, plan=plan, show_gpus=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        assert "plan: frozen moved" in header(app)  # blocks.0.mlp.bias was cast to float16
        assert app.diff.live.report.exit_code == 1
        app.tree.move_cursor(app.tree.root)
        await settle(pilot)
        text = details_text(app)
        assert "1 of 6 parameters frozen in plan.json moved in B:" in text
        assert "blocks.0.mlp.bias: dtype float32 -> float16" in text


async def test_compare_prompt_keeps_the_prefilled_folder(pair, tmp_path, monkeypatch):
    """`v` prefills a folder; typing must go after it, not replace it (it was selected)."""
    a, b = pair
    monkeypatch.chdir(a.parent)
    app = MscopeApp(b, show_gpus=False)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        await pilot.press("v")
        await pilot.pause()
        field = app.screen.query_one("#path")
        prefilled = field.value
        await pilot.press(*"x.pt")
        assert field.value == prefilled + "x.pt", (prefilled, field.value)


async def test_diff_mode_footer_advertises_diff_keys_not_freeze_keys(pair):
    """The footer listed f Freeze, u Unfreeze, p Pattern... in diff mode. The keys still work
    (and `?` lists them); the footer offers n (next change) instead."""
    a, b = pair

    def footer_actions(app) -> set[str]:
        return {k.action.removeprefix("app.") for k in app.query("FooterKey") if hasattr(k, "action")}

    plain = MscopeApp(b, show_gpus=False)
    async with plain.run_test(size=(160, 40)) as pilot:
        await settle(pilot)
        shown = footer_actions(plain)
        assert {"freeze", "unfreeze", "save_plan"} <= shown and "next_change" not in shown
    app = MscopeApp(b, compare=a, show_gpus=False)
    async with app.run_test(size=(160, 40)) as pilot:
        await settle(pilot)
        assert app.diff.live is not None
        shown = footer_actions(app)
        assert not shown & {"toggle_freeze", "freeze", "unfreeze", "pattern", "undo", "save_plan"}, shown
        assert {"next_change", "compare", "filter", "help", "quit_app"} <= shown, shown
        name = next(iter(app.session.records))
        app.tree.reveal(tensor_name=name)
        await pilot.press("f")  # still freezes
        assert not app.session.is_trainable(name)
