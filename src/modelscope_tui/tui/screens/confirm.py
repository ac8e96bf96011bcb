"""A question with a few labelled answers (unsaved changes, overwrite, cast copy)."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Label, Static

from .modal import Modal


class ConfirmScreen(Modal):
    """A question with a few labelled answers; dismisses with the chosen answer's id."""

    def __init__(self, title: str, body: str, answers: list[tuple[str, str, str]]) -> None:
        super().__init__()
        self.title_text = title
        self.body = body
        self.answers = answers  # (id, label, variant)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="title")
            yield Static(self.body)
            with Horizontal(classes="buttons"):
                for answer_id, label, variant in self.answers:
                    yield Button(label, id=answer_id, variant=variant)

    def on_mount(self) -> None:
        self.query(Button).first().focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id)
