"""Audit findings (A), worst first; enter on one with a tensor jumps to it."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, OptionList, Static
from textual.widgets.option_list import Option

from .modal import Modal


class AuditScreen(Modal):
    """Audit findings, worst first; enter on one with a tensor jumps to it."""

    def __init__(self, report) -> None:
        super().__init__()
        self.report = report

    def compose(self) -> ComposeResult:
        styles = {"error": "bold red", "warning": "yellow", "info": "dim"}
        options = []
        for i, f in enumerate(self.report.findings[:500]):
            text = Text(f"{f.severity:<7} ", style=styles.get(f.severity, ""))
            text.append(f.message[:200])
            options.append(Option(text, id=str(i)))
        with Vertical(classes="dialog"):
            yield Label(self.report.verdict_line(), classes="title")
            if options:
                yield OptionList(*options)
            else:
                yield Static("No findings.")

    @on(OptionList.OptionSelected)
    def _selected(self, event: OptionList.OptionSelected) -> None:
        finding = self.report.findings[int(event.option.id)]
        self.dismiss(finding.tensor)
