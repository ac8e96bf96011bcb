"""The explorer: `mscope FILE`. A thin view: every freeze action is a Session method, feature
state lives in plain controllers (controllers/), and worker threads report through messages
(messages.py) handled here on the UI thread.

Workers are `exclusive` (Textual cancels the group's older worker) where the older one has nothing
left to say: opening, the device list, a move, a save, the filter. Statistics, norms, the estimate
and a diff are replaced through their controller's Job instead, which stops the older thread early
(domain code polls its cancel event) and decides what its late results are worth: a thread worker
cancelled by Textual keeps running unseen, and `workers.wait_for_complete()` raises for it."""

from __future__ import annotations

import functools
import gc
import os
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Group
from rich.text import Text
from textual import events, on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.notifications import Notify
from textual.screen import Screen
from textual.widgets import Input, LoadingIndicator, Static
from textual.worker import Worker, WorkerState

from ..checkpoint import Checkpoint
from ..errors import MscopeError
from ..readers import FORMAT_LABELS
from ..readers.sources.location import as_location
from ..training.session import Session
from ..units import count_pair, fmt_bytes, percent, safe_text
from . import keys
from .controllers.caveats import NormCaveat
from .controllers.devices import DeviceMover, MoveJob
from .controllers.diff import DiffController, DiffJob
from .controllers.estimate import EstimateJob, Estimator
from .controllers.feedback import Feedback
from .controllers.filter import FilterJob, TreeFilter
from .controllers.values import NormProfiler, NormsJob, StatsJob, TensorStats
from .messages import (
    Audited,
    CheckpointFailed,
    CheckpointOpened,
    DevicesListed,
    DiffFailed,
    DiffOpened,
    DiffProgress,
    DiffResults,
    EstimateReady,
    FilterReady,
    GpuSampled,
    Moved,
    NormsProgress,
    NormsReady,
    Notice,
    StatsReady,
)
from .panes import DETAILS, GPUS, NARROW, WIDE, fit_panes
from .widgets.details import (
    diff_file_details,
    diff_module_details,
    diff_tensor_details,
    file_details,
    ghost_details,
    module_details,
    norm_profile_details,
    stats_details,
    tensor_details,
)
from .widgets.footer import ModeFooter
from .widgets.gpu_panel import GpuPanel
from .widgets.tree import DIFF_MARKS, ParamTree, Row, Seen

if TYPE_CHECKING:
    from .screens.pattern import PatternChoice
    from .screens.progress import ProgressScreen


def _while_running(handler):
    """For handlers of what worker threads post: a report queued before the app began to close
    is handled after the widgets it would update are gone, so it is dropped then."""

    @functools.wraps(handler)
    def guarded(self, event):
        if self.is_running:
            handler(self, event)

    return guarded


EXPAND_ALL_LIMIT = 3000  # nodes added by one "expand all"; more would stall the terminal
TOASTS_MAX = 2  # toasts on screen at once below TOASTS_ROOMY rows (the oldest goes; M lists it)
TOASTS_ROOMY, TOASTS_MAX_ROOMY = 40, 4
EXIT_AFTER_PAINT_ENV = "MSCOPE_EXIT_AFTER_PAINT"  # benchmarks: quit once the tree is painted


class MscopeApp(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "mscope"
    SUSPENDED_SCREEN_CLASS = "-suspended"  # the explorer behind a dialog: app.tcss hides its toasts

    BINDINGS = keys.BINDINGS
    # The help screen's rows; they name the app's keys, the tree's and the command palette's.
    KEY_HELP = keys.help_rows([*BINDINGS, *ParamTree.BINDINGS, Binding(App.COMMAND_PALETTE_BINDING, "command_palette")])

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        checkpoint: Checkpoint | None = None,
        gpu_interval: float = 1.0,
        show_gpus: bool | None = None,
        prefetch=None,
        compare: str | os.PathLike | None = None,
        atol: float = 1e-8,
        rtol: float = 1e-5,
        plan: str | os.PathLike | None = None,
        compare_prefetch=None,
    ):
        super().__init__()
        self.path = as_location(path) if path is not None else checkpoint.path if checkpoint else None
        self._preloaded = checkpoint
        self._prefetch = prefetch  # a Future of open_checkpoint started before Textual loaded
        self.session: Session | None = None
        self.error_line: str | None = None
        # Diff mode: this file is B; `compare` is A (the baseline), opened once B is shown.
        self.diff = DiffController(compare, atol, rtol, plan, compare_prefetch)
        self.stats = TensorStats()
        self.norms: NormProfiler | None = None  # these two need the checkpoint: made once it is open
        self.mover: DeviceMover | None = None
        self.estimator = Estimator()
        self.filter = TreeFilter()
        self.norm_caveat = NormCaveat()
        self.feedback = Feedback()  # every message of the run (M), and when a toast shows
        self.gpu_interval = gpu_interval
        self.show_gpus = show_gpus
        # The panes the user wants shown; a pane may still be hidden for lack of room (panes.py).
        self.want_details: bool | None = None  # set at mount, from the terminal's width
        self.want_gpus: bool | None = None
        self.monitor = None  # a GpuMonitor while the GPU panel is shown
        self.exit_after_paint = bool(os.environ.get(EXIT_AFTER_PAINT_ENV))
        self.resume_gc_after_paint = False  # run_app sets it when the command paused gc at start

    # -- layout --------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Static("mscope", id="header")
        with Horizontal(id="main"):
            with Vertical(id="tree-pane"):
                yield Static("", id="columns")
                if not self._at_hand():
                    yield LoadingIndicator(id="loading")
                yield Static("", id="diff-progress")
            with VerticalScroll(id="details-pane"):
                yield Static("", id="details")
            yield GpuPanel(id="gpu-panel")
        yield Input(placeholder="filter: substring or glob (esc clears)", id="filter")
        yield ModeFooter(id="footer")

    def on_mount(self) -> None:
        self.screen_change_signal.subscribe(self, self._screen_changed)
        self.query_one("#filter", Input).display = False
        self._set_footer_mode()
        self.query_one("#diff-progress", Static).display = False
        self.query_one("#details-pane").display = False  # until _fit_panes gives them room
        self.query_one("#gpu-panel", GpuPanel).display = False
        self.want_details = self.size.width >= NARROW
        self.want_gpus = self.show_gpus if self.show_gpus is not None else self.size.width >= WIDE
        self._fit_panes()
        self.query_one("#header", Static).update(Text(f"mscope · opening {safe_text(self.path)} …"))
        if self._preloaded is not None:
            self._loaded(self._preloaded)
        elif self._at_hand():
            # The command's prefetch finished while Textual was imported (usual for a file of a
            # few hundred tensors): the tree is in the first frame, without a worker and the
            # loading frame before it.
            try:
                ckpt = self._prefetch.result()
            except MscopeError as exc:
                self._failed(CheckpointFailed(exc.line()))
            except Exception as exc:  # as a worker's error would be: one line, exit 3
                self._open_crashed(exc)
            else:
                self._loaded(ckpt)
        else:
            self._open(self.path)

    def _at_hand(self) -> bool:
        """Is the checkpoint (or the error opening it) there already, with no waiting?"""
        return self._preloaded is not None or (self._prefetch is not None and self._prefetch.done())

    @work(thread=True, exclusive=True, exit_on_error=False, group="open")
    def _open(self, path: Path) -> None:
        from ..readers import open_checkpoint

        try:
            ckpt = self._prefetch.result() if self._prefetch is not None else open_checkpoint(path)
        except MscopeError as exc:
            self.post_message(CheckpointFailed(exc.line()))
            return
        self.post_message(CheckpointOpened(ckpt))

    @on(CheckpointFailed)
    def _failed(self, event: CheckpointFailed) -> None:
        self.error_line = event.line
        self._resume_gc()
        self.exit(return_code=2)

    @on(CheckpointOpened)
    @_while_running
    def _opened(self, event: CheckpointOpened) -> None:
        self._loaded(event.ckpt)

    def _resume_gc(self) -> None:
        """The `mscope` command starts with gc off, and the app turns it on after the first
        paint. What start-up built (Textual's widgets and styles, the whole checkpoint: 600k
        objects for a 100k-tensor file) lives as long as the app, so it is frozen out of later
        collections first: each full collection over it was a 0.15 s stall in the explorer."""
        if self.resume_gc_after_paint:
            self.resume_gc_after_paint = False
            gc.freeze()
            gc.enable()

    def _loaded(self, ckpt: Checkpoint) -> None:
        self.session = Session(ckpt)
        self.norms = NormProfiler(ckpt)
        self.mover = DeviceMover(self.session)
        tree = ParamTree(self.session, id="tree")
        for loading in self.query("#loading"):  # not composed when the checkpoint was at hand
            loading.remove()
        self.query_one("#tree-pane").mount(tree, before="#diff-progress")
        tree.populate()
        tree.focus()
        self._fit_panes()
        self.refresh_state()
        self._show_row(tree.root.data)
        if ckpt.dangerous_globals:
            self.notify(
                f"{len(ckpt.dangerous_globals)} dangerous global(s) in this file: nothing was run. See details.",
                severity="error",
                timeout=10,
            )
        if ckpt.refusals:
            self.notify(
                ckpt.refusals[0] + (f" (+{len(ckpt.refusals) - 1} more; see details)" if len(ckpt.refusals) > 1 else ""),
                severity="warning",
                timeout=10,
            )
        self.call_after_refresh(self._resume_gc)
        if self.exit_after_paint:
            self.call_after_refresh(self._painted)
        if self.diff.compare_path is not None:
            self._start_compare(self.diff.compare_path, self.diff.prefetch)

    def _painted(self) -> None:
        """Benchmarks: report seconds since MSCOPE_BENCH_T0 (the spawn time), then quit."""
        report = os.environ.get("MSCOPE_FIRST_PAINT_REPORT")
        t0 = os.environ.get("MSCOPE_BENCH_T0")
        if report and t0:
            import time

            Path(report).write_text(f"{time.time() - float(t0):.6f}\n")
        self.exit(return_code=0)

    @property
    def tree(self) -> ParamTree:
        return self.query_one("#tree", ParamTree)

    @on(Worker.StateChanged)
    def _worker_failed(self, event: Worker.StateChanged) -> None:
        """Every worker's unexpected error: one line, like the CLI, never a traceback. Before the
        file is open it ends the app (the CLI prints the line); after, it is a notification."""
        if event.state != WorkerState.ERROR:
            return
        error = event.worker.error
        if self.session is None:
            self._open_crashed(error)
        else:
            self.notify(self._error_line(error), severity="error", timeout=10)

    @staticmethod
    def _error_line(error: BaseException) -> str:
        line = error.line() if isinstance(error, MscopeError) else f"internal error: {type(error).__name__}: {error}"
        return " ".join(str(line).split())[:300]

    def _open_crashed(self, error: BaseException) -> None:
        """An error before the file was shown ends the app (the CLI prints the line)."""
        self.error_line = self._error_line(error)
        self._resume_gc()
        self.exit(return_code=2 if isinstance(error, MscopeError) else 3)

    @on(Notice)
    @_while_running
    def _notice(self, event: Notice) -> None:
        self.notify(event.message, severity=event.severity, timeout=event.timeout)

    # -- state display -------------------------------------------------------------------------
    def refresh_state(self) -> None:
        if self.session is None:
            return
        self._render_header()
        self._update_columns()
        self.update_estimate()
        if self.query("#tree"):
            self.tree.repaint()
            node = self.tree.cursor_node
            self._show_row(node.data if node is not None else None)

    def _render_header(self) -> None:
        ckpt = self.session.ckpt
        totals = ckpt.totals()
        live = self.diff.live
        header = Text()
        if live is None or self.size.width >= NARROW:  # diff mode: B's name is on the root row
            header.append(safe_text(ckpt.path.name), style="bold")
            header.append("  ")
        if live is not None:
            header.append_text(self._diff_summary())
        else:
            # Compact counts, unless they hide a change (one frozen BatchNorm of 1.6K params).
            trainable, total = self.session.totals()
            header.append(f"trainable {count_pair(trainable, total)} ({percent(trainable, total)})", style="bold green")
            if lora := self.session.lora_line():
                header.append(f" · {lora}", style="magenta")
        if self.filter.text:  # right after the totals: at 80 columns the tail of this line is cut
            header.append(f" · filter: {safe_text(self.filter.text)}", style="magenta")
        if self.session.dirty:
            header.append(" ● unsaved", style="bold yellow")
        header.append(f" · {fmt_bytes(totals.nbytes)}")
        locations = [loc for loc in totals.bytes_by_location if loc != "cpu"]
        if locations:
            header.append(f" · saved on {', '.join(locations)}", style="yellow")
        if self.mover is not None and self.mover.placed:
            header.append(" · " + self.mover.placed_line(), style="magenta")
        header.append(f" · {ckpt.kind.replace('_', ' ')} · {FORMAT_LABELS.get(ckpt.format, ckpt.format)}", style="dim")
        dtypes = ", ".join(totals.bytes_by_dtype)
        if dtypes:
            header.append(f" · {dtypes}", style="cyan")
        self.query_one("#header", Static).update(header)

    def _diff_summary(self) -> Text:
        """Diff mode header: `Δ vs A.pt: 3 changed · 1 added · … · 20 same`, then progress."""
        live = self.diff.live
        text = Text(f"Δ vs {safe_text(live.a.path.name)}: ", style="bold")
        first = True
        for status, n in live.summary():
            _, style, word = DIFF_MARKS.get(status, ("", "", status))
            if not first:
                text.append(" · ", style="dim")
            first = False
            text.append(f"{n:,} {word}", style=style)
        if first:
            text.append("no tensors", style="dim")
        if live.grad_changed:
            text.append(f" · {len(live.grad_changed):,} requires_grad changed", style="yellow")
        if live.running:
            text.append(f" · comparing {live.fraction:.0%}", style="bold")
        elif live.cancelled:
            text.append(" · stopped", style="bold yellow")
        if self.diff.plan_lines:
            ok = self.diff.plan_ok
            text.append(" · plan ok" if ok else " · plan: frozen moved", style="green" if ok else "bold red")
        return text

    def _update_columns(self) -> None:
        if self.query("#tree"):
            self.tree.fit_width()
            self.query_one("#columns", Static).update(self.tree.column_header())

    @on(ParamTree.LayoutChanged)
    def _tree_layout_changed(self, event: ParamTree.LayoutChanged) -> None:
        if event.need_changed:
            self._fit_panes(may_close=False)
        self._update_columns()

    # -- who gets the width ----------------------------------------------------------------------
    def on_resize(self, event: events.Resize) -> None:
        self._fit_panes(width=event.size.width)  # the app's own size may not follow yet

    def _fit_panes(self, opened: str | None = None, may_close: bool = True, width: int | None = None) -> None:
        """Give the tree what it needs (names, shapes, dtypes), then the side panes what is left
        (panes.py). A wanted pane left out is said once, and comes back when there is room."""
        if self.want_details is None:  # not mounted yet
            return
        details = self.query_one("#details-pane")
        panel = self.query_one("#gpu-panel", GpuPanel)
        tree = self.tree if self.query("#tree") else None
        need = tree.needed_width() if tree is not None else Seen().needed_width()
        wants = tree.wanted_width() if tree is not None else need
        width = width or self.size.width
        if may_close:
            fit = fit_panes(width, need, self.want_details, self.want_gpus, opened, tree_wants=wants)
        else:  # the tree grew: narrow what is shown, never open or close a pane
            fit = fit_panes(width, need, details.display, panel.display, may_close=False, tree_wants=wants)
        for pane in fit.closed:
            shown = (details if pane == DETAILS else panel).display
            if pane == opened or shown:
                self._say_no_room(pane, need, width, opened)
        details.display = fit.details is not None
        if fit.details is not None:
            details.styles.width = fit.details
        if fit.gpus is not None:
            if panel.styles.width is None or panel.styles.width.value != fit.gpus:
                self.estimator.drawn = None  # the estimate lines are drawn for the panel's width
            panel.styles.width = panel.styles.min_width = fit.gpus
            panel.compact = fit.compact
        if (fit.gpus is not None) != panel.display:
            self._set_gpu_panel(fit.gpus is not None)
        elif fit.gpus is not None:
            self.call_after_refresh(self.update_estimate, False)
        self.call_after_refresh(self._update_columns)  # showing a pane sends the tree no Resize

    def _say_no_room(self, pane: str, need: int, width: int, opened: str | None) -> None:
        name, key = ("details pane", "d") if pane == DETAILS else ("GPU panel", "g")
        what = "names, shapes, dtypes and changes" if self.diff.live is not None else "names, shapes and dtypes"
        why = f"the tree needs {need} of {width} columns for {what}"
        if pane == opened:
            self.notify(f"no room for the {name}: {why}", severity="warning", timeout=5)
        elif opened is not None:
            self.notify(f"{name} hidden to make room ({key} shows it again)", timeout=4)
        else:
            self.notify(f"{name} hidden: {why}; it returns when the terminal is wider", timeout=5)

    @on(ParamTree.RowHighlighted)
    def _row_highlighted(self, event: ParamTree.RowHighlighted) -> None:
        try:
            self._show_row(event.row)
        except NoMatches:
            # A highlight the tree posted as the app began closing (seen on a loaded CI box):
            # the details pane (always composed) is already gone, and there is nothing to update.
            pass

    def _show_row(self, row: Row | None) -> None:
        if self.session is None:
            return
        details = self.query_one("#details", Static)
        live = self.diff.live
        if row is None or (row.module is None and row.tensor is None):
            details.update("")
        elif row.ghost:
            details.update(ghost_details(row, live) if live is not None else "")
        elif row.tensor is not None:
            cached = self.stats.get(row.tensor.qualified_name)
            values = stats_details(*cached) if cached is not None else stats_details(None)
            content = tensor_details(self.session, row.tensor, self.mover.device_of(row.tensor.name), values)
            if live is not None:
                content = Group(diff_tensor_details(live.tensor(row.tensor.name), live), Text(""), content)
            details.update(content)
            if cached is None and self.query_one("#details-pane").display:
                self._compute_stats(self.stats.start(row.tensor))
        elif row.module is not None and row.module.name == "":
            content = file_details(self.session)
            # The root's profile reads the whole model: shown once the statistics are at hand
            # (after an audit, or every top-level module's profile), never started unasked.
            content = Group(content, self._profile(row.module.name, start=False))
            if live is not None:
                content = Group(diff_file_details(live, self.diff.plan_lines), Text(""), content)
            details.update(content)
        else:
            content = module_details(self.session, row.module, self._profile(row.module.name))
            if live is not None:
                content = Group(diff_module_details(live.module(row.module.name), live), Text(""), content)
            details.update(content)

    def _profile(self, module: str, start: bool = True):
        """The norm profile of a module's children, from the statistics at hand; starts a worker
        for the missing ones (once per module) when the details pane is shown."""
        visible = self.query_one("#details-pane").display
        profile = self.norms.profile(module, start=start, visible=visible)
        if profile.job is not None:
            self._compute_norms(profile.job)
        return norm_profile_details(profile.rows, profile.status)

    @work(thread=True, exit_on_error=False, group="norms")
    def _compute_norms(self, job: NormsJob) -> None:
        def progress(p) -> None:
            self.post_message(NormsProgress(job, p.done, p.total))

        self.post_message(NormsReady(job, self.norms.compute(job, progress)))

    @on(NormsProgress)
    @_while_running
    def _norms_progress(self, event: NormsProgress) -> None:
        if self.norms.progress(event.job, event.done, event.total):
            self._refresh_details_if(module=event.job.module)

    @on(NormsReady)
    @_while_running
    def _norms_ready(self, event: NormsReady) -> None:
        if self.norms.finish(event.job, event.result):
            self._refresh_details_if(module=event.job.module)

    @work(thread=True, exit_on_error=False, group="stats")
    def _compute_stats(self, job: StatsJob) -> None:
        """Statistics and histogram of one tensor, streamed (cancelled by the next row)."""
        result = TensorStats.compute(job)
        if result is not None:
            self.post_message(StatsReady(job.record.qualified_name, result))

    @on(StatsReady)
    @_while_running
    def _stats_ready(self, event: StatsReady) -> None:
        stats = self.stats.store(event.name, event.result)
        if stats is not None:
            self.norms.add(event.name, stats)
        node = self.tree.cursor_node if self.query("#tree") else None
        row = node.data if node is not None else None
        if row is not None and row.tensor is not None and row.tensor.qualified_name == event.name:
            self._show_row(row)

    def _show_cursor_row(self) -> None:
        """Redraw the details of whatever the cursor is on (new figures arrived for it)."""
        node = self.tree.cursor_node if self.query("#tree") else None
        if node is not None and node.data is not None and not node.data.ghost:
            self._show_row(node.data)

    def _refresh_details_if(self, module: str | None = None, tensor: str | None = None) -> None:
        """Redraw the details pane when the cursor is still on that module or tensor."""
        node = self.tree.cursor_node if self.query("#tree") else None
        row = node.data if node is not None else None
        if row is None or row.ghost:
            return
        if module is not None and row.tensor is None and row.module is not None and row.module.name == module:
            self._show_row(row)
        elif tensor is not None and row.tensor is not None and row.tensor.qualified_name == tensor:
            self._show_row(row)

    # -- selection -----------------------------------------------------------------------------
    def selected_names(self) -> list[str]:
        node = self.tree.cursor_node if self.query("#tree") else None
        if node is None or node.data is None:
            return []
        return node.data.names

    def _after_change(self, message: str, severity: str = "information", timeout: float = 3) -> None:
        """Every change of the freeze state ends here (undo, redo and eval mode too): repaint,
        say what changed, then the caveat the new state calls for, said once per change of
        what it is about (after an undo it is said again when the state comes back)."""
        self.refresh_state()
        if message:
            self.notify(message, severity=severity, timeout=timeout)
        caveat = self.norm_caveat.check(self.session)
        if caveat:
            self.notify(caveat, severity="warning", timeout=6)

    def _guard(self) -> bool:
        return self.session is not None and bool(self.query("#tree"))

    # -- freezing actions ----------------------------------------------------------------------
    def action_toggle_freeze(self) -> None:
        if self._guard():
            result = self.session.toggle(self.selected_names())
            self._after_change(result.message, "warning" if not result.changed else "information")

    def action_freeze(self) -> None:
        if self._guard():
            result = self.session.freeze(self.selected_names())
            self._after_change(result.message, "warning" if not result.changed else "information")

    def action_unfreeze(self) -> None:
        if self._guard():
            result = self.session.unfreeze(self.selected_names())
            self._after_change(result.message, "warning" if not result.changed else "information")

    def action_freeze_all(self) -> None:
        if self._guard():
            self._all_shown(False)

    def action_unfreeze_all(self) -> None:
        if self._guard():
            self._all_shown(True)

    def _all_shown(self, value: bool) -> None:
        """F / U act on what is shown: with a filter, only the tensors it shows (hidden ones
        keep their state, and the message says so); without one, the whole model."""
        shown = self.tree.visible_tensors
        if shown is None:
            result = self.session.unfreeze_all() if value else self.session.freeze_all()
            self._after_change(result.message)
            return
        names = [n for n in self.session.records if n in shown]  # file order; no A-only names
        if not names:
            self.notify("the filter shows no tensor of this file; nothing changed", severity="warning", timeout=3)
            return
        result = self.session.unfreeze(names) if value else self.session.freeze(names)
        hidden = len(self.session.records) - len(names)
        self._after_change(f"{result.message} shown by the filter; {hidden:,} hidden tensor(s) unchanged")

    def action_invert(self) -> None:
        if self._guard():
            self._after_change(self.session.invert().message)

    def action_pattern(self) -> None:
        from .screens.pattern import PatternScreen

        if not self._guard():
            return

        def done(choice: PatternChoice | None) -> None:
            if choice is None:
                return
            try:
                result = self.session.freeze_pattern(choice.pattern, choice.kind, choice.trainable)
            except MscopeError as exc:
                self.notify(exc.line(), severity="error")
                return
            self._after_change(result.message)

        self.push_screen(PatternScreen(self.session), done)

    def action_freeze_class(self) -> None:
        from .screens.module_class import ClassScreen

        if not self._guard():
            return

        def done(choice: tuple[str, bool] | None) -> None:
            if choice is not None:
                self._after_change(self.session.freeze_class(choice[0], choice[1]).message)

        self.push_screen(ClassScreen(self.session), done)

    def action_last_n(self) -> None:
        from .screens.last_n import LastNScreen

        if not self._guard():
            return
        groups = self.session.block_groups()
        if not groups:
            from ..training.session import NO_BLOCKS_HINT

            self.notify(f"no repeated blocks found: {NO_BLOCKS_HINT}", severity="warning")
            return

        def done(choice) -> None:
            if choice is None:
                return
            try:
                self._after_change(self.session.train_last_n_blocks(choice[1], choice[0]).message)
            except MscopeError as exc:
                self.notify(exc.line(), severity="error")

        self.push_screen(LastNScreen(groups), done)

    def action_eval_norms(self) -> None:
        if not self._guard():
            return
        pending = [m for m in self.session.frozen_norm_layers() if m not in self.session.eval_modules]
        if not pending:
            self.notify("no frozen norm layers with running statistics need eval mode", timeout=3)
            return
        self.session.set_eval_mode(pending)
        self._after_change(f"eval mode recorded for {len(pending)} norm layer(s)")

    def action_undo(self) -> None:
        self._history(self.session.undo if self.session else None)

    def action_redo(self) -> None:
        self._history(self.session.redo if self.session else None)

    def _history(self, step) -> None:
        if step is None:
            return
        try:
            message = step()
        except MscopeError as exc:
            self.notify(exc.message, severity="warning", timeout=2)
            return
        self._after_change(message, timeout=2)

    # -- saving --------------------------------------------------------------------------------
    def default_plan_path(self) -> Path:
        from ..write.atomic import sibling_path

        src = self.session.ckpt.path
        if src.is_dir():
            return sibling_path(src.parent / src.name, "freeze-plan", ".json")
        return sibling_path(src, "freeze-plan", ".json")

    def action_save_plan(self, then_quit: bool = False) -> None:
        from .screens.path import PathScreen

        if not self._guard():
            return

        def done(target: str | None) -> None:
            if target is not None:
                self._save_plan_to(Path(target), then_quit, overwrite=False)

        note = "A new file next to the checkpoint by default; an existing file is never overwritten unasked."
        self.push_screen(PathScreen("Save freeze plan", str(self.default_plan_path()), note), done)

    def _save_plan_to(self, target: Path, then_quit: bool, overwrite: bool) -> None:
        from ..training.plan import save_plan

        if target.exists() and not overwrite:
            self._confirm_overwrite(target, lambda: self._save_plan_to(target, then_quit, overwrite=True))
            return
        try:
            path = save_plan(self.session, target, overwrite=overwrite)
        except MscopeError as exc:
            self.notify(exc.line(), severity="error", timeout=8)
            return
        self.session.mark_saved()
        self.refresh_state()
        self.notify(f"plan saved to {path}", timeout=5)
        if then_quit:
            self.exit(0)

    def action_export_lora_config(self) -> None:
        """The selection as a PEFT LoraConfig: PATH (JSON) and PATH.py (training.peft)."""
        from ..training.peft import lora_config
        from ..write.atomic import sibling_path
        from .screens.path import PathScreen

        if not self._guard():
            return
        try:
            export = lora_config(self.session)
        except MscopeError as exc:
            self.notify(exc.line(), severity="warning", timeout=8)
            return
        src = self.session.ckpt.path
        default = sibling_path(src.parent / src.name if src.is_dir() else src, "lora-config", ".json")

        def done(target: str | None) -> None:
            if target is not None:
                self._save_lora_config_to(export, Path(target), overwrite=False)

        note = f"LoRA on {len(export.targets)} module(s), {len(export.saved)} in modules_to_save; a .py snippet is written next to it."
        self.push_screen(PathScreen("Export LoraConfig", str(default), note), done)

    def _save_lora_config_to(self, export, target: Path, overwrite: bool) -> None:
        from ..training.peft import save_lora_config

        if target.exists() and not overwrite:
            self._confirm_overwrite(target, lambda: self._save_lora_config_to(export, target, overwrite=True))
            return
        try:
            written, script = save_lora_config(export, target, str(self.session.ckpt.path), overwrite=overwrite)
        except MscopeError as exc:
            self.notify(exc.line(), severity="error", timeout=8)
            return
        self.notify(f"LoraConfig saved to {written} and {script.name}", timeout=5)

    def _confirm_overwrite(self, target: Path, proceed) -> None:
        from .screens.confirm import ConfirmScreen

        def answered(answer: str | None) -> None:
            if answer == "overwrite":
                proceed()

        self.push_screen(
            ConfirmScreen(
                "File exists",
                f"{target} already exists. Overwrite it? The old file is kept as {target.name}.bak.",
                [("overwrite", "Overwrite (keep .bak)", "warning"), ("cancel", "Cancel", "default")],
            ),
            answered,
        )

    def action_save_checkpoint(self) -> None:
        from .screens.path import PathScreen

        if not self._guard():
            return
        ckpt = self.session.ckpt
        if ckpt.kind not in ("full_module", "torchscript"):
            self.notify(
                "this file stores no requires_grad (a state_dict): save a freeze plan (s) and apply it in training",
                severity="warning",
                timeout=6,
            )
            return
        from ..write.atomic import sibling_path

        def done(target: str | None) -> None:
            if target is None:
                return
            path = Path(target)
            if path.exists():
                self._confirm_overwrite(path, lambda: self._write_checkpoint(path, True))
            else:
                self._write_checkpoint(path, False)

        self.push_screen(PathScreen("Write checkpoint with the new requires_grad", str(sibling_path(ckpt.path, "frozen"))), done)

    @work(thread=True, exclusive=True, exit_on_error=False, group="save")
    def _write_checkpoint(self, target: Path, overwrite: bool = False) -> None:
        from ..write.requires_grad import save_with_requires_grad

        flags = {name: self.session.is_trainable(name) for name in self.session.canonical}
        try:
            path = save_with_requires_grad(self.session.ckpt, flags, target, overwrite=overwrite)
        except MscopeError as exc:
            self.post_message(Notice(exc.line(), "error", 8))
            return
        self.post_message(Notice(f"checkpoint written to {path}"))

    # -- navigation ----------------------------------------------------------------------------
    def action_filter(self) -> None:
        if not self._guard():
            return
        box = self.query_one("#filter", Input)
        box.display = True
        box.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        if self.session is None:
            return
        live = self.diff.live  # diff mode: what only A has is in the tree too
        job = self.filter.start(event.value, self.session.records, live.a_only_names if live is not None else None)
        self._compute_filter(job)

    @work(thread=True, exclusive=True, exit_on_error=False, group="filter")
    def _compute_filter(self, job: FilterJob) -> None:
        self.post_message(FilterReady(job, TreeFilter.compute(job)))

    @on(FilterReady)
    @_while_running
    def _filter_ready(self, event: FilterReady) -> None:
        if self.filter.is_current(event.job):
            result = event.result
            self._apply_filter(result.text, result.tensors, result.modules)

    @on(Input.Submitted, "#filter")
    def _filter_submitted(self) -> None:
        self.tree.focus()

    def on_key(self, event) -> None:
        if event.key == "escape" and self.focused is self.query_one("#filter", Input):
            box = self.query_one("#filter", Input)
            box.value = ""
            box.display = False
            self.tree.focus()
            event.stop()
        elif (
            event.key == "escape"
            and self.filter.text
            and len(self.screen_stack) == 1
            and self.query("#tree")
            and self.focused is self.tree
        ):
            self.clear_filter()
            event.stop()
        elif (
            event.key == "escape"
            and self.diff.running
            and len(self.screen_stack) == 1
            and self.query("#tree")
            and self.focused is self.tree
        ):
            self.action_stop_compare()
            event.stop()

    def clear_filter(self) -> None:
        """Esc in the tree after a filter: show everything again, staying on the same row."""
        self.filter.reveal_after = self.tree.cursor_node.data if self.tree.cursor_node is not None else None
        box = self.query_one("#filter", Input)
        box.display = False
        if box.value:
            box.value = ""  # Input.Changed: the filter worker applies "" and then reveals the row
        else:
            self._apply_filter("", None, None)

    def _apply_filter(self, text: str, tensors: set[str] | None, modules: set[str] | None) -> None:
        self.filter.text = text
        tree = self.tree
        tree.visible_tensors = tensors
        tree.visible_modules = modules
        tree.populate()
        row, self.filter.reveal_after = self.filter.reveal_after, None
        if row is not None and not text:
            if row.tensor is not None:
                tree.reveal(tensor_name=row.tensor.name)
            elif row.module is not None and row.module.name:
                tree.reveal(module_name=row.module.name)
        if tensors is not None and len(tensors) <= 300:
            tree.expand_visible(tree.root, EXPAND_ALL_LIMIT)
        self.refresh_state()

    def _drop_filter(self) -> None:
        """Before jumping to a row the filter may hide."""
        if self.filter.text:
            self._apply_filter("", None, None)
            self.query_one("#filter", Input).value = ""

    def action_expand_all(self) -> None:
        if not self._guard():
            return
        node = self.tree.cursor_node or self.tree.root
        left = self.tree.expand_visible(node, EXPAND_ALL_LIMIT)
        if left <= 0:
            self.notify(f"expanded the first {EXPAND_ALL_LIMIT:,} rows; use / to filter large models", timeout=4)

    def action_collapse_all(self) -> None:
        if self._guard():
            self.tree.root.collapse_all()
            self.tree.root.expand()
            self.tree.move_cursor(self.tree.root)

    def action_sort(self) -> None:
        if not self._guard():
            return
        tree = self.tree
        tree.sort_by_size = not tree.sort_by_size
        tree.populate()
        self.notify("children sorted by size" if tree.sort_by_size else "children in file order", timeout=2)

    def action_largest(self) -> None:
        from .screens.largest import LargestScreen

        if not self._guard():
            return

        def done(name: str | None) -> None:
            if name is None:
                return
            self._drop_filter()
            self.tree.reveal(tensor_name=name)

        self.push_screen(LargestScreen(self.session), done)

    def action_toggle_details(self) -> None:
        self.want_details = not self.query_one("#details-pane").display
        self._fit_panes(opened=DETAILS if self.want_details else None)

    def action_help(self) -> None:
        from .screens.help import HelpScreen

        self.push_screen(HelpScreen(self.KEY_HELP))

    async def action_quit(self) -> None:
        """ctrl+q and the command palette's "Quit": the same question as q (unsaved work)."""
        self.action_quit_app()

    def action_help_quit(self) -> None:
        """ctrl+c (Textual only hints at ctrl+q): a user pressing it wants out; ask like q."""
        self.action_quit_app()

    def notify(self, message: str, *, title: str = "", severity="information", timeout=None, markup: bool = False) -> None:
        """Every message goes through here: into the history (M), then a toast unless it
        repeats the last one with nothing changed, and not over a dialog (held until it
        closes; controllers/feedback.py). Plain text: messages carry names and paths from
        files, so they are escaped (safe_text) and never parsed as markup."""
        text = safe_text(f"{title}: {message}" if title else message, multiline=True)
        toast = self.feedback.say(text, severity, timeout, self._state(), dialog=len(self.screen_stack) > 1)
        if toast is not None:
            self._toast(toast)

    def _toast(self, toast) -> None:
        super().notify(toast.text, severity=toast.severity, timeout=toast.timeout, markup=False)

    def on_notify(self, event: Notify) -> None:
        self.call_next(self._trim_toasts)  # once Textual's own handler has added the toast

    def _trim_toasts(self) -> None:
        """The oldest toasts go, so that an 80x24 screen holds two and never a pile over the
        rows a user is reading (M lists every message)."""
        limit = TOASTS_MAX_ROOMY if self.size.height >= TOASTS_ROOMY else TOASTS_MAX
        shown = list(self._notifications)  # Textual's collection of the live toasts
        if len(shown) > limit:
            for old in shown[: len(shown) - limit]:
                self._unnotify(old, refresh=False)
            self._refresh_notifications()

    def _state(self) -> tuple:
        """What the explorer's messages are about: a message said again while all of this is
        unchanged is counted in the history, not shown again."""
        session, mover = self.session, self.mover
        return (
            session.revision if session is not None else None,
            mover.placed_line() if mover is not None and mover.placed else None,
            self.filter.text,
            id(self.diff.live),
            self.want_details,
            self.want_gpus,
            tuple(pane.display for pane in self.query("#details-pane, #gpu-panel")),  # room
        )

    def _screen_changed(self, screen: Screen) -> None:
        """The explorer is back on top: the toasts held while a dialog was open are shown. (The
        toasts already up when it opened were hidden meanwhile, by app.tcss; those that have
        not timed out come back.)"""
        if len(self.screen_stack) == 1:
            for toast in self.feedback.release():
                self._toast(toast)

    def action_messages(self) -> None:
        from .screens.messages import MessagesScreen

        self.push_screen(MessagesScreen(self.feedback.history))

    def action_quit_app(self) -> None:
        from .screens.confirm import ConfirmScreen

        if self.session is None or not self.session.dirty:
            self.exit(0)
            return

        def done(answer: str | None) -> None:
            if answer == "quit":
                self.exit(0)
            elif answer == "save":
                self.action_save_plan(then_quit=True)

        self.push_screen(
            ConfirmScreen(
                "Unsaved changes",
                "Your freeze decisions are not saved yet.",
                [("save", "Save plan…", "primary"), ("quit", "Quit without saving", "error"), ("cancel", "Cancel", "default")],
            ),
            done,
        )

    # -- GPUs and the fine-tune estimate ---------------------------------------------------------
    def _set_gpu_panel(self, show: bool) -> None:
        """Show or hide the panel (its width is _fit_panes' choice) and start or stop sampling."""
        panel = self.query_one("#gpu-panel", GpuPanel)
        panel.display = show
        if show and self.monitor is None:
            from ..gpu.monitor import GpuMonitor

            try:
                self.monitor = GpuMonitor.from_env(interval=self.gpu_interval)
            except MscopeError as exc:
                self.notify(exc.line(), severity="error")
                return
            self.monitor.start(self.gpu_interval, self._sample_from_thread)
        elif not show and self.monitor is not None:
            self.monitor.close(timeout=0)  # never wait on a tick that is posting to the UI
            self.monitor = None
        if show:
            self.update_estimate()

    def _sample_from_thread(self, sample) -> None:
        """The monitor's thread, once per tick."""
        try:
            self.post_message(GpuSampled(sample))
        except RuntimeError:
            pass  # the app is shutting down (its event loop is closed)

    @on(GpuSampled)
    @_while_running
    def _gpu_sampled(self, event: GpuSampled) -> None:
        panel = self.query_one("#gpu-panel", GpuPanel)
        if self.monitor is not None:
            panel.histories = {g.nvml_index: self.monitor.memory_history(g.nvml_index) for g in event.sample.gpus}
        panel.sample = event.sample
        self.update_estimate(recompute=False)

    def update_estimate(self, recompute: bool = True) -> None:
        """Estimate lines under the GPU panel; a new GPU sample only redoes the cheap fit lines."""
        panel = self.query_one("#gpu-panel", GpuPanel)
        if not panel.display or self.session is None:
            return
        estimator = self.estimator
        if recompute or estimator.estimate is None:
            job = estimator.start(self.session)  # None: computed already (drawn in this frame)
            if job is not None:
                self._compute_estimate(job)
            if estimator.estimate is None:
                return
        key = estimator.fit_key(panel.sample)
        if not recompute and key == estimator.drawn:
            return
        if not panel.size.width:
            # Just shown and not laid out yet: draw once its width is known, not at a guess
            # (whether a guess or the real width won used to depend on timing).
            estimator.drawn = None
            self.call_after_refresh(self.update_estimate, False)
            return
        estimator.drawn = key
        width = max(20, panel.size.width - 4)
        panel.estimate_lines = [Text(line, style=style) for line, style in estimator.lines(panel.sample, width)]
        if self.mover is not None and self.mover.placed:
            panel.placement_line = "placed: " + self.mover.placed_line()
        panel.refresh_panel()

    @work(thread=True, exit_on_error=False, group="estimate")
    def _compute_estimate(self, job: EstimateJob) -> None:
        self.post_message(EstimateReady(job, Estimator.compute(job)))

    @on(EstimateReady)
    @_while_running
    def _estimate_ready(self, event: EstimateReady) -> None:
        if self.estimator.ready(event.job, event.estimate):
            self.update_estimate(recompute=False)

    def action_cycle_precision(self) -> None:
        precision = self.estimator.cycle_precision()
        self.update_estimate()
        self.notify(f"estimate for {precision}", timeout=2)

    def action_cycle_optimizer(self) -> None:
        optimizer = self.estimator.cycle_optimizer()
        self.update_estimate()
        self.notify(f"estimate for optimizer {optimizer}", timeout=2)

    def action_toggle_gpus(self) -> None:
        self.want_gpus = not self.query_one("#gpu-panel", GpuPanel).display
        self._fit_panes(opened=GPUS if self.want_gpus else None)

    # -- audit and copies ----------------------------------------------------------------------
    def action_audit(self) -> None:
        from .screens.progress import ProgressScreen

        if not self._guard():
            return
        cancel = threading.Event()
        screen = ProgressScreen("Auditing (statistics of every tensor)", cancel)
        self.push_screen(screen)
        self._audit(screen, cancel)

    @work(thread=True, exit_on_error=False, group="audit")
    def _audit(self, screen: ProgressScreen, cancel: threading.Event) -> None:
        from ..audit.runner import run_audit

        def progress(p) -> None:
            screen.post_message(screen.Progress(p.done, p.total))

        report = run_audit(self.session.ckpt, stats=True, progress=progress, cancel=cancel)
        self.post_message(Audited(screen, report))

    @on(Audited)
    @_while_running
    def _audited(self, event: Audited) -> None:
        from .screens.audit import AuditScreen

        if event.screen.is_attached:
            event.screen.dismiss(None)
        for name, stats in event.report.stats.items():
            self.stats.add(name, stats)
            self.norms.add(name, stats)
        self._show_cursor_row()  # the root's norm profile said "A (audit) computes it…"

        def jump(tensor: str | None) -> None:
            if tensor:
                section, _, name = tensor.rpartition("/")
                if not section:
                    self.tree.reveal(tensor_name=name)

        self.push_screen(AuditScreen(event.report), jump)

    def action_cpu_copy(self) -> None:
        if not self._guard():
            return
        locations = [loc for loc in self.session.ckpt.totals().bytes_by_location if loc != "cpu"]
        if not locations:
            self.notify("every tensor is already stored for the CPU; nothing to remap", timeout=4)
            return
        from ..write.remap import remap_locations

        ckpt = self.session.ckpt
        self._convert(lambda: remap_locations(ckpt, "cpu"))

    def action_cast_copy(self) -> None:
        from .screens.confirm import ConfirmScreen

        if not self._guard():
            return
        from ..write.cast import cast_copy, preview_cast

        node = self.tree.cursor_node
        names = None if node is None or node is self.tree.root else self.selected_names()
        answers = []
        try:
            for dtype, label in (("bfloat16", "bf16"), ("float16", "fp16"), ("float32", "fp32")):
                before, after, changed = preview_cast(self.session.ckpt, dtype, names)
                answers.append((dtype, f"{label}: {fmt_bytes(before)} → {fmt_bytes(after)}", "primary"))
        except MscopeError as exc:
            self.notify(exc.line(), severity="error", timeout=8)
            return
        what = "the whole model" if names is None else f"{len(names):,} selected tensor(s) (the rest as stored)"
        answers.append(("cancel", "Cancel", "default"))

        def chosen(answer: str | None) -> None:
            if answer in ("bfloat16", "float16", "float32"):
                ckpt = self.session.ckpt
                self._convert(lambda: cast_copy(ckpt, answer, names))

        self.push_screen(
            ConfirmScreen("Save a cast copy", f"Cast {what}; floating-point tensors only, integer buffers untouched.", answers),
            chosen,
        )

    @work(thread=True, exit_on_error=False, group="convert")
    def _convert(self, job) -> None:
        try:
            path = job()
        except MscopeError as exc:
            self.post_message(Notice(exc.line(), "error", 8))
            return
        self.post_message(Notice(f"saved {path}", timeout=6))

    # -- devices -------------------------------------------------------------------------------
    def action_move(self) -> None:
        if not self._guard():
            return
        names = self.selected_names()
        node = self.tree.cursor_node
        what = "the whole model" if node is self.tree.root else f"{len(names):,} tensor(s)"
        if "torch" not in sys.modules:  # the first import takes seconds: say so, keep ticking
            self.notify("loading torch…", timeout=4)
        self._list_devices(names, what)

    @work(thread=True, exclusive=True, exit_on_error=False, group="devices")
    def _list_devices(self, names: list[str], what: str) -> None:
        self.post_message(DevicesListed(DeviceMover.devices(), names, what))  # imports torch: off the UI thread

    @on(DevicesListed)
    @_while_running
    def _choose_device(self, event: DevicesListed) -> None:
        from .screens.device import DeviceScreen
        from .screens.progress import ProgressScreen

        def chosen(device: str | None) -> None:
            if device is not None:
                job = self.mover.start(event.names, device)
                screen = ProgressScreen(f"Moving {event.what} to {device}", job.cancel)
                self.push_screen(screen)
                self._move(job, screen)

        self.push_screen(DeviceScreen(event.devices, event.what), chosen)

    @work(thread=True, exclusive=True, exit_on_error=False, group="move")
    def _move(self, job: MoveJob, screen: ProgressScreen) -> None:
        def progress(done: int, total: int) -> None:
            screen.post_message(screen.Progress(done, total))

        message, severity = self.mover.move(job, progress)
        self.post_message(Moved(screen, message, severity))

    @on(Moved)
    @_while_running
    def _moved(self, event: Moved) -> None:
        if event.screen.is_attached:
            event.screen.dismiss(None)
        if self.mover.placed:
            self.tree.device_of = self.mover.placement.device_of
        self.notify(event.message, severity=event.severity, timeout=6)
        self.refresh_state()

    def action_export_device_map(self) -> None:
        from .screens.path import PathScreen

        if not self._guard():
            return
        if not self.mover.placed:
            self.notify("nothing placed yet: move the model or a module to a device first (m)", severity="warning")
            return
        from ..training.devicemap import save_device_map

        device_map = self.mover.device_map()

        def done(target: str | None) -> None:
            if target is None:
                return
            try:
                path = save_device_map(device_map, target)
            except MscopeError as exc:
                self.notify(exc.line(), severity="error", timeout=8)
                return
            self.notify(f"device map saved to {path}", timeout=5)

        self.push_screen(PathScreen("Save device_map (for from_pretrained)", str(self.mover.default_map_path())), done)

    # -- diff mode -----------------------------------------------------------------------------
    def action_compare(self) -> None:
        from .screens.compare import CompareScreen

        if not self._guard():
            return

        def done(answer: str | None) -> None:
            if answer is None:
                return
            if answer == CompareScreen.LEAVE:
                self._leave_diff()
                return
            path = as_location(answer)
            if isinstance(path, Path):  # a URL is checked by reading it, in the worker
                path = path.expanduser()
                if not path.exists():
                    self.notify(f"{path}: no such file or directory", severity="error", timeout=6)
                    return
            self._start_compare(path)

        default = self.diff.default_path(self.session.ckpt)
        self.push_screen(CompareScreen(self.session.ckpt.path.name, default, in_diff=self.diff.live is not None), done)

    def _start_compare(self, path: Path, prefetch=None) -> None:
        """Open A, show the tree coloured from metadata at once, then compare values in a worker."""
        job = self.diff.start(path, prefetch)
        self._set_progress(f"opening {path} …")
        self._compare(job)

    @work(thread=True, exit_on_error=False, group="diff")
    def _compare(self, job: DiffJob) -> None:
        try:
            stream, live = self.diff.open(job, self.session.ckpt)
        except MscopeError as exc:
            self.post_message(DiffFailed(job, exc.line()))
            return
        self.post_message(DiffOpened(job, live))

        def progress(p) -> None:  # at most every 0.1 s, also inside one big tensor
            self.post_message(DiffProgress(job, p.done))

        for batch in self.diff.batches(job, stream, progress):
            self.post_message(DiffResults(job, batch))

    @on(DiffFailed)
    @_while_running
    def _compare_failed(self, event: DiffFailed) -> None:
        if not self.diff.is_current(event.job):
            return
        self._set_progress(None)
        if event.job.prefetch is not None and self.diff.live is None:
            self.error_line = event.line  # `mscope diff A B`: a bad A is a bad command, like the CLI
            self.exit(return_code=2)
            return
        self.notify(event.line, severity="error", timeout=8)

    @on(DiffOpened)
    @_while_running
    def _compare_ready(self, event: DiffOpened) -> None:
        if not self.diff.ready(event.job, event.live):
            return
        cursor = self.tree.cursor_node.data if self.tree.cursor_node is not None else None
        self.tree.diff = event.live
        self.tree.populate()
        if cursor is not None and not cursor.ghost and cursor.tensor is not None:
            self.tree.reveal(tensor_name=cursor.tensor.name)
        elif cursor is not None and not cursor.ghost and cursor.module is not None and cursor.module.name:
            self.tree.reveal(module_name=cursor.module.name)
        self._set_progress(self.diff.progress_line())
        self._set_footer_mode()
        self._fit_panes()  # the change column needs room: a pane may give way
        self.refresh_state()

    @on(DiffResults)
    @_while_running
    def _diff_results(self, event: DiffResults) -> None:
        if not self.diff.apply(event.job, event.batch):
            return
        live, report, plan_lines = self.diff.live, event.batch.report, event.batch.plan_lines
        if report is not None:
            if report.cancelled:
                self.notify(f"comparison stopped: {live.pending:,} tensor(s) not compared", severity="warning", timeout=5)
            elif plan_lines:
                ok = report.plan is not None and report.plan.ok
                self.notify(plan_lines[0], severity="information" if ok else "error", timeout=8)
                if report.plan is not None and report.plan.fingerprint:
                    # a plan made for another model is never silent (the root lists the names)
                    self.notify(report.plan.fingerprint[0], severity="warning", timeout=10)
        self._set_progress(self.diff.progress_line())
        self._render_header()
        self.tree.repaint()
        node = self.tree.cursor_node
        if node is not None:
            self._show_row(node.data)

    @on(DiffProgress)
    @_while_running
    def _diff_progress(self, event: DiffProgress) -> None:
        if self.diff.progress(event.job, event.done):
            self._set_progress(self.diff.progress_line())
            self._render_header()

    def _set_footer_mode(self) -> None:
        """Diff mode advertises its own keys, not the freeze keys (keys.py)."""
        self.query_one(ModeFooter).hidden = keys.NOT_IN_DIFF if self.diff.live is not None else keys.DIFF_ONLY

    def _set_progress(self, line: str | None) -> None:
        widget = self.query_one("#diff-progress", Static)
        widget.display = line is not None
        if line is not None:
            live = self.diff.live
            if live is not None and live.running and live.total_bytes:
                width = 12
                full = round(live.fraction * width)
                text = Text("█" * full + "░" * (width - full) + " ", style="green")
                text.append(line)
                widget.update(text)
            else:
                widget.update(Text(line))

    def action_stop_compare(self) -> None:
        if self.diff.stop():
            self._set_progress("stopping…")
        elif self.diff.live is None:
            self.notify("not in diff mode: v compares this file against another", timeout=3)

    def _leave_diff(self) -> None:
        self.diff.leave()
        self._set_progress(None)
        self.tree.diff = None
        self.tree.populate()
        self._set_footer_mode()
        self._fit_panes()  # a pane that gave way to the change column may come back
        self.refresh_state()

    def _jump_change(self, step: int) -> None:
        if not self._guard():
            return
        if self.diff.live is None:
            self.notify("not in diff mode: v compares this file against another", timeout=3)
            return
        node = self.tree.cursor_node
        row = node.data if node is not None else None
        here = (row.tensor.name, row.ghost) if row is not None and row.tensor is not None else None
        name = self.diff.next_change(self.session.ckpt, here, step)
        if name is None:
            self.notify("no changes" + (" found yet" if self.diff.running else ""), timeout=3)
            return
        self._drop_filter()
        self.tree.reveal(tensor_name=name)

    def action_next_change(self) -> None:
        self._jump_change(+1)

    def action_previous_change(self) -> None:
        self._jump_change(-1)

    def on_unmount(self) -> None:
        for controller in (self.diff, self.norms, self.stats, self.mover, self.estimator):
            if controller is not None:
                controller.close()
        if self.monitor is not None:
            self.monitor.close(timeout=0)
            self.monitor = None

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """Textual's commands, then every action of BINDINGS once; Textual's "Quit" gives way to
        ours (it asks about unsaved changes)."""
        ours = keys.palette(self.BINDINGS)
        titles = {title for title, _, _ in ours}
        yield from (command for command in super().get_system_commands(screen) if command.title not in titles)
        for title, help_text, action in ours:
            yield SystemCommand(title, help_text, getattr(self, f"action_{action}"))

def run_app(
    path: str | os.PathLike, gpu_interval: float = 1.0, prefetch=None, gc_paused: bool = False, **diff
) -> tuple[int, str | None]:
    """Run the explorer; returns (exit code, one-line error or None). gc_paused: the caller
    disabled gc at start-up; the app freezes what it built and turns gc on after the first paint.

    diff: `compare` (A, the baseline; the explorer opens in diff mode), `atol`, `rtol`, `plan`,
    `compare_prefetch`. The exit code is then the diff's (1 when a frozen parameter of the plan
    moved, or the comparison was stopped), as for `mscope diff` without the explorer."""
    app = MscopeApp(path, gpu_interval=gpu_interval, prefetch=prefetch, **diff)
    app.resume_gc_after_paint = gc_paused
    try:
        app.run()
    finally:
        if gc_paused and not gc.isenabled():
            gc.enable()
    if app.error_line:
        return 2, app.error_line
    return app.return_code or app.diff.exit_code, None
