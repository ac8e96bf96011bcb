"""Train only the last N repeated blocks (l)."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Input, Label, RadioButton, RadioSet, Static

from ...training.session import BlockGroup
from .modal import Modal


class LastNScreen(Modal):
    """Train only the last N of a group of repeated blocks."""

    def __init__(self, groups: list[BlockGroup]) -> None:
        super().__init__()
        self.groups = groups

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Train only the last N blocks", classes="title")
            with RadioSet(id="group"):
                for i, g in enumerate(self.groups[:8]):
                    yield RadioButton(f"{g.prefix}.{g.indices[0]}..{g.indices[-1]} ({g.count} blocks)", value=i == 0)
            yield Input("", placeholder="N", id="n", type="integer")
            yield Static("Blocks before the last N are frozen; the last N train. Other layers keep their state.", classes="preview")
            with Horizontal(classes="buttons"):
                yield Button("Apply", variant="primary", id="apply")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#n", Input).focus()

    @on(Input.Submitted)
    @on(Button.Pressed, "#apply")
    def _apply(self) -> None:
        value = self.query_one("#n", Input).value
        if not value.isdigit():
            self.notify("enter a number of blocks", severity="warning")
            return
        index = self.query_one("#group", RadioSet).pressed_index
        self.dismiss((self.groups[max(0, index)], int(value)))

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)
