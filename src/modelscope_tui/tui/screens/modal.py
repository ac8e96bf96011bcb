"""What every dialog shares: centred, bordered, esc cancels; and the path prompt of the save and
compare dialogs."""

from __future__ import annotations

from textual import on
from textual.binding import Binding
from textual.screen import ModalScreen
from textual.widgets import Button, Input


class Modal(ModalScreen):
    """The base of every dialog: centred over the explorer; esc dismisses with None."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]
    DEFAULT_CSS = """
    Modal {
        align: center middle;
    }
    .dialog {
        width: 76;
        max-width: 100%;
        height: auto;
        max-height: 100%;
        border: thick $accent;
        background: $surface;
        padding: 0 1;
    }
    .dialog .title { text-style: bold; margin-bottom: 1; }
    .dialog .buttons { height: auto; margin-top: 1; }
    .dialog Button { margin-right: 1; }
    .dialog .preview { height: auto; max-height: 8; color: $text-muted; }
    """

    def action_cancel(self) -> None:
        self.dismiss(None)


class PathPrompt(Modal):
    """A dialog around an Input #path: Enter or the #ok button dismisses with the path."""

    def on_mount(self) -> None:
        self.query_one("#path", Input).focus()

    @on(Input.Submitted)
    @on(Button.Pressed, "#ok")
    def _submit(self) -> None:
        value = self.query_one("#path", Input).value.strip()
        if value:
            self.dismiss(value)

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)
