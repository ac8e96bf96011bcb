"""The largest tensors (L); choosing one jumps to it."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from ...training.session import Session
from ...units import fmt_bytes
from .modal import Modal


class LargestScreen(Modal):
    """The biggest tensors; choosing one jumps to it in the tree."""

    def __init__(self, session: Session, count: int = 30) -> None:
        super().__init__()
        tensors = [t for t in session.ckpt.model_tensors if t.alias_of is None]
        self.largest = sorted(tensors, key=lambda t: t.nbytes, reverse=True)[:count]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Largest tensors (enter jumps there)", classes="title")
            yield OptionList(
                *[
                    Option(f"{fmt_bytes(t.nbytes):>10}  {t.dtype:<9} {t.name}", id=t.name)
                    for t in self.largest
                ]
            )

    @on(OptionList.OptionSelected)
    def _selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)
