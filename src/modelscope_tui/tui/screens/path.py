"""Where to save (a plan, a checkpoint, a device map)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Input, Label, Static

from .modal import PathPrompt


class PathScreen(PathPrompt):
    """Ask for a file name to save to (defaults to a new file next to the checkpoint)."""

    def __init__(self, title: str, default: str, note: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.default = default
        self.note = note

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="title")
            yield Input(self.default, id="path")
            if self.note:
                yield Static(self.note, classes="preview")
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="ok")
                yield Button("Cancel", id="cancel")
