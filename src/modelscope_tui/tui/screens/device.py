"""Pick the device to move the selection to (m)."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, OptionList, Static
from textual.widgets.option_list import Option

from .modal import Modal


class DeviceScreen(Modal):
    """Pick a device to move the selection to; unavailable ones are shown with the reason."""

    def __init__(self, devices, what: str) -> None:
        super().__init__()
        self.devices = devices
        self.what = what

    def compose(self) -> ComposeResult:
        options = []
        for d in self.devices:
            label = d.name if d.available else f"{d.name}  ({d.reason})"
            options.append(Option(label, id=d.name, disabled=not d.available))
        with Vertical(classes="dialog"):
            yield Label(f"Move {self.what} to…", classes="title")
            yield OptionList(*options)
            yield Static("Tensors are read from the file straight onto the device; a failed move changes nothing.", classes="preview")

    @on(OptionList.OptionSelected)
    def _selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)
