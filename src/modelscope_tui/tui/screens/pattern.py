"""Freeze or unfreeze by glob or regex (p), with a live preview of what matches."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, Input, Label, RadioButton, RadioSet, Static
from textual.worker import Worker, get_current_worker

from ...errors import MscopeError
from ...training.session import Session
from ...units import fmt_count
from .modal import Modal


@dataclass(slots=True)
class PatternChoice:
    pattern: str
    kind: str  # glob | regex
    trainable: bool


class PatternScreen(Modal):
    """Freeze or unfreeze by glob/regex, with a live count of what matches."""

    def __init__(self, session: Session, initial: str = "") -> None:
        super().__init__()
        self.session = session
        self.initial = initial

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Freeze by pattern", classes="title")
            yield Input(self.initial, placeholder="encoder.layers.[0-9].*", id="pattern")
            with RadioSet(id="kind"):
                yield RadioButton("glob", value=True, id="glob")
                yield RadioButton("regex", id="regex")
            yield Static("type a pattern", id="preview", classes="preview")
            with Horizontal(classes="buttons"):
                yield Button("Freeze", variant="primary", id="freeze")
                yield Button("Unfreeze", variant="success", id="unfreeze")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#pattern", Input).focus()
        if self.initial:
            self.update_preview()

    @property
    def kind(self) -> str:
        return "regex" if self.query_one("#regex", RadioButton).value else "glob"

    @on(Input.Changed, "#pattern")
    @on(RadioSet.Changed)
    def update_preview(self) -> None:
        self._preview(self.query_one("#pattern", Input).value, self.kind)

    @dataclass
    class PreviewReady(Message, bubble=False):
        text: Text
        worker: Worker  # a preview of what was typed before is dropped

    @work(thread=True, exclusive=True, exit_on_error=False)
    def _preview(self, pattern: str, kind: str) -> None:
        if not pattern:
            text = Text("type a pattern", style="dim")
        else:
            try:
                names = self.session.match(pattern, kind)
                p = self.session.preview(names)
                text = Text(f"{p.tensors:,} tensors, {fmt_count(p.parameters)} parameters match")
                if p.untrainable:
                    text.append(f" ({p.untrainable:,} integer/bool tensors stay as they are)", style="yellow")
                for name in names[:5]:
                    text.append(f"\n  {name}", style="dim")
                if len(names) > 5:
                    text.append(f"\n  … {len(names) - 5:,} more", style="dim")
            except MscopeError as exc:
                text = Text(exc.message, style="red")
        self.post_message(self.PreviewReady(text, get_current_worker()))

    @on(PreviewReady)
    def _show_preview(self, event: PreviewReady) -> None:
        if not event.worker.is_cancelled:  # a newer preview replaced this one's worker
            self.query_one("#preview", Static).update(event.text)

    @on(Input.Submitted, "#pattern")
    def _submit(self) -> None:
        self._finish(False)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "cancel":
            self.dismiss(None)
        else:
            self._finish(event.button.id == "unfreeze")

    def _finish(self, trainable: bool) -> None:
        pattern = self.query_one("#pattern", Input).value
        if pattern:
            self.dismiss(PatternChoice(pattern, self.kind, trainable))
