"""Diff mode: this file is B, the file compared against is A (the baseline). Opening A and
matching names gives a LiveDiff at once (metadata statuses); the values are compared on a worker
and reach the UI thread in batches, which `apply` folds into the LiveDiff."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import MscopeError
from ...readers.sources.location import as_location
from ...units import fmt_bytes
from .jobs import Job, Latest

if TYPE_CHECKING:
    from ...checkpoint import Checkpoint

BATCH_SECONDS = 0.1  # results reach the UI in batches at most this often


class DiffJob(Job):
    def __init__(self, path: Path, prefetch=None) -> None:
        super().__init__()
        self.path = path
        self.prefetch = prefetch  # a Future of A's open_checkpoint (`mscope diff A B`)


@dataclass
class Batch:
    """Results of the comparison so far; the last one carries the report and the plan check."""

    diffs: list
    done_bytes: int
    report: object = None
    plan_lines: list[str] | None = None


class _Named:
    """A stand-in module (name only) for a module A has whose node cannot be found."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tensors: list = []
        self.children: dict = {}


class DiffController:
    def __init__(
        self,
        compare: str | os.PathLike | None = None,
        atol: float = 1e-8,
        rtol: float = 1e-5,
        plan: str | os.PathLike | None = None,
        prefetch=None,
    ) -> None:
        self.compare_path = as_location(compare) if compare is not None else None
        self.prefetch = prefetch
        self.atol, self.rtol = atol, rtol
        self.plan_path = plan
        self.plan_lines: list[str] | None = None
        self.live = None  # LiveDiff while in diff mode; only the UI thread touches it
        self._jobs = Latest()

    # -- the job -------------------------------------------------------------------------------
    def start(self, path: str | os.PathLike, prefetch=None) -> DiffJob:
        """Compare against `path` (a replaced comparison stops); the app runs `open` and then
        `batches` on a worker."""
        self.compare_path = as_location(path)
        self.plan_lines = None
        return self._jobs.start(DiffJob(self.compare_path, prefetch))

    def open(self, job: DiffJob, b: Checkpoint):
        """Worker thread: open A, match names. Returns (stream, live); raises MscopeError."""
        from ...diff.live import LiveDiff
        from ...diff.stream import DiffStream
        from ...readers import open_checkpoint

        a = job.prefetch.result() if job.prefetch is not None else open_checkpoint(job.path, strict=False)
        stream = DiffStream(a, b, self.atol, self.rtol)
        live = LiveDiff(stream)  # built here; from now on only the UI thread touches it
        live.running = True
        return stream, live

    def batches(self, job: DiffJob, stream, progress=None) -> Iterator[Batch]:
        """Worker thread: compare the values pair by pair; a Batch at most every BATCH_SECONDS,
        the last one with the report (and the plan check when a plan was given)."""
        batch: list = []
        last = time.monotonic()
        for d in stream.run(progress=progress, cancel=job.cancel):
            batch.append(d)
            now = time.monotonic()
            if now - last >= BATCH_SECONDS:
                yield Batch(batch, stream.done_bytes)
                batch, last = [], now
        report = stream.finish()
        plan_lines = None
        if self.plan_path is not None and not report.cancelled:
            from ...diff.plan import check_plan

            try:
                plan_lines = check_plan(report, self.plan_path, stream.a).lines()
            except MscopeError as exc:
                plan_lines = [exc.line()]
        yield Batch(batch, stream.done_bytes, report, plan_lines)

    # -- results, on the UI thread ---------------------------------------------------------------
    def is_current(self, job: DiffJob) -> bool:
        return self._jobs.is_current(job)

    def ready(self, job: DiffJob, live) -> bool:
        """A is open: diff mode starts with the metadata statuses. False for a replaced job."""
        if not self._jobs.is_current(job):
            return False
        self.live = live
        return True

    def apply(self, job: DiffJob, batch: Batch) -> bool:
        if not self._jobs.is_current(job) or self.live is None:
            return False
        live = self.live
        for d in batch.diffs:
            live.apply(d)
        live.done_bytes = batch.done_bytes
        if batch.report is not None:
            live.finish(batch.report)
            self.plan_lines = batch.plan_lines
        return True

    def progress(self, job: DiffJob, done: int) -> bool:
        if not self._jobs.is_current(job) or self.live is None or not self.live.running:
            return False
        self.live.done_bytes = done
        return True

    def stop(self) -> bool:
        """Stop comparing values (what is compared stays). False when nothing is running."""
        if self.live is None or not self.live.running:
            return False
        self._jobs.cancel()
        return True

    def leave(self) -> None:
        self._jobs.drop()
        self.live = None
        self.plan_lines = None
        self.compare_path = None

    def close(self) -> None:
        self._jobs.cancel()

    # -- reading -------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.live is not None and self.live.running

    @property
    def plan_ok(self) -> bool:
        first = self.plan_lines[0] if self.plan_lines else ""
        return "bit-identical in B" in first or "freezes no" in first

    @property
    def exit_code(self) -> int:
        """As `mscope diff` without the explorer: 1 when a frozen parameter of the plan moved or
        the comparison was stopped; 0 otherwise (or when nothing was compared)."""
        if self.live is None or self.live.report is None:
            return 0
        return self.live.report.exit_code

    def progress_line(self) -> str | None:
        live = self.live
        if live is None or not live.running:
            return None
        return (
            f"comparing {fmt_bytes(live.done_bytes)} / {fmt_bytes(live.total_bytes)} "
            f"({live.fraction:.0%}) · {live.pending:,} to go · x stops"
        )

    def default_path(self, b: Checkpoint) -> str:
        """What the compare prompt starts with: the file compared last, else B's folder."""
        if self.compare_path is not None:
            return str(self.compare_path)
        folder = b.path if b.path.is_dir() else b.path.parent
        text = str(folder)
        return "" if text == "." else text if text.endswith("/") else text + os.sep

    def change_order(self, b: Checkpoint) -> list[tuple[str, bool]]:
        """(name, ghost) of every tensor that differs, in tree order (tensors, then modules)."""
        from ...diff.report import IDENTICAL, PENDING, RENAMED

        live = self.live
        out: list[tuple[str, bool]] = []
        stack: list[tuple[object, bool]] = [(b.tree, False)]
        while stack:
            module, ghost = stack.pop()
            if not ghost:
                for t in module.tensors:
                    d = live.tensor(t.name)
                    if d is not None and d.status not in (IDENTICAL, PENDING, RENAMED):
                        out.append((t.name, False))
            for t in live.ghost_tensors(module.name):
                d = live.a_tensor(t.name)
                if d is not None and d.status != RENAMED:
                    out.append((t.name, True))
            children = [] if ghost else [(m, False) for m in module.children.values()]
            children += [(live.a_module(n) or _Named(n), True) for n in live.ghost_modules(module.name)]
            stack.extend(reversed(children))
        return out

    def next_change(self, b: Checkpoint, here: tuple[str, bool] | None, step: int) -> str | None:
        """The tensor `step` changes after (or before) `here` (name, ghost), wrapping around;
        the first (or last) when `here` is not a change. None when nothing differs."""
        order = self.change_order(b)
        if not order:
            return None
        if here in order:
            index = (order.index(here) + step) % len(order)
        else:
            index = 0 if step > 0 else len(order) - 1
        return order[index][0]
