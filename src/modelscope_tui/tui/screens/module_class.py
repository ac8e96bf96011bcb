"""Freeze or unfreeze every module of a class (c)."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Label, OptionList, Static
from textual.widgets.option_list import Option

from ...training.session import Session
from .modal import Modal


class ClassScreen(Modal):
    """Pick a module class; `f` freezes every module of it, `u` unfreezes."""

    BINDINGS = [Binding("f", "choose(False)", "Freeze"), Binding("u", "choose(True)", "Unfreeze")]

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.class_counts = session.classes()

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Freeze by module class (f freeze, u unfreeze, esc cancel)", classes="title")
            if self.class_counts:
                yield OptionList(*[Option(f"{name}  ({count})", id=name) for name, count in self.class_counts.items()])
            else:
                yield Static("This file has no module classes (a plain state_dict). Use a pattern (p).")

    def action_choose(self, trainable: bool) -> None:
        options = self.query(OptionList)
        if not options:
            return
        option_list = options.first()
        if option_list.highlighted is not None:
            option = option_list.get_option_at_index(option_list.highlighted)
            self.dismiss((option.id, trainable))

    @on(OptionList.OptionSelected)
    def _selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss((event.option.id, False))
