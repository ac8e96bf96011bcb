"""What every dialog shares: centred, bordered, esc cancels; and the path prompt of the save and
compare dialogs."""

from __future__ import annotations

from textual import on
from textual.await_complete import AwaitComplete
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

    answered = False  # dismissed: what is still queued for this dialog has nothing to say

    def dismiss(self, result=None) -> AwaitComplete:
        """Once. Keys pressed fast (right after q) can queue a second answer behind the first:
        a Button.Pressed or Input.Submitted posted before an esc that the screen's binding
        handles at once. Answered again, the dialog popped the screen below it (ScreenStackError),
        ran its callback twice, or read its widgets after they were removed (NoMatches '#path')."""
        if self.answered:
            return AwaitComplete.nothing()
        self.answered = True
        return super().dismiss(result)

    def action_cancel(self) -> None:
        self.dismiss(None)


class PathPrompt(Modal):
    """A dialog around an Input #path: Enter or the #ok button dismisses with the path."""

    path_input: Input | None = None  # found once mounted; compose is the subclass's

    def on_mount(self) -> None:
        self.path_input = self.query_one("#path", Input)
        self.path_input.focus()

    @on(Input.Submitted)
    @on(Button.Pressed, "#ok")
    def _submit(self) -> None:
        if self.answered or self.path_input is None:  # queued behind the answer that closed it
            return
        value = self.path_input.value.strip()
        if value:
            self.dismiss(value)

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)
