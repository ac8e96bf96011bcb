"""The explorer driven with Textual's Pilot: keys in, Session state and screen text out."""

from __future__ import annotations

import json
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from textual.widgets import LoadingIndicator

from modelscope_tui.errors import MscopeError
from modelscope_tui.readers import open_checkpoint
from modelscope_tui.tui.app import MscopeApp
from modelscope_tui.tui.screens.confirm import ConfirmScreen
from modelscope_tui.tui.screens.help import HelpScreen
from modelscope_tui.tui.screens.largest import LargestScreen
from modelscope_tui.tui.screens.pattern import PatternScreen

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_models"


async def started(pilot) -> MscopeApp:
    app = pilot.app
    await app.workers.wait_for_complete()
    await pilot.pause()
    assert app.session is not None, app.error_line
    return app


def header(app) -> str:
    return str(app.query_one("#header").render())


def tree_lines(app) -> list[str]:
    tree = app.tree
    return [str(tree.render_label(line.path[-1], tree.rich_style, tree.rich_style)) for line in tree._tree_lines]


def cursor_name(app) -> str:
    row = app.tree.cursor_node.data
    return row.tensor.name if row.tensor is not None else row.module.name


async def move_to(app, pilot, name: str) -> None:
    node = app.tree.reveal(tensor_name=name) if "." in name or app.session.records.get(name) else None
    if node is None:
        node = app.tree.reveal(module_name=name)
    await pilot.pause()
    assert cursor_name(app) == name


async def test_opens_and_shows_tree_with_totals():
    app = MscopeApp(SAMPLES / "transformer_tied.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        assert "trainable 21.8K / 21.8K (100.0%)" in header(app)
        lines = tree_lines(app)
        assert any("embed" in line for line in lines)
        assert any("blocks" in line for line in lines)
        # the root row carries the aggregate parameter count
        assert "21.8K" in lines[0]


async def test_space_toggles_a_module_and_undo_redo():
    app = MscopeApp(SAMPLES / "transformer_tied.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        await move_to(app, pilot, "blocks")
        await pilot.press("space")
        block_names = [n for n in app.session.records if n.startswith("blocks.")]
        assert all(not app.session.is_trainable(n) for n in block_names)
        assert "unsaved" in header(app)
        assert "(21.5%)" in header(app) or "trainable 4.7K" in header(app)
        await pilot.press("z")
        assert all(app.session.is_trainable(n) for n in block_names)
        await pilot.press("y")
        assert not app.session.is_trainable("blocks.0.linear1.weight")
        await pilot.press("space")  # a frozen module toggles back to trainable
        assert app.session.is_trainable("blocks.0.linear1.weight")


async def test_tied_weights_freeze_together():
    app = MscopeApp(SAMPLES / "transformer_tied.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        await move_to(app, pilot, "lm_head.weight")
        await pilot.press("f")
        assert not app.session.is_trainable("embed.weight")
        details = app.query_one("#details").render()
        assert "tied to" in str(details) or "embed.weight" in app.export_screenshot()


async def test_freeze_all_unfreeze_all_invert():
    app = MscopeApp(SAMPLES / "cnn_state_dict.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        await pilot.press("F")
        assert app.session.totals()[0] == 0
        await pilot.press("U")
        assert app.session.totals()[0] == app.session.totals()[1]
        await move_to(app, pilot, "classifier")
        await pilot.press("f", "i")
        trainable = [n for n in app.session.trainable if app.session.trainable[n]]
        assert trainable == ["classifier.weight", "classifier.bias"]


async def test_integer_buffers_cannot_be_frozen():
    app = MscopeApp(SAMPLES / "cnn_state_dict.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        await move_to(app, pilot, "features.1.num_batches_tracked")
        await pilot.press("space")
        await pilot.pause()
        messages = [n.message for n in app._notifications]
        assert any("cannot require grad" in m for m in messages)
        assert not app.session.dirty


async def test_buffers_say_so_in_the_train_column():
    """The train column is 5 wide: a BatchNorm buffer row says "buf" (it said "buffe")."""
    app = MscopeApp(SAMPLES / "cnn_state_dict.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        await move_to(app, pilot, "features.1.running_mean")
        row = next(line for line in tree_lines(app) if "running_mean" in line)
        assert row.split()[1:4] == ["8", "float32", "buf"], row
        assert "buffe" not in "".join(tree_lines(app))


async def test_pattern_modal_previews_and_applies():
    app = MscopeApp(SAMPLES / "transformer_tied.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        await pilot.press("p")
        assert isinstance(app.screen, PatternScreen)
        await pilot.press(*"blocks.0.*")
        await app.screen.workers.wait_for_complete()
        await pilot.pause()
        preview = str(app.screen.query_one("#preview").render())
        assert "12 tensors" in preview and "8.5K parameters" in preview
        await pilot.press("enter")
        await pilot.pause()
        assert not app.session.is_trainable("blocks.0.linear1.weight")
        assert app.session.is_trainable("blocks.1.linear1.weight")
        assert app.session.history()[-1].value == "blocks.0.*"


async def test_bad_regex_shows_message_not_traceback():
    app = MscopeApp(SAMPLES / "transformer_tied.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        await pilot.press("p")
        await pilot.click("#regex")
        await pilot.click("#pattern")
        await pilot.press(*"blocks[")
        await app.screen.workers.wait_for_complete()
        await pilot.pause()
        assert "invalid regular expression" in str(app.screen.query_one("#preview").render())
        await pilot.press("escape")
        assert not app.session.dirty


async def freeze_batchnorms(app, pilot) -> list[str]:
    """`c`, pick BatchNorm2d, `f`: the names of the frozen BatchNorm modules."""
    await pilot.press("c")
    option_list = app.screen.query_one("OptionList")
    ids = [option_list.get_option_at_index(i).id for i in range(option_list.option_count)]
    option_list.highlighted = ids.index("BatchNorm2d")
    await pilot.press("f")
    await pilot.pause()
    return [n.name for n in app.session.modules_of_class("BatchNorm2d")]


async def test_freeze_by_class_and_norm_caveat():
    app = MscopeApp(SAMPLES / "notebook_full.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        bn = await freeze_batchnorms(app, pilot)
        assert bn and all(app.session.node_state(app.session.node(b)) == "frozen" for b in bn)
        messages = " ".join(n.message for n in app._notifications)
        assert "running statistics" in messages
        await pilot.press("b")
        assert set(bn) <= app.session.eval_modules


async def test_train_last_n_blocks():
    app = MscopeApp(SAMPLES / "transformer_tied.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        await pilot.press("l")
        await pilot.press("1", "enter")
        await pilot.pause()
        assert not app.session.is_trainable("blocks.0.linear1.weight")
        assert app.session.is_trainable("blocks.1.linear1.weight")


async def test_filter_as_you_type_and_clear():
    app = MscopeApp(SAMPLES / "transformer_tied.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        await pilot.press("slash", *"norm1")
        await app.workers.wait_for_complete()
        await pilot.pause()
        lines = tree_lines(app)
        assert any("norm1" in line for line in lines)
        assert not any("linear1" in line for line in lines)
        assert "filter: norm1" in header(app)
        await pilot.press("escape")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert "filter" not in header(app)


async def test_largest_jumps_to_tensor_and_sort():
    app = MscopeApp(SAMPLES / "transformer_tied.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        await pilot.press("L")
        assert isinstance(app.screen, LargestScreen)
        biggest = app.screen.largest[0].name
        await pilot.press("enter")
        await pilot.pause()
        assert cursor_name(app) == biggest
        await pilot.press("o")
        await pilot.pause()
        first_children = [c.data for c in app.tree.root.children]
        sizes = [r.module.stats.nbytes for r in first_children if r.module is not None]
        assert sizes == sorted(sizes, reverse=True)


async def test_expand_collapse_all_help_details():
    app = MscopeApp(SAMPLES / "transformer_tied.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        await pilot.press("e")
        await pilot.pause()
        assert len(app.tree._tree_lines) > 40
        await pilot.press("E")
        await pilot.pause()
        assert len(app.tree._tree_lines) <= 8
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        pane = app.query_one("#details-pane")
        shown = pane.display
        await pilot.press("d")
        assert pane.display is not shown


async def test_command_palette_runs_actions():
    app = MscopeApp(SAMPLES / "cnn_state_dict.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"Freeze all")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await pilot.pause()
        assert app.session.totals()[0] == 0


async def test_save_plan_then_quit_cleanly(tmp_path, monkeypatch):
    src = tmp_path / "model.pt"
    src.write_bytes((SAMPLES / "transformer_tied.pt").read_bytes())
    app = MscopeApp(src)
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        await pilot.press("l", "1", "enter")
        await pilot.press("q")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("escape")
        await pilot.press("s")
        await pilot.press("enter")
        await pilot.pause()
        plan_path = tmp_path / "model.freeze-plan.json"
        assert plan_path.exists()
        plan = json.loads(plan_path.read_text())
        assert "blocks.0.linear1.weight" in plan["frozen"]
        assert "blocks.1.linear1.weight" in plan["trainable"]
        assert not app.session.dirty
        await pilot.press("q")
    assert app.return_code == 0
    assert src.read_bytes() == (SAMPLES / "transformer_tied.pt").read_bytes()


async def test_quit_with_unsaved_changes_asks():
    app = MscopeApp(SAMPLES / "cnn_state_dict.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        await pilot.press("F", "q")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.click("#quit")
        await pilot.pause()
    assert app.return_code == 0


async def test_flat_file_pages_children(tmp_path):
    path = tmp_path / "flat.pt"
    torch.save({f"w{i:04d}": torch.zeros(1) for i in range(450)}, path)
    app = MscopeApp(path)
    async with app.run_test(size=(100, 30)) as pilot:
        await started(pilot)
        children = app.tree.root.children
        assert len(children) == 201 and children[-1].data.more_of is not None
        assert "250 more" in tree_lines(app)[-1]
        node = app.tree.reveal(tensor_name="w0449")
        assert node is not None and cursor_name(app) == "w0449"


async def test_corrupt_file_exits_with_one_line(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 this is not really a zip")
    app = MscopeApp(bad)
    async with app.run_test(size=(80, 24)) as pilot:
        for _ in range(100):
            if app.return_code is not None:
                break
            await pilot.pause(0.05)
    assert app.return_code == 2
    assert "bad.pt" in app.error_line and "\n" not in app.error_line


def done_future(result=None, error: BaseException | None = None) -> Future:
    """What `mscope open` hands the app when its prefetch finished while Textual was imported."""
    future = Future()
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
    return future


async def test_checkpoint_at_hand_is_shown_without_a_worker_or_loading_frame(monkeypatch):
    """The prefetch usually finishes before the app mounts: the tree is then built at mount,
    never behind a LoadingIndicator and a worker's round trip (issue #14's first paint)."""
    opened = []
    monkeypatch.setattr(MscopeApp, "_open", lambda self, path: opened.append(path))
    path = SAMPLES / "transformer_tied.pt"
    app = MscopeApp(path, prefetch=done_future(open_checkpoint(path)))
    async with app.run_test(size=(120, 40)) as pilot:
        assert app.session is not None and app.tree.root.children  # before any pause
        assert not app.query(LoadingIndicator)
        await pilot.pause()
        assert opened == []
        assert "transformer_tied.pt" in header(app) and "opening" not in header(app)


@pytest.mark.parametrize(
    "error, code, line",
    [
        (MscopeError("not a checkpoint", "x.pt"), 2, "x.pt: not a checkpoint"),
        (RuntimeError("boom"), 3, "internal error: RuntimeError: boom"),
    ],
)
async def test_prefetch_error_at_hand_exits_with_one_line(error, code, line):
    """The same line and exit code as when the error comes from the opening worker."""
    app = MscopeApp(SAMPLES / "transformer_tied.pt", prefetch=done_future(error=error))
    async with app.run_test(size=(80, 24)) as pilot:
        for _ in range(100):
            if app.return_code is not None:
                break
            await pilot.pause(0.05)
    assert app.return_code == code
    assert app.error_line == line and app.session is None


@pytest.mark.parametrize("sample", sorted(p.name for p in SAMPLES.iterdir() if p.name not in ("README.md", "make_samples.py")))
async def test_every_sample_opens_at_80x24(sample):
    app = MscopeApp(SAMPLES / sample)
    async with app.run_test(size=(80, 24)) as pilot:
        await started(pilot)
        assert app.session.ckpt.tensors
        lines = tree_lines(app)
        assert lines and all(len(line) <= 80 for line in lines)


async def test_unexpected_worker_error_is_one_notification():
    app = MscopeApp(SAMPLES / "cnn_state_dict.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)

        def fails() -> None:
            raise ValueError("boom\nmore")

        worker = app.run_worker(fails, thread=True, exit_on_error=False)
        for _ in range(50):
            if worker.is_finished:
                break
            await pilot.pause(0.02)
        await pilot.pause()
        messages = [n.message for n in app._notifications]
        assert any(m.startswith("internal error: ValueError: boom more") for m in messages)
        assert all("\n" not in m for m in messages)


async def test_write_full_module_checkpoint_with_new_flags(tmp_path):
    src = tmp_path / "net.pt"
    src.write_bytes((SAMPLES / "notebook_full.pt").read_bytes())
    app = MscopeApp(src)
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        await pilot.press("U")  # everything trainable, including the saved-frozen stem.0
        await pilot.press("w")
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        written = tmp_path / "net.frozen.pt"
        assert written.exists()
        from modelscope_tui import open_checkpoint

        reopened = open_checkpoint(written)
        assert all(t.requires_grad for t in reopened.model_tensors if t.kind == "parameter")
        # saving again to the same name asks before overwriting, and keeps a backup
        await pilot.press("w")
        screen = app.screen
        screen.query_one("#path").value = str(written)
        await pilot.press("enter")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.click("#overwrite")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert (tmp_path / "net.frozen.pt.bak").exists()
    assert src.read_bytes() == (SAMPLES / "notebook_full.pt").read_bytes()


async def test_state_dict_write_explains_plan_instead():
    app = MscopeApp(SAMPLES / "cnn_state_dict.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        await pilot.press("w")
        messages = " ".join(n.message for n in app._notifications)
        assert "save a freeze plan" in messages


async def test_path_prompts_answer_from_their_buttons():
    """Save and Compare share one path dialog: the primary button and Enter give the path,
    Cancel gives None."""
    from modelscope_tui.tui.screens.compare import CompareScreen
    from modelscope_tui.tui.screens.path import PathScreen

    dialogs = [(lambda: PathScreen("Save plan", "plan.json"), "plan.json"), (lambda: CompareScreen("b.pt", "a.pt"), "a.pt")]
    app = MscopeApp(SAMPLES / "cnn_state_dict.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        for make, path in dialogs:
            for action, want in (("#ok", path), ("#cancel", None), ("enter", path)):
                answers = []
                app.push_screen(make(), answers.append)
                await pilot.pause()
                if action == "enter":
                    await pilot.press("enter")
                else:
                    await pilot.click(action)
                await pilot.pause()
                assert answers == [want], (make().__class__.__name__, action)


async def test_gc_paused_at_start_resumes_after_the_first_paint():
    """`mscope FILE` starts with gc off; once the tree is painted the app freezes what start-up
    built (a full collection over a 100k-tensor checkpoint stalled the explorer 0.15 s) and turns
    gc back on."""
    import gc

    app = MscopeApp(SAMPLES / "transformer_tied.pt")
    app.resume_gc_after_paint = True
    frozen = gc.get_freeze_count()
    gc.disable()
    try:
        async with app.run_test(size=(120, 36)) as pilot:
            await started(pilot)
            assert not gc.isenabled() or gc.get_freeze_count() > frozen  # painted, maybe not yet resumed
            await pilot.pause()
            assert gc.isenabled()
            assert gc.get_freeze_count() > frozen
            assert app.resume_gc_after_paint is False
    finally:
        gc.unfreeze()  # do not keep this test's objects out of later collections
        gc.enable()


async def test_escape_in_the_tree_clears_the_filter_and_keeps_the_row():
    """After Enter the filter box is gone and the tree has focus: esc there clears the filter
    (it used to need / then esc), and the cursor stays on the row it was on."""
    app = MscopeApp(SAMPLES / "transformer_tied.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        await pilot.press("slash", *"norm2", "enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.focused is app.tree and "filter: norm2" in header(app)
        app.tree.reveal(tensor_name="blocks.1.norm2.weight")
        await pilot.pause()
        await pilot.press("escape")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert "filter" not in header(app)
        assert any("linear1" in line for line in tree_lines(app)), tree_lines(app)  # everything is back
        assert cursor_name(app) == "blocks.1.norm2.weight"


async def test_norm_caveat_is_said_once_per_change_of_the_frozen_norms():
    """The "frozen norm layer(s) still update running statistics" toast followed every action."""
    app = MscopeApp(SAMPLES / "notebook_full.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        bn = await freeze_batchnorms(app, pilot)

        def caveats() -> int:  # said, in the history: toasts on screen are capped (the oldest go)
            return sum("running statistics" in m.text for m in app.feedback.history)

        assert caveats() == 1
        other = next(n for n in app.session.records if not any(n.startswith(b + ".") for b in bn))
        app.tree.reveal(tensor_name=other)
        for _ in range(4):  # unrelated changes: the same norms stay frozen
            await pilot.press("space")
            await pilot.pause()
        assert caveats() == 1


async def test_help_says_there_is_no_forward_pass():
    """torchinfo and Netron users look for output shapes and FLOPs first: say why not, and what
    is offered instead."""
    from modelscope_tui.tui.screens.help import NO_FORWARD_PASS, HelpScreen

    app = MscopeApp(SAMPLES / "transformer_tied.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        texts = " ".join(str(w.render()) for w in app.screen.query("Static"))
        assert "no forward pass" in texts and "FLOPs" in texts
        assert "1 KiB = 1,024 bytes" in texts  # the one size convention, defined where keys are
        assert "no forward pass" in NO_FORWARD_PASS


async def test_filter_indicator_is_visible_at_80_columns():
    app = MscopeApp(SAMPLES / "notebook_full.pt")
    async with app.run_test(size=(80, 24)) as pilot:
        await started(pilot)
        await pilot.press("space")  # unfreeze all: "● unsaved" joins the header too
        await pilot.press("slash", *"weight", "enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert "unsaved" in header(app)
        visible = header(app)[:78]  # what fits on the line
        assert "filter: weight" in visible, visible
