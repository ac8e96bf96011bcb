"""Every message of this run (M): what the toasts said, also those that went away or waited
behind a dialog, with their time and severity, newest last."""

from __future__ import annotations

import time

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Label, Static

from ..controllers.feedback import Said
from .modal import Modal

SEVERITY = {
    "information": ("info", "green"),
    "warning": ("warn", "yellow"),
    "error": ("error", "bold red"),
}


def history_table(history: list[Said]) -> Table:
    """One row per message: time, severity, text (wrapped; `×3` when said three times)."""
    table = Table.grid(padding=(0, 1))
    table.add_column(no_wrap=True, style="dim")
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for said in history:
        word, style = SEVERITY.get(said.severity, (said.severity, ""))
        text = Text(said.text)  # escaped when it was said (MscopeApp.notify)
        if said.count > 1:
            text.append(f"  ×{said.count}", style="dim")
        table.add_row(
            time.strftime("%H:%M:%S", time.localtime(said.time)), Text(word, style=style), text
        )
    return table


class MessagesScreen(Modal):
    """The history, scrolled to its end (the newest message)."""

    BINDINGS = [Binding("escape,q,M", "cancel", "Close")]
    DEFAULT_CSS = """
    MessagesScreen #messages-list { height: auto; max-height: 70vh; }
    """

    def __init__(self, history: list[Said]) -> None:
        super().__init__()
        self.history = list(history)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(
                f"Messages of this run: {len(self.history):,} (esc closes)", classes="title"
            )
            with VerticalScroll(id="messages-list"):
                if self.history:
                    yield Static(history_table(self.history), id="messages")
                else:
                    yield Static(Text("nothing said yet", style="dim"), id="messages")

    def on_mount(self) -> None:
        scroll = self.query_one("#messages-list", VerticalScroll)
        scroll.focus()
        self.call_after_refresh(scroll.scroll_end, animate=False)
