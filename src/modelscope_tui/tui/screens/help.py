"""Every key (?), and what mscope does not do."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Label, Static

from .modal import Modal

NO_FORWARD_PASS = (
    "\nmscope reads the file and runs no code from it, so no forward pass: no output shapes, "
    "FLOPs or graph as torchinfo or Netron show (those need the model's code and an input). "
    "What it has instead: every tensor's shape, dtype and bytes, parameter counts per module, "
    "the module classes a full-module file names, memory for training (t / T) and the norm "
    "profile of each module (d)."
)

SIZES = "Sizes are binary: 1 KiB = 1,024 bytes, 1 MiB = 2^20, 1 GiB = 2^30 (JSON output keeps bytes)."


class HelpScreen(Modal):
    """Every key, grouped; the same actions are in the command palette (ctrl+p)."""

    BINDINGS = [Binding("escape,q,question_mark", "cancel", "Close")]

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        super().__init__()
        self.keys = keys

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for key, description in self.keys:
            table.add_row(key, description)
        with Vertical(classes="dialog"):
            yield Label("mscope keys (esc closes; ctrl+p lists every action)", classes="title")
            with VerticalScroll():
                yield Static(table)
                yield Static(NO_FORWARD_PASS, classes="note")
                yield Static(SIZES, classes="note")
