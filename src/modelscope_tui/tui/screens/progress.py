"""Progress of a long job (a move, the audit) with a Cancel button."""

from __future__ import annotations

from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, Label, Static

from ...units import fmt_bytes
from .modal import Modal


class ProgressScreen(Modal):
    """Progress of a background job with a Cancel button; the app updates and closes it."""

    def __init__(self, title: str, cancel_event) -> None:
        super().__init__()
        self.title_text = title
        self.cancel_event = cancel_event

    def compose(self) -> ComposeResult:
        from textual.widgets import ProgressBar

        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="title")
            yield ProgressBar(total=100, id="progress")
            yield Static("", id="progress-text", classes="preview")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel", variant="error")

    @dataclass
    class Progress(Message, bubble=False):
        """Posted to the screen by the job's worker thread; only the newest queued one is drawn."""

        done: int
        total: int

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, ProgressScreen.Progress)

    @on(Progress)
    def update_progress(self, event: Progress) -> None:
        from textual.widgets import ProgressBar

        if not self.is_attached:
            return
        self.query_one("#progress", ProgressBar).update(total=max(event.total, 1), progress=event.done)
        self.query_one("#progress-text", Static).update(f"{fmt_bytes(event.done)} of {fmt_bytes(event.total)}")

    def action_cancel(self) -> None:
        self.cancel_event.set()

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.cancel_event.set()
        self.query_one("#progress-text", Static).update("cancelling…")
