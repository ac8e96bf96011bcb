"""The keys in one table (tui/keys.py): the help screen and the command palette are made from
the app's BINDINGS. The help says what it said when it was written by hand; the palette names
each action once."""

from __future__ import annotations

from pathlib import Path

from test_tui import started
from textual.binding import Binding

from modelscope_tui.tui import keys
from modelscope_tui.tui.app import MscopeApp

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"

# The help screen before it was generated from BINDINGS, row for row.
WRITTEN_BY_HAND = [
    ("↑ ↓ / mouse", "move"),
    ("→ / ←", "expand / collapse (← on a leaf goes to its module)"),
    ("enter", "expand or collapse; load more children"),
    ("space", "freeze or unfreeze the selected tensor or the whole module"),
    ("f / u", "freeze / unfreeze the selection"),
    ("F / U", "freeze all / unfreeze all (with a filter: only the tensors it shows)"),
    ("i", "invert (trainable <-> frozen)"),
    ("p", "freeze or unfreeze by glob or regex, with a live preview"),
    ("c", "freeze or unfreeze every module of a class (LayerNorm, BatchNorm2d...)"),
    ("l", "train only the last N repeated blocks (layers.*, h.*, blocks.*)"),
    ("b", "record eval mode for frozen norm layers with running stats"),
    ("z / y", "undo / redo (also ctrl+z / ctrl+y)"),
    ("s", "save the freeze plan (JSON, for apply_freeze_plan)"),
    ("w", "write a copy of the checkpoint with the new requires_grad (full modules, TorchScript)"),
    ("/", "filter the tree as you type (glob or substring); esc clears (in the box or the tree)"),
    ("L", "jump to the largest tensors"),
    ("o", "sort children by size"),
    ("e / E", "expand all under the cursor / collapse all"),
    ("d", "show or hide the details pane"),
    ("g", "show or hide the GPU panel (live memory, processes, fine-tune estimate)"),
    ("m", "move the selection (or the whole model from the root) onto a device"),
    ("t / T", "fine-tune estimate: next training precision / next optimizer"),
    ("D", "export the current placement as a Hugging Face device_map JSON"),
    ("A", "audit the file (integrity, load-ability, waste, NaN/Inf and statistics); enter jumps"),
    ("C", "save a copy loadable anywhere (every stored location remapped to cpu)"),
    ("P", "save a copy of the model cast to fp32 / bf16 / fp16 (size previewed; selection or all)"),
    ("v", "diff mode: compare this file (B) against another checkpoint (A), any format"),
    ("n / N", "diff mode: jump to the next / previous changed, added or removed tensor"),
    ("x", "diff mode: stop comparing values (esc too, when nothing else is open)"),
    ("M", "messages of this run (toasts that went away or waited behind a dialog)"),
    ("ctrl+p", "command palette: every action by name"),
    ("?", "this help"),
    ("q", "quit (asks when there are unsaved changes)"),
]


def test_help_rows_are_the_written_ones():
    assert MscopeApp.KEY_HELP == WRITTEN_BY_HAND


def test_every_binding_is_explained_once_in_the_help():
    named = [action for actions, _ in keys.HELP if not isinstance(actions, str) for action in actions]
    assert len(named) == len(set(named))
    assert {b.action for b in keys.BINDINGS} <= set(named)


def test_key_labels():
    assert keys.key_label(Binding("z,ctrl+z", "undo")) == "z"
    assert keys.key_label(Binding("slash", "filter")) == "/"
    assert keys.key_label(Binding("question_mark", "help")) == "?"
    assert keys.key_label(Binding("right", "expand_node")) == "→"


async def test_the_palette_lists_each_action_once():
    """It listed every action twice: its title, then the title again with the key name
    (`Filter` / `Filter (slash)`), and two quits."""
    app = MscopeApp(SAMPLES / "cnn_state_dict.pt", show_gpus=False)
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        commands = list(app.get_system_commands(app.screen))
        titles = [c.title for c in commands]
        assert len(titles) == len(set(titles)), titles
        assert [t for t in titles if t.lower().startswith("quit")] == ["Quit"]
        ours = {c.title: c for c in commands if c.title in {b.description for b in keys.BINDINGS}}
        assert len(ours) == len(keys.BINDINGS)
        for command in ours.values():
            assert command.title not in command.help  # said once
        assert ours["Filter"].help == "/ · filter the tree as you type (glob or substring); esc clears (in the box or the tree)"
        assert ours["Undo"].help == "z · undo / redo (also ctrl+z / ctrl+y)"
        assert ours["Quit"].help == "q · quit (asks when there are unsaved changes)"
        assert ours["Quit"].callback == app.action_quit_app
        assert {"Theme", "Keys", "Screenshot"} <= set(titles)  # Textual's own stay
