"""Pick the checkpoint to compare against (v), with path completion; or leave diff mode."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.suggester import Suggester
from textual.widgets import Button, Input, Label, Static

from .modal import PathPrompt


class PathSuggester(Suggester):
    """Completes a path from the file system: the first entry of its directory that extends it
    (directories get a trailing slash). Right arrow accepts the suggestion."""

    def __init__(self) -> None:
        super().__init__(use_cache=False, case_sensitive=True)

    async def get_suggestion(self, value: str) -> str | None:
        import os

        if not value:
            return None
        head, _, tail = value.rpartition("/")
        directory = os.path.expanduser(head + "/" if head or value.startswith("/") else ".")
        try:
            names = sorted(n for n in os.listdir(directory) if n.startswith(tail) and (tail or not n.startswith(".")))
        except OSError:
            return None
        for name in names:
            if name == tail:
                continue
            full = (head + "/" if head or value.startswith("/") else "") + name
            if os.path.isdir(os.path.join(directory, name)):
                full += "/"
            return full
        return None


class CompareScreen(PathPrompt):
    """Ask for the checkpoint to compare the open one against (diff mode); dismisses with the
    path, LEAVE to leave diff mode, or None."""

    LEAVE = "<leave diff mode>"

    def __init__(self, current: str, default: str, in_diff: bool = False) -> None:
        super().__init__()
        self.current = current
        self.default = default
        self.in_diff = in_diff

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Compare with another checkpoint", classes="title")
            yield Input(self.default, placeholder="path/to/before.pt (any format)", id="path", suggester=PathSuggester(), select_on_focus=False)
            yield Static(
                f"{self.current} stays B (the tree); the file you name is A, the baseline. "
                "Added, removed and reshaped tensors show at once; values fill in. → completes a path.",
                classes="preview",
            )
            with Horizontal(classes="buttons"):
                yield Button("Compare", variant="primary", id="ok")
                if self.in_diff:
                    yield Button("Leave diff mode", id="leave")
                yield Button("Cancel", id="cancel")

    @on(Button.Pressed, "#leave")
    def _leave(self) -> None:
        self.dismiss(self.LEAVE)
