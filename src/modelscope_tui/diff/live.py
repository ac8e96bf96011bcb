"""A diff that fills in, for a view (the explorer's diff mode): `LiveDiff` starts from a
DiffStream's metadata and takes its results with `apply()`, keeping the latest status of every
tensor and the aggregate of every module (`LiveModule`), and what exists only in A (ghosts) so a
tree of B can show removed tensors where they were.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..checkpoint import TensorRecord
from .report import (
    ADDED,
    CHANGED,
    CLOSE,
    DTYPE_CHANGED,
    IDENTICAL,
    PENDING,
    REMOVED,
    RENAMED,
    SHAPE_CHANGED,
    STATUSES,
    UNREADABLE,
    DiffReport,
    Status,
    TensorDiff,
)

if TYPE_CHECKING:
    from .stream import DiffStream

_MOVED = (CHANGED, DTYPE_CHANGED, SHAPE_CHANGED, UNREADABLE, ADDED, REMOVED)


@dataclass(slots=True)
class LiveModule:
    """A module's aggregate in a live diff: its tensors' statuses, pending ones, how much moved."""

    name: str
    counts: dict[Status, int] = field(default_factory=dict)  # status -> tensors
    pending: int = 0  # tensors whose values are still to be compared
    max_abs: float = 0.0  # running max over the compared tensors
    sumsq_diff: float = 0.0
    sumsq_a: float = 0.0

    @property
    def tensors(self) -> int:
        return sum(self.counts.values())

    @property
    def moved(self) -> int:
        """Tensors that differ in any way (values beyond tolerance, cast, shape, a missing side)."""
        return sum(self.counts.get(s, 0) for s in _MOVED) + self.counts.get(CLOSE, 0)

    @property
    def rel_l2(self) -> float | None:
        return math.sqrt(self.sumsq_diff / self.sumsq_a) if self.sumsq_a > 0 else None

    @property
    def status(self) -> Status:
        """One status for the whole module: added / removed / renamed when every tensor is;
        changed when any tensor differs beyond tolerance (or in shape, dtype, or presence);
        close when the only differences are within tolerance; pending while values are being
        compared and nothing differs yet; else identical."""
        c = self.counts
        total = self.tensors
        if total == 0:
            return IDENTICAL
        for s in (ADDED, REMOVED, RENAMED):
            if c.get(s, 0) == total:
                return s
        if any(c.get(s, 0) for s in _MOVED):
            return CHANGED
        if c.get(CLOSE, 0):
            return CLOSE
        if self.pending:
            return PENDING
        return IDENTICAL

    def _add(self, d: TensorDiff, sign: int) -> None:
        self.counts[d.status] = self.counts.get(d.status, 0) + sign
        if d.pending:
            self.pending += sign
        self.sumsq_diff += sign * d.sumsq_diff
        self.sumsq_a += sign * d.sumsq_a
        if sign > 0 and d.max_abs is not None and math.isfinite(d.max_abs):
            self.max_abs = max(self.max_abs, d.max_abs)


class LiveDiff:
    """A diff that fills in, for one thread (a UI's) to read: built from a DiffStream's metadata,
    updated with `apply()` as the stream's results arrive (from a worker, handed over in batches).

    Looks up tensors by their B name (`tensor`) or A name (`a_tensor`), aggregates per module
    (`module`: B's module names, plus A's for removed and renamed tensors), counts statuses for
    a summary, and lists what exists only in A under a given module (`ghost_modules`,
    `ghost_tensors`) so a tree of B can show removed tensors where they were.
    """

    def __init__(self, stream: DiffStream) -> None:
        self.a, self.b = stream.a, stream.b
        self.atol, self.rtol = stream.report.atol, stream.report.rtol
        self.notes = list(stream.report.notes)
        self.total_bytes = stream.total
        self.done_bytes = 0
        self.running = False
        self.cancelled = False
        self.report: DiffReport | None = None  # the final report, once the stream has finished
        self._a_records = stream.a_tensors
        self.by_a: dict[str, TensorDiff] = {}
        self.by_b: dict[str, TensorDiff] = {}
        self.counts: dict[Status, int] = dict.fromkeys((*STATUSES, PENDING), 0)
        self.pending = 0
        self._modules: dict[str, LiveModule] = {}
        self._chains: dict[str, tuple[str, ...]] = {}
        b_modules = {node.name for node in stream.b.tree.walk()}
        self._ghost_modules: dict[str, list[str]] = defaultdict(list)
        self._ghost_tensors: dict[str, list[str]] = defaultdict(list)
        seen: set[str] = set()
        for an in stream.removed:
            parent = an.rpartition(".")[0]
            self._ghost_tensors[parent].append(an)
            parts = parent.split(".") if parent else []
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name not in b_modules and name not in seen:
                    seen.add(name)
                    self._ghost_modules[".".join(parts[: i - 1])].append(name)
        self.grad_changed: dict[str, TensorDiff] = {}  # B name (A for removed) -> diff
        for d in stream.metadata:
            self._account(d, +1)

    # -- updates -------------------------------------------------------------------------------
    def apply(self, d: TensorDiff) -> None:
        """A result from the stream: replaces the diff(s) it supersedes (same A or B name)."""
        old = []
        for name, index in ((d.a_name, self.by_a), (d.b_name, self.by_b)):
            if name is not None:
                prev = index.get(name)
                if prev is not None and all(prev is not o for o in old):
                    old.append(prev)
        for prev in old:
            self._account(prev, -1)
            if prev.a_name is not None and self.by_a.get(prev.a_name) is prev:
                del self.by_a[prev.a_name]
            if prev.b_name is not None and self.by_b.get(prev.b_name) is prev:
                del self.by_b[prev.b_name]
        self._account(d, +1)

    def finish(self, report: DiffReport) -> None:
        self.report = report
        self.notes = list(report.notes)  # the run may add some (renames it did not claim)
        self.cancelled = report.cancelled
        self.running = False

    def _account(self, d: TensorDiff, sign: int) -> None:
        key = d.b_name if d.b_name is not None else d.a_name or d.name
        if sign > 0 and d.grad_changed:
            self.grad_changed[key] = d
        elif sign < 0 and self.grad_changed.get(key) is d:
            del self.grad_changed[key]
        if sign > 0:
            if d.a_name is not None:
                self.by_a[d.a_name] = d
            if d.b_name is not None:
                self.by_b[d.b_name] = d
        self.counts[PENDING if d.status == PENDING else d.status] += sign
        if d.pending:
            self.pending += sign
        for key in self._module_keys(d):
            m = self._modules.get(key)
            if m is None:
                m = self._modules[key] = LiveModule(key)
            m._add(d, sign)

    def _module_keys(self, d: TensorDiff) -> tuple[str, ...]:
        chain = self._chain(d.b_name) if d.b_name is not None else ()
        if d.a_name is not None and (d.b_name is None or d.status in (REMOVED, RENAMED)):
            other = self._chain(d.a_name)
            chain = tuple(dict.fromkeys(chain + other)) if chain else other
        return chain

    def _chain(self, name: str) -> tuple[str, ...]:
        """Every module above a tensor name, "" (the model) first; cached per parent module."""
        parent = name.rpartition(".")[0]
        chain = self._chains.get(parent)
        if chain is None:
            parts = parent.split(".") if parent else []
            chain = self._chains[parent] = tuple(".".join(parts[:i]) for i in range(len(parts) + 1))
        return chain

    # -- reading -------------------------------------------------------------------------------
    def tensor(self, b_name: str) -> TensorDiff | None:
        return self.by_b.get(b_name)

    def a_tensor(self, a_name: str) -> TensorDiff | None:
        return self.by_a.get(a_name)

    def a_record(self, a_name: str) -> TensorRecord | None:
        return self._a_records.get(a_name)

    def module(self, name: str) -> LiveModule:
        return self._modules.get(name) or LiveModule(name)

    def a_module(self, name: str):
        """A's ModuleNode of that name (class, attributes), or None."""
        node = self.a.tree
        for part in name.split(".") if name else []:
            node = node.children.get(part)
            if node is None:
                return None
        return node

    def ghost_modules(self, parent: str) -> list[str]:
        """Names of the modules that exist only in A, directly under `parent`."""
        return self._ghost_modules.get(parent, [])

    def ghost_tensors(self, parent: str) -> list[TensorRecord]:
        """A's records of the tensors only A has (removed or renamed away), directly in `parent`."""
        return [self._a_records[n] for n in self._ghost_tensors.get(parent, [])]

    def a_only_names(self) -> list[str]:
        return [n for names in self._ghost_tensors.values() for n in names]

    @property
    def fraction(self) -> float:
        return self.done_bytes / self.total_bytes if self.total_bytes else 1.0

    def summary(self) -> list[tuple[Status, int]]:
        """(status, tensors) for the statuses present, most important first."""
        order = (
            CHANGED,
            CLOSE,
            SHAPE_CHANGED,
            DTYPE_CHANGED,
            ADDED,
            REMOVED,
            RENAMED,
            UNREADABLE,
            IDENTICAL,
            PENDING,
        )
        return [(s, self.counts[s]) for s in order if self.counts[s]]

    def summary_line(self) -> str:
        text = ", ".join(f"{n:,} {s}" for s, n in self.summary()) or "no tensors"
        if self.cancelled:
            text += f"; cancelled ({self.pending:,} not compared)"
        return text

