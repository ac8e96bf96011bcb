"""Modal screens. Each returns its answer through `dismiss`; none changes state itself."""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.suggester import Suggester
from textual.widgets import Button, Input, Label, OptionList, RadioButton, RadioSet, Static
from textual.widgets.option_list import Option
from textual.worker import Worker, get_current_worker

from ..errors import MscopeError
from ..session import BlockGroup, Session
from ..units import fmt_bytes, fmt_count


@dataclass(slots=True)
class PatternChoice:
    pattern: str
    kind: str  # glob | regex
    trainable: bool


class _Modal(ModalScreen):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]
    DEFAULT_CSS = """
    _Modal, PatternScreen, ClassScreen, LastNScreen, LargestScreen, HelpScreen, ConfirmScreen, PathScreen,
    DeviceScreen, ProgressScreen, AuditScreen, CompareScreen {
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


class _PathPrompt(_Modal):
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


class PatternScreen(_Modal):
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


class ClassScreen(_Modal):
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


class LastNScreen(_Modal):
    """Train only the last N of a group of repeated blocks."""

    def __init__(self, groups: list[BlockGroup]) -> None:
        super().__init__()
        self.groups = groups

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Train only the last N blocks", classes="title")
            with RadioSet(id="group"):
                for i, g in enumerate(self.groups[:8]):
                    yield RadioButton(f"{g.prefix}.{g.indices[0]}..{g.indices[-1]} ({g.count} blocks)", value=i == 0)
            yield Input("", placeholder="N", id="n", type="integer")
            yield Static("Blocks before the last N are frozen; the last N train. Other layers keep their state.", classes="preview")
            with Horizontal(classes="buttons"):
                yield Button("Apply", variant="primary", id="apply")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#n", Input).focus()

    @on(Input.Submitted)
    @on(Button.Pressed, "#apply")
    def _apply(self) -> None:
        value = self.query_one("#n", Input).value
        if not value.isdigit():
            self.notify("enter a number of blocks", severity="warning")
            return
        index = self.query_one("#group", RadioSet).pressed_index
        self.dismiss((self.groups[max(0, index)], int(value)))

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)


class LargestScreen(_Modal):
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
                    Option(f"{fmt_bytes(t.nbytes):>9}  {t.dtype:<9} {t.name}", id=t.name)
                    for t in self.largest
                ]
            )

    @on(OptionList.OptionSelected)
    def _selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


class ConfirmScreen(_Modal):
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


class PathScreen(_PathPrompt):
    """Ask for a file name to save to (defaults to a new file next to the checkpoint)."""

    def __init__(self, title: str, default: str, note: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.default = default
        self.note = note

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="title")
            yield Input(self.default, id="path")
            if self.note:
                yield Static(self.note, classes="preview")
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="ok")
                yield Button("Cancel", id="cancel")


NO_FORWARD_PASS = (
    "\nmscope reads the file and runs no code from it, so no forward pass: no output shapes, "
    "FLOPs or graph as torchinfo or Netron show (those need the model's code and an input). "
    "What it has instead: every tensor's shape, dtype and bytes, parameter counts per module, "
    "the module classes a full-module file names, memory for training (t / T) and the norm "
    "profile of each module (d)."
)


class HelpScreen(_Modal):
    """Every key, grouped; the same actions are in the command palette (ctrl+p)."""

    BINDINGS = [Binding("escape,q,question_mark", "cancel", "Close")]

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        super().__init__()
        self.keys = keys

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for key, description in self.keys:
            table.add_row(key, description)
        with Vertical(classes="dialog"):
            yield Label("mscope keys (esc closes; ctrl+p lists every action)", classes="title")
            with VerticalScroll():
                yield Static(table)
                yield Static(NO_FORWARD_PASS, classes="note")


class DeviceScreen(_Modal):
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


class ProgressScreen(_Modal):
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


class AuditScreen(_Modal):
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


class CompareScreen(_PathPrompt):
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

