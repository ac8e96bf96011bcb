"""The explorer's keys in one place: the app's BINDINGS, and the help screen (?) and command
palette (ctrl+p) made from them, so a key, its name and its explanation cannot drift apart."""

from __future__ import annotations

from collections.abc import Iterable

from textual.binding import Binding

BINDINGS = [
    Binding("space", "toggle_freeze", "Freeze/unfreeze", show=False),
    Binding("f", "freeze", "Freeze"),
    Binding("u", "unfreeze", "Unfreeze"),
    Binding("p", "pattern", "Pattern"),
    Binding("c", "freeze_class", "Class", show=False),
    Binding("l", "last_n", "Last N", show=False),
    Binding("F", "freeze_all", "Freeze all", show=False),
    Binding("U", "unfreeze_all", "Unfreeze all", show=False),
    Binding("i", "invert", "Invert", show=False),
    Binding("z,ctrl+z", "undo", "Undo"),
    Binding("y,ctrl+y", "redo", "Redo", show=False),
    Binding("b", "eval_norms", "Eval norms", show=False),
    Binding("s", "save_plan", "Save plan"),
    Binding("w", "save_checkpoint", "Write ckpt", show=False),
    Binding("slash", "filter", "Filter"),
    Binding("L", "largest", "Largest", show=False),
    Binding("o", "sort", "Sort by size", show=False),
    Binding("e", "expand_all", "Expand all", show=False),
    Binding("E", "collapse_all", "Collapse all", show=False),
    Binding("d", "toggle_details", "Details"),
    Binding("g", "toggle_gpus", "GPUs"),
    Binding("m", "move", "Move to device", show=False),
    Binding("t", "cycle_precision", "Precision", show=False),
    Binding("D", "export_device_map", "Device map", show=False),
    Binding("A", "audit", "Audit", show=False),
    Binding("C", "cpu_copy", "CPU copy", show=False),
    Binding("P", "cast_copy", "Cast copy", show=False),
    Binding("T", "cycle_optimizer", "Optimizer", show=False),
    Binding("v", "compare", "Compare"),
    Binding("n", "next_change", "Next change"),  # shown in diff mode only (ModeFooter)
    Binding("N", "previous_change", "Previous change", show=False),
    Binding("x", "stop_compare", "Stop comparing", show=False),
    Binding("M", "messages", "Messages", show=False),
    Binding("question_mark", "help", "Help"),
    Binding("q", "quit_app", "Quit"),
]

# The help screen, in its order. A row names the actions it explains (its key column is made from
# their bindings, " / " between them) or, for what the tree widget itself handles, the keys.
HELP: list[tuple[tuple[str, ...] | str, str]] = [
    ("↑ ↓ / mouse", "move"),
    (("expand_node", "collapse_node"), "expand / collapse (← on a leaf goes to its module)"),
    ("enter", "expand or collapse; load more children"),
    (("toggle_freeze",), "freeze or unfreeze the selected tensor or the whole module"),
    (("freeze", "unfreeze"), "freeze / unfreeze the selection"),
    (("freeze_all", "unfreeze_all"), "freeze all / unfreeze all (with a filter: only the tensors it shows)"),
    (("invert",), "invert (trainable <-> frozen)"),
    (("pattern",), "freeze or unfreeze by glob or regex, with a live preview"),
    (("freeze_class",), "freeze or unfreeze every module of a class (LayerNorm, BatchNorm2d...)"),
    (("last_n",), "train only the last N repeated blocks (layers.*, h.*, blocks.*)"),
    (("eval_norms",), "record eval mode for frozen norm layers with running stats"),
    (("undo", "redo"), "undo / redo (also ctrl+z / ctrl+y)"),
    (("save_plan",), "save the freeze plan (JSON, for apply_freeze_plan)"),
    (("save_checkpoint",), "write a copy of the checkpoint with the new requires_grad (full modules, TorchScript)"),
    (("filter",), "filter the tree as you type (glob or substring); esc clears (in the box or the tree)"),
    (("largest",), "jump to the largest tensors"),
    (("sort",), "sort children by size"),
    (("expand_all", "collapse_all"), "expand all under the cursor / collapse all"),
    (("toggle_details",), "show or hide the details pane"),
    (("toggle_gpus",), "show or hide the GPU panel (live memory, processes, fine-tune estimate)"),
    (("move",), "move the selection (or the whole model from the root) onto a device"),
    (("cycle_precision", "cycle_optimizer"), "fine-tune estimate: next training precision / next optimizer"),
    (("export_device_map",), "export the current placement as a Hugging Face device_map JSON"),
    (("audit",), "audit the file (integrity, load-ability, waste, NaN/Inf and statistics); enter jumps"),
    (("cpu_copy",), "save a copy loadable anywhere (every stored location remapped to cpu)"),
    (("cast_copy",), "save a copy of the model cast to fp32 / bf16 / fp16 (size previewed; selection or all)"),
    (("compare",), "diff mode: compare this file (B) against another checkpoint (A), any format"),
    (("next_change", "previous_change"), "diff mode: jump to the next / previous changed, added or removed tensor"),
    (("stop_compare",), "diff mode: stop comparing values (esc too, when nothing else is open)"),
    (("messages",), "messages of this run (toasts that went away or waited behind a dialog)"),
    (("command_palette",), "command palette: every action by name"),
    (("help",), "this help"),
    (("quit_app",), "quit (asks when there are unsaved changes)"),
]

# What the footer leaves out: outside diff mode the diff keys, in it the freeze keys (they
# still work, and `?` and the command palette list them).
DIFF_ONLY = frozenset({"next_change"})
NOT_IN_DIFF = frozenset({"toggle_freeze", "freeze", "unfreeze", "pattern", "undo", "save_plan"})

KEY_NAMES = {"slash": "/", "question_mark": "?", "right": "→", "left": "←"}


def key_label(binding: Binding) -> str:
    """The key as the help shows it: the first of its keys, `/` for slash, `→` for right."""
    key = binding.key.split(",")[0].strip()
    return KEY_NAMES.get(key, key)


def _by_action(bindings: Iterable[Binding]) -> dict[str, Binding]:
    """action -> its first binding; `app.x` (a widget binding the app's action) counts as x."""
    out: dict[str, Binding] = {}
    for binding in bindings:
        out.setdefault(binding.action.removeprefix("app."), binding)
    return out


def help_rows(bindings: Iterable[Binding]) -> list[tuple[str, str]]:
    """(keys, explanation) for the help screen. `bindings`: every binding a row names (the app's,
    the tree's, the command palette's); a row naming an action without one is a bug."""
    by_action = _by_action(bindings)
    rows = []
    for keys, text in HELP:
        if not isinstance(keys, str):
            keys = " / ".join(key_label(by_action[action]) for action in keys)
        rows.append((keys, text))
    return rows


def palette(bindings: Iterable[Binding]) -> list[tuple[str, str, str]]:
    """(title, help, action) for the command palette: each action once, titled as in the footer,
    its help the key and the help screen's explanation."""
    texts = {action: text for actions, text in HELP if not isinstance(actions, str) for action in actions}
    return [
        (binding.description or action, f"{key_label(binding)} · {texts[action]}", action)
        for action, binding in _by_action(bindings).items()
    ]
