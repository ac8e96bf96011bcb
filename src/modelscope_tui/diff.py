"""Compare two checkpoints of any supported formats, tensor by tensor, streamed and chunked.

API (the CLI and the explorer's diff mode use these):

- `diff_checkpoints(a, b, atol=1e-8, rtol=1e-5, ...) -> DiffReport`: every model tensor matched
  by name (sections too with `sections="all"`); added, removed, renamed-looking (same shape and
  dtype, identical bytes under another name, those bytes unique among A's removed and B's added
  tensors), shape- or dtype-changed; requires_grad changes where both files store the flag; for common tensors
  identical (bit for bit) / close (within atol + rtol * |b| everywhere, like torch.allclose) /
  changed, with max |a - b|, relative L2 difference ||a - b|| / ||a|| and cosine similarity.
  `DiffReport.modules` sums that up per module; `DiffReport.by_name` serves tree colouring.
- `check_plan(diff, plan) -> PlanCheck`: were the parameters a freeze plan froze left alone?
- `DiffStream(a, b, ...)`: the same diff in steps. Construction reads metadata only (`metadata`:
  added / removed / shape- / dtype-changed at once, the rest `pending`); `run()` yields each value
  comparison and rename as it is found; `finish()` gives the DiffReport. `LiveDiff(stream)` keeps
  the latest status of every tensor and module for a view (the explorer's diff mode), fed with
  `apply()`. `diff_checkpoints` is a DiffStream run to the end.

Memory is bounded by the chunk size: both tensors are read in lockstep, chunk by chunk, through
TensorData's mmap views. No Textual; torch only for float8 tensors.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import PARAMETER, Checkpoint, TensorRecord, dims_key
from .errors import Cancelled, TensorDataError
from .jsonfile import compact_json, json_number, jsonable
from .units import fmt_bytes
from .values.chunks import LAYOUT, Source
from .values.data import unreadable_records
from .values.digest import digest
from .values.kernels import as_float, chunk_part, numpy_module
from .values.stats import DEFAULT_CHUNK_BYTES, Progress, ProgressFn

if TYPE_CHECKING:
    from .values.data import TensorData

SCHEMA = "mscope.diff"
SCHEMA_VERSION = 1

IDENTICAL, CLOSE, CHANGED = "identical", "close", "changed"
ADDED, REMOVED, RENAMED = "added", "removed", "renamed"
SHAPE_CHANGED, DTYPE_CHANGED, UNREADABLE = "shape-changed", "dtype-changed", "unreadable"
PENDING = "pending"  # live diffs only (DiffStream / LiveDiff): values not compared yet
STATUSES = (
    IDENTICAL,
    CLOSE,
    CHANGED,
    DTYPE_CHANGED,
    SHAPE_CHANGED,
    RENAMED,
    ADDED,
    REMOVED,
    UNREADABLE,
)
_PREFIXES = (
    "module.",
    "model.",
    "_orig_mod.",
    "model.module.",
    "transformer.",
    "base_model.model.",
)


@dataclass(slots=True)
class TensorDiff:
    name: str  # the name in B (in A for removed tensors)
    status: str  # one of STATUSES
    a_name: str | None = None
    b_name: str | None = None
    a_shape: tuple[int, ...] | None = None
    b_shape: tuple[int, ...] | None = None
    a_dtype: str | None = None
    b_dtype: str | None = None
    numel: int = 0
    max_abs: float | None = None
    rel_l2: float | None = None  # ||a - b|| / ||a|| over pairs of finite values
    cosine: float | None = None
    mismatched: int | None = None  # elements outside atol + rtol * |b| (NaN == NaN)
    sumsq_diff: float = 0.0
    sumsq_a: float = 0.0
    message: str | None = None
    pending: bool = False  # live diffs only: the values are still to be compared
    a_requires_grad: bool | None = None  # None: that file does not store the flag (a state_dict)
    b_requires_grad: bool | None = None

    @property
    def grad_changed(self) -> bool:
        """Both files store `requires_grad` for this tensor, and it differs (frozen <-> trainable)."""
        a, b = self.a_requires_grad, self.b_requires_grad
        return a is not None and b is not None and a != b

    @property
    def moved(self) -> bool:
        """Values differ in any way (a cast, a shape change, an update, a missing side)."""
        return self.status != IDENTICAL and self.status != RENAMED

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "a_name": self.a_name,
            "b_name": self.b_name,
            "a_shape": list(self.a_shape) if self.a_shape is not None else None,
            "b_shape": list(self.b_shape) if self.b_shape is not None else None,
            "a_dtype": self.a_dtype,
            "b_dtype": self.b_dtype,
            "numel": self.numel,
            "max_abs": json_number(self.max_abs),
            "rel_l2": json_number(self.rel_l2),
            "cosine": json_number(self.cosine),
            "mismatched": self.mismatched,
            "message": self.message,
            "a_requires_grad": self.a_requires_grad,
            "b_requires_grad": self.b_requires_grad,
        }


def stored_requires_grad(r: TensorRecord) -> bool | None:
    """The tensor's `requires_grad` as its file stores it, or None when the file says nothing.

    A file that keeps the Parameter (a full-module pickle, TorchScript, a saved Parameter) says it
    either way; a state_dict holds detached tensors whose False means nothing, but a True there
    can only come from the file."""
    if r.kind_from_file or r.requires_grad:
        return bool(r.requires_grad)
    return None


def grad_word(flag: bool | None) -> str:
    return "unknown" if flag is None else "trainable" if flag else "frozen"


@dataclass(slots=True)
class ModuleDiff:
    name: str  # "" is the whole model
    tensors: int = 0
    identical: int = 0
    changed: int = 0  # close, changed, dtype- or shape-changed, unreadable
    added: int = 0
    removed: int = 0
    renamed: int = 0
    max_abs: float = 0.0
    sumsq_diff: float = 0.0
    sumsq_a: float = 0.0

    @property
    def rel_l2(self) -> float | None:
        return math.sqrt(self.sumsq_diff / self.sumsq_a) if self.sumsq_a > 0 else None

    @property
    def status(self) -> str:
        if self.changed or self.added or self.removed:
            return CHANGED
        return IDENTICAL

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "tensors": self.tensors,
            "identical": self.identical,
            "changed": self.changed,
            "added": self.added,
            "removed": self.removed,
            "renamed": self.renamed,
            "max_abs": json_number(self.max_abs),
            "rel_l2": json_number(self.rel_l2),
        }


@dataclass
class PlanCheck:
    plan: str | None
    frozen: int
    identical: list[str] = field(default_factory=list)
    moved: list[TensorDiff] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    trainable_unchanged: list[str] = field(default_factory=list)
    trainable: int = 0
    fingerprint: list[str] = field(default_factory=list)  # warnings: A is not the plan's model

    @property
    def ok(self) -> bool:
        return not self.moved and not self.missing

    def lines(self) -> list[str]:
        where = f" in {Path(self.plan).name}" if self.plan else ""
        out = []
        if self.frozen == 0:
            out.append(f"the plan{where} freezes no parameters")
        elif self.ok:
            out.append(
                f"these {self.frozen:,} parameters were frozen{where}; all are bit-identical in B"
            )
        else:
            if self.moved:
                out.append(
                    f"{len(self.moved):,} of {self.frozen:,} parameters frozen{where} moved in B:"
                )
                for d in self.moved[:20]:
                    out.append(f"  {d.name}: {_describe(d)}")
                if len(self.moved) > 20:
                    out.append(f"  ... and {len(self.moved) - 20:,} more")
            if self.missing:
                out.append(
                    f"{len(self.missing):,} frozen parameter(s) are not in both files, e.g. {self.missing[0]}"
                )
            if self.identical:
                out.append(f"{len(self.identical):,} frozen parameter(s) are bit-identical")
        if self.trainable_unchanged:
            out.append(
                f"note: {len(self.trainable_unchanged):,} of {self.trainable:,} trainable parameters did not "
                f"change at all (e.g. {self.trainable_unchanged[0]})"
            )
        out += [f"warning: {line.strip()}" for line in self.fingerprint]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan,
            "ok": self.ok,
            "frozen": self.frozen,
            "identical": len(self.identical),
            "moved": [d.to_dict() for d in self.moved],
            "missing": self.missing,
            "trainable": self.trainable,
            "trainable_unchanged": self.trainable_unchanged,
            "fingerprint": self.fingerprint,
            "lines": self.lines(),
        }


@dataclass
class DiffReport:
    a_path: Path
    b_path: Path
    a_format: str
    b_format: str
    atol: float
    rtol: float
    tensors: list[TensorDiff] = field(default_factory=list)
    modules: list[ModuleDiff] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cancelled: bool = False
    seconds: float = 0.0
    bytes_read: int = 0
    plan: PlanCheck | None = None

    @property
    def by_name(self) -> dict[str, TensorDiff]:
        """Every diff under its B name and its A name (tree colouring looks up either)."""
        out: dict[str, TensorDiff] = {}
        for d in self.tensors:
            for n in (d.a_name, d.b_name):
                if n is not None:
                    out.setdefault(n, d)
        return out

    @property
    def grad_changes(self) -> list[TensorDiff]:
        """Tensors whose stored requires_grad differs between A and B (both files store it)."""
        return [d for d in self.tensors if d.grad_changed]

    def counts(self) -> dict[str, int]:
        c = dict.fromkeys(STATUSES, 0)
        for d in self.tensors:
            c[d.status] += 1
        return c

    def module(self, name: str) -> ModuleDiff | None:
        for m in self.modules:
            if m.name == name:
                return m
        return None

    def summary_line(self) -> str:
        c = self.counts()
        common = (
            c[IDENTICAL]
            + c[CLOSE]
            + c[CHANGED]
            + c[DTYPE_CHANGED]
            + c[SHAPE_CHANGED]
            + c[UNREADABLE]
        )
        parts = [
            f"{common:,} common tensors: {c[IDENTICAL]:,} identical, {c[CLOSE]:,} close, {c[CHANGED]:,} changed"
        ]
        for key in (DTYPE_CHANGED, SHAPE_CHANGED, UNREADABLE, RENAMED, ADDED, REMOVED):
            if c[key]:
                parts.append(f"{c[key]:,} {key}")
        grads = self.grad_changes
        if grads:
            parts.append(f"{len(grads):,} requires_grad changed")
        if self.cancelled:
            parts.append("CANCELLED before the end")
        return "; ".join(parts)

    @property
    def exit_code(self) -> int:
        """0, or 1 when a freeze plan was checked and a frozen parameter moved or is missing."""
        if self.cancelled:
            return 1
        return 1 if self.plan is not None and not self.plan.ok else 0

    def to_dict(self) -> dict[str, Any]:
        from . import __version__

        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "mscope_version": __version__,
            "a": {"file": str(self.a_path), "format": self.a_format},
            "b": {"file": str(self.b_path), "format": self.b_format},
            "atol": self.atol,
            "rtol": self.rtol,
            "summary": self.summary_line(),
            "counts": self.counts(),
            "requires_grad_changed": [
                {"a_name": d.a_name, "b_name": d.b_name, "a": d.a_requires_grad, "b": d.b_requires_grad}
                for d in self.grad_changes
            ],
            "tensors": [d.to_dict() for d in self.tensors],
            "modules": [m.to_dict() for m in self.modules],
            "notes": self.notes,
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 3),
            "cancelled": self.cancelled,
        }

    def to_json(self) -> str:

        # The tensor and module lists are JSON-safe already (their to_dict passes floats through
        # json_number); walking their 100k+ values again with jsonable took most of a big diff's time.
        safe = ("tensors", "modules")
        out = {k: v if k in safe else jsonable(v) for k, v in self.to_dict().items()}
        return compact_json(out, allow_nan=False)


def _describe(d: TensorDiff) -> str:
    if d.status in (ADDED, REMOVED):
        return f"{d.status}"
    if d.status == SHAPE_CHANGED:
        return f"shape {list(d.a_shape or ())} -> {list(d.b_shape or ())}"
    if d.status == UNREADABLE:
        return f"unreadable ({d.message})"
    bits = []
    if d.status == DTYPE_CHANGED:
        bits.append(f"dtype {d.a_dtype} -> {d.b_dtype}")
    if d.max_abs is not None:
        bits.append(f"max |Δ| {d.max_abs:.3g}")
    if d.rel_l2 is not None:
        bits.append(f"rel {d.rel_l2:.3g}")
    if d.cosine is not None:
        bits.append(f"cos {d.cosine:.6f}")
    if d.mismatched:
        bits.append(f"{d.mismatched:,} of {d.numel:,} outside tolerance")
    return ", ".join(bits) or d.status


# ----------------------------------------------------------------------------------------------
# Matching names
# ----------------------------------------------------------------------------------------------
def _tensors(ckpt: Checkpoint, sections: str) -> dict[str, TensorRecord]:
    out: dict[str, TensorRecord] = {}
    for t in ckpt.tensors:
        if sections == "model" and t.section != "":
            continue
        out.setdefault(t.name if sections == "model" else t.qualified_name, t)
    return out


def _prefix_map(
    a: dict[str, TensorRecord], b: dict[str, TensorRecord]
) -> tuple[dict[str, str], str | None]:
    """A name -> B name. Identity, unless stripping or adding a common prefix ("module." from
    DDP, "_orig_mod." from torch.compile...) matches clearly more names."""
    best = {n: n for n in a if n in b}
    note = None
    if len(best) >= 0.5 * min(len(a), len(b)):
        return best, None
    for p in _PREFIXES:
        strip_a = {n: n[len(p) :] for n in a if n.startswith(p) and n[len(p) :] in b}
        add_a = {n: p + n for n in a if p + n in b}
        for mapping, how in (
            (strip_a, f"A's names start with {p!r}"),
            (add_a, f"B's names start with {p!r}"),
        ):
            if len(mapping) > len(best):
                best, note = mapping, f"{how}; matched {len(mapping):,} tensors without it"
    return best, note


# ----------------------------------------------------------------------------------------------
# Comparing values
# ----------------------------------------------------------------------------------------------
def _to_f64(comps, kernel: str):
    np = numpy_module()
    return as_float(comps, kernel).astype(np.float64, copy=False)


class _Acc:
    __slots__ = ("max_abs", "dd", "aa", "bb", "ab", "mismatched", "bitwise")

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.dd = self.aa = self.bb = self.ab = 0.0
        self.mismatched = 0
        self.bitwise = True


def _compare_values(
    da: TensorData,
    db: TensorData,
    a: TensorRecord,
    b: TensorRecord,
    atol: float,
    rtol: float,
    chunk_bytes: int,
    cancel: threading.Event | None,
    on_bytes,
) -> _Acc:
    np = numpy_module()
    elems = max(1, chunk_bytes // max(a.itemsize, b.itemsize))
    sa = Source(da, a, elems * a.itemsize, ordered=True)
    sb = Source(db, b, elems * b.itemsize, ordered=True)
    ka, kb = sa.chunk_kernel, sb.chunk_kernel
    same_dtype = a.dtype == b.dtype
    acc = _Acc()
    for (na, ca), (nb, cb) in zip(sa.chunks(), sb.chunks()):
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        on_bytes(na + nb)
        if same_dtype and np.array_equal(ca.view(np.uint8), cb.view(np.uint8)):
            q = chunk_part(ca, ka).sumsq
            acc.aa += q
            acc.bb += q
            acc.ab += q
            continue
        acc.bitwise = False
        fa, fb = _to_f64(ca, ka), _to_f64(cb, kb)
        close = np.isclose(
            fa, fb, rtol=rtol, atol=atol, equal_nan=True
        )  # |a - b| <= atol + rtol*|b|
        acc.mismatched += int(close.size - np.count_nonzero(close))
        finite = np.isfinite(fa) & np.isfinite(fb)
        if not finite.all():
            fa, fb = fa[finite], fb[finite]
        d = fa - fb
        if d.size:
            acc.max_abs = max(acc.max_abs, float(np.max(np.abs(d))))
        acc.dd += float(np.dot(d, d))
        acc.aa += float(np.dot(fa, fa))
        acc.bb += float(np.dot(fb, fb))
        acc.ab += float(np.dot(fa, fb))
    return acc


def diff_checkpoints(
    a: Checkpoint,
    b: Checkpoint,
    atol: float = 1e-8,
    rtol: float = 1e-5,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    sections: str = "model",
    detect_renames: bool = True,
) -> DiffReport:
    """Compare the model tensors of A and B (every section's with sections="all").

    Tensors are matched by name; see the module docstring for the statuses. When `cancel` is
    set the report comes back with `cancelled=True` and the tensors compared so far (and every
    status known from metadata alone).
    """
    stream = DiffStream(a, b, atol, rtol, chunk_bytes, sections, detect_renames)
    for _ in stream.run(progress, cancel):
        pass
    return stream.finish()


class DiffStream:
    """A diff in two steps, for views that must show something at once (the explorer).

    Constructing it matches the names and reads no tensor bytes: `metadata` then holds one
    TensorDiff per pair, removed and added tensor, with every status that metadata decides
    (added, removed, shape-changed, dtype-changed, unreadable); pairs whose values are still to be
    compared have `pending=True` (status PENDING, or DTYPE_CHANGED for a cast). `run()` compares
    the values, pair by pair, then looks for renames, and yields each result as it is known: a new
    TensorDiff replacing the pending one with the same names, or a RENAMED one replacing a
    removed + added pair. `finish()` assembles the DiffReport `diff_checkpoints` returns.

    The objects in `metadata` are never changed after construction, so a UI thread may read them
    while `run()` goes on in a worker.
    """

    def __init__(
        self,
        a: Checkpoint,
        b: Checkpoint,
        atol: float = 1e-8,
        rtol: float = 1e-5,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        sections: str = "model",
        detect_renames: bool = True,
    ) -> None:
        self.a, self.b = a, b
        self.chunk_bytes = chunk_bytes
        self.detect_renames = detect_renames
        self.report = DiffReport(a.path, b.path, a.format, b.format, atol, rtol)
        self._ta, self._tb = ta, tb = _tensors(a, sections), _tensors(b, sections)
        # Files are opened strict=False: records whose bytes the reader found outside the file
        # (or past the view budget) are never read, as in audit; they are reported unreadable.
        self._bad = unreadable_records(a) | unreadable_records(b)
        mapping, note = _prefix_map(ta, tb)
        if note:
            self.report.notes.append(note)
        mapped_b = set(mapping.values())
        self.removed = [n for n in ta if n not in mapping]
        self.added = [n for n in tb if n not in mapped_b]
        self.pairs: list[TensorDiff] = []
        self.total = 0  # bytes the value comparison reads (both sides)
        for an in ta:
            if an in mapping:
                self.pairs.append(self._pair(an, mapping[an]))
        self._removed = [_one_side(REMOVED, an, ta[an]) for an in self.removed]
        self._added = [_one_side(ADDED, bn, tb[bn]) for bn in self.added]
        self.results: dict[tuple[str | None, str | None], TensorDiff] = {}
        self.renamed: list[TensorDiff] = []
        self.done_bytes = 0
        self.seconds = 0.0

    def _pair(self, an: str, bn: str) -> TensorDiff:
        ra, rb = self._ta[an], self._tb[bn]
        d = TensorDiff(
            bn, PENDING, an, bn, tuple(ra.shape), tuple(rb.shape), ra.dtype, rb.dtype, rb.numel,
            a_requires_grad=stored_requires_grad(ra), b_requires_grad=stored_requires_grad(rb),
        )  # fmt: skip
        if ra.shape != rb.shape:
            d.status = SHAPE_CHANGED
            return d
        comparable = (
            ra.dtype in LAYOUT
            and rb.dtype in LAYOUT
            and LAYOUT[ra.dtype].per == LAYOUT[rb.dtype].per
            and ra.storage is not None
            and rb.storage is not None
        )
        if comparable and (id(ra) in self._bad or id(rb) in self._bad):
            d.status = UNREADABLE
            side = "A" if id(ra) in self._bad else "B"
            d.message = f"skipped: its bytes in {side} lie outside the file or past its view budget (see mscope audit)"
            return d
        if not comparable:
            d.status = DTYPE_CHANGED if ra.dtype != rb.dtype else UNREADABLE
            if d.status == UNREADABLE:
                d.message = (
                    f"no values to compare (dtype {ra.dtype}, {ra.note or rb.note or 'no storage'})"
                )
            return d
        if ra.dtype != rb.dtype:
            d.status = DTYPE_CHANGED
        d.pending = True
        if ra.dtype in LAYOUT and rb.dtype in LAYOUT:
            self.total += ra.nbytes + rb.nbytes
        return d

    @property
    def metadata(self) -> list[TensorDiff]:
        """Pairs (in A's order), then removed, then added: what is known without reading bytes."""
        return self.pairs + self._removed + self._added

    def run(
        self, progress: ProgressFn | None = None, cancel: threading.Event | None = None
    ) -> Iterator[TensorDiff]:
        """Compare values (memory: one chunk per side), yielding each result as it is known.

        On cancel the stream stops and `report.cancelled` is set; the pairs not reached stay
        pending (and are left out of `finish()`'s report)."""
        from .values.data import TensorData

        t0 = time.perf_counter()
        state = {"last": 0.0}

        def on_bytes(n: int, name: str = "") -> None:
            self.done_bytes += n
            now = time.perf_counter()
            if progress is not None and now - state["last"] >= 0.1:
                state["last"] = now
                progress(Progress(self.done_bytes, self.total, now - t0, name))

        try:
            with TensorData() as da, TensorData() as db:
                for m in self.pairs:
                    if not m.pending or (m.a_name, m.b_name) in self.results:
                        continue
                    if cancel is not None and cancel.is_set():
                        raise Cancelled()
                    ra, rb = self._ta[m.a_name], self._tb[m.b_name]
                    d = _copy(m)
                    d.pending = False
                    try:
                        acc = _compare_values(
                            da, db, ra, rb, self.report.atol, self.report.rtol,
                            self.chunk_bytes, cancel, lambda n, _bn=m.b_name: on_bytes(n, _bn),
                        )  # fmt: skip
                    except TensorDataError as exc:
                        d.status = UNREADABLE
                        d.message = exc.message
                    else:
                        _fill(d, acc, ra.dtype != rb.dtype)
                    self.results[(m.a_name, m.b_name)] = d
                    yield d
                if self.detect_renames and self.removed and self.added and not self.renamed:
                    for d in self._renames(da, db, cancel):
                        self.renamed.append(d)
                        yield d
        except Cancelled:
            self.report.cancelled = True
        self.seconds += time.perf_counter() - t0
        if progress is not None:
            progress(Progress(self.done_bytes, self.total, self.seconds, ""))

    def finish(self) -> DiffReport:
        """The report: pairs (compared or decided by metadata), removed, added, renamed."""
        report = self.report
        renamed_a = {d.a_name for d in self.renamed}
        renamed_b = {d.b_name for d in self.renamed}
        pairs = [self.results.get((m.a_name, m.b_name), m) for m in self.pairs]
        report.tensors = (
            [d for d in pairs if not d.pending]
            + [d for d in self._removed if d.a_name not in renamed_a]
            + [d for d in self._added if d.b_name not in renamed_b]
            + self.renamed
        )
        report.modules = module_summary(report.tensors)
        report.seconds = self.seconds
        report.bytes_read = self.done_bytes
        return report

    def _renames(self, da, db, cancel) -> Iterator[TensorDiff]:
        """Removed x added with the same shape and dtype, compared by a BLAKE2b of their bytes."""
        ta, tb, chunk_bytes = self._ta, self._tb, self.chunk_bytes
        sig_a: dict[tuple, list[str]] = defaultdict(list)
        sig_b: dict[tuple, list[str]] = defaultdict(list)
        for n in self.removed:
            r = ta[n]
            if r.storage is not None and r.dtype in LAYOUT and id(r) not in self._bad:
                sig_a[(dims_key(r.shape), r.dtype)].append(n)
        for n in self.added:
            r = tb[n]
            if r.storage is not None and r.dtype in LAYOUT and id(r) not in self._bad:
                sig_b[(dims_key(r.shape), r.dtype)].append(n)
        ambiguous = 0
        for sig, names_a in sig_a.items():
            names_b = sig_b.get(sig)
            if not names_b:
                continue
            digests_b: dict[bytes, list[str]] = defaultdict(list)
            for n in names_b:
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                try:
                    digests_b[digest(db, tb[n], chunk_bytes)].append(n)
                except TensorDataError:
                    continue
            digests_a: dict[bytes, list[str]] = defaultdict(list)
            for n in names_a:
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                try:
                    digests_a[digest(da, ta[n], chunk_bytes)].append(n)
                except TensorDataError:
                    continue
            # A rename only when the bytes are unique on both sides: equal constant tensors (two
            # BatchNorm weights of all ones) say nothing about which name became which.
            for h, hits_a in digests_a.items():
                hits_b = digests_b.get(h)
                if not hits_b:
                    continue
                if len(hits_a) != 1 or len(hits_b) != 1:
                    ambiguous += len(hits_a) + len(hits_b)
                    continue
                n, bn = hits_a[0], hits_b[0]
                if n in tb or bn in ta:  # the name is on the other side too: not a rename
                    continue
                r = ta[n]
                yield TensorDiff(bn, RENAMED, n, bn, tuple(r.shape), tuple(r.shape), r.dtype, r.dtype, r.numel,
                                 message=f"renamed? {n} -> {bn} (identical bytes)",
                                 a_requires_grad=stored_requires_grad(r),
                                 b_requires_grad=stored_requires_grad(tb[bn]))  # fmt: skip
        if ambiguous:
            self.report.notes.append(
                f"{ambiguous:,} removed/added tensor(s) hold bytes that several of them share "
                "(e.g. constant weights): not reported as renames"
            )


def _one_side(status: str, name: str, r: TensorRecord) -> TensorDiff:
    flag = stored_requires_grad(r)
    if status == REMOVED:
        return TensorDiff(name, REMOVED, name, None, tuple(r.shape), None, r.dtype, None, r.numel,
                          a_requires_grad=flag)  # fmt: skip
    return TensorDiff(name, ADDED, None, name, None, tuple(r.shape), None, r.dtype, r.numel,
                      b_requires_grad=flag)  # fmt: skip


def _copy(d: TensorDiff) -> TensorDiff:
    return TensorDiff(
        d.name, d.status, d.a_name, d.b_name, d.a_shape, d.b_shape, d.a_dtype, d.b_dtype,
        d.numel, message=d.message, pending=d.pending,
        a_requires_grad=d.a_requires_grad, b_requires_grad=d.b_requires_grad,
    )  # fmt: skip


def _fill(d: TensorDiff, acc: _Acc, dtype_changed: bool) -> None:
    d.sumsq_diff = acc.dd
    d.sumsq_a = acc.aa
    d.max_abs = acc.max_abs
    d.mismatched = acc.mismatched
    d.rel_l2 = math.sqrt(acc.dd / acc.aa) if acc.aa > 0 else (0.0 if acc.dd == 0 else math.inf)
    d.cosine = acc.ab / math.sqrt(acc.aa * acc.bb) if acc.aa > 0 and acc.bb > 0 else None
    if d.cosine is not None:
        d.cosine = max(-1.0, min(1.0, d.cosine))
    if dtype_changed:
        d.status = DTYPE_CHANGED
    elif acc.bitwise:
        d.status = IDENTICAL
    else:
        d.status = CLOSE if acc.mismatched == 0 else CHANGED


def module_summary(diffs: Iterable[TensorDiff]) -> list[ModuleDiff]:
    """Per module (every prefix of the dotted names, "" for the whole model), sorted by name."""
    mods: dict[str, ModuleDiff] = {}
    for d in diffs:
        name = d.b_name if d.b_name is not None else d.a_name or d.name
        parts = name.split(".")[:-1]
        for i in range(len(parts) + 1):
            key = ".".join(parts[:i])
            m = mods.get(key)
            if m is None:
                m = mods[key] = ModuleDiff(key)
            m.tensors += 1
            if d.status == IDENTICAL:
                m.identical += 1
            elif d.status == ADDED:
                m.added += 1
            elif d.status == REMOVED:
                m.removed += 1
            elif d.status == RENAMED:
                m.renamed += 1
            else:
                m.changed += 1
            m.sumsq_diff += d.sumsq_diff
            m.sumsq_a += d.sumsq_a
            if d.max_abs is not None and math.isfinite(d.max_abs):
                m.max_abs = max(m.max_abs, d.max_abs)
    return [mods[k] for k in sorted(mods)]


# ----------------------------------------------------------------------------------------------
# Live diffs (the explorer's diff mode)
# ----------------------------------------------------------------------------------------------
_MOVED = (CHANGED, DTYPE_CHANGED, SHAPE_CHANGED, UNREADABLE, ADDED, REMOVED)


@dataclass(slots=True)
class LiveModule:
    """A module's aggregate in a live diff: its tensors' statuses, pending ones, how much moved."""

    name: str
    counts: dict[str, int] = field(default_factory=dict)  # status -> tensors
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
    def status(self) -> str:
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
        self._a_records = stream._ta
        self.by_a: dict[str, TensorDiff] = {}
        self.by_b: dict[str, TensorDiff] = {}
        self.counts: dict[str, int] = dict.fromkeys((*STATUSES, PENDING), 0)
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

    def summary(self) -> list[tuple[str, int]]:
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


# ----------------------------------------------------------------------------------------------
# Freeze plans
# ----------------------------------------------------------------------------------------------
def check_plan(
    diff: DiffReport, plan: str | os.PathLike | dict[str, Any], model: Checkpoint | None = None
) -> PlanCheck:
    """Were the parameters the plan froze left bit-identical in B? (Also notes trainable ones that
    did not change at all.) With `model` (A, the checkpoint the plan should have been made for),
    its names/shapes/dtypes are checked against the plan's fingerprint: a mismatch, or a plan
    without one, becomes `fingerprint` warning lines. The result is stored on `diff.plan` too."""
    from .freeze import check_fingerprint, checkpoint_shapes, load_plan

    data = load_plan(plan)
    where = str(plan) if isinstance(plan, (str, os.PathLike)) else None
    by_a: dict[str, TensorDiff] = {}
    by_b: dict[str, TensorDiff] = {}
    for d in diff.tensors:
        if d.a_name is not None:
            by_a.setdefault(d.a_name, d)
        if d.b_name is not None:
            by_b.setdefault(d.b_name, d)
    check = PlanCheck(where, len(data["frozen"]), trainable=len(data["trainable"]))
    if model is not None:
        shapes = checkpoint_shapes(model)
        params = [t.name for t in model.model_tensors if t.kind == PARAMETER]
        fp = check_fingerprint(data, shapes, params)
        if fp.status != "match":
            check.fingerprint = fp.lines(Path(where).name if where else "the plan")
    for name in data["frozen"]:
        d = by_a.get(name) or by_b.get(name)
        if d is None or d.status in (ADDED, REMOVED):
            check.missing.append(name)
        elif d.status in (IDENTICAL, RENAMED):
            check.identical.append(name)
        else:
            check.moved.append(d)
    for name in data["trainable"]:
        d = by_a.get(name) or by_b.get(name)
        if d is not None and d.status == IDENTICAL:
            check.trainable_unchanged.append(name)
    diff.plan = check
    return check


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def render_diff(report: DiffReport, console: Any, depth: int = 2, limit: int = 20) -> None:
    from rich.table import Table

    from .textout import safe_markup as escape  # text from files: controls, then markup

    console.print(
        f"[bold]A[/] {escape(report.a_path.name)} ({report.a_format}) → [bold]B[/] {escape(report.b_path.name)} "
        f"({report.b_format}) · atol {report.atol:g}, rtol {report.rtol:g}"
    )
    for n in report.notes:
        console.print(f"[dim]{escape(n)}[/]")
    style = {IDENTICAL: "green", CLOSE: "cyan", CHANGED: "yellow", ADDED: "blue", REMOVED: "red"}
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    table.add_column("module", no_wrap=True, overflow="ellipsis", max_width=40)
    for col in ("tensors", "identical", "changed", "added", "removed", "rel Δ", "max |Δ|"):
        table.add_column(col, justify="right", no_wrap=True)
    for m in report.modules:
        level = m.name.count(".") + 1 if m.name else 0
        if level > depth:
            continue
        indent = "  " * level
        table.add_row(
            f"[{style.get(m.status, '')}]{indent}{escape(m.name.rsplit('.', 1)[-1] or '(model)')}[/]",
            str(m.tensors), str(m.identical), str(m.changed), str(m.added), str(m.removed),
            "-" if m.rel_l2 is None else f"{m.rel_l2:.3g}", f"{m.max_abs:.3g}",
        )  # fmt: skip
    console.print(table)
    moved = sorted(
        (
            d
            for d in report.tensors
            if d.status in (CLOSE, CHANGED, DTYPE_CHANGED, SHAPE_CHANGED, UNREADABLE)
        ),
        key=lambda d: -(d.rel_l2 if d.rel_l2 is not None and math.isfinite(d.rel_l2) else math.inf),
    )
    for title, items in (
        ("changed", moved),
        ("renamed", [d for d in report.tensors if d.status == RENAMED]),
        ("added", [d for d in report.tensors if d.status == ADDED]),
        ("removed", [d for d in report.tensors if d.status == REMOVED]),
    ):
        if not items:
            continue
        console.print(f"[bold]{title}[/] ({len(items):,})")
        for d in items[:limit]:
            if d.status == RENAMED:
                text = f"{d.a_name} → {d.b_name}"
            elif d.status in (ADDED, REMOVED):
                shape = d.b_shape if d.status == ADDED else d.a_shape
                dtype = d.b_dtype if d.status == ADDED else d.a_dtype
                text = f"{d.name} {list(shape or ())} {dtype}"
            else:
                text = f"{d.name}: {_describe(d)}"
            console.print(f"  {escape(text)}", overflow="ellipsis", no_wrap=True, crop=True)
        if len(items) > limit:
            console.print(f"  [dim]... {len(items) - limit:,} more (--json lists all)[/]")
    grads = report.grad_changes
    if grads:
        console.print(f"[bold]requires_grad changed[/] ({len(grads):,})")
        for d in grads[:limit]:
            name = d.b_name if d.a_name == d.b_name or d.a_name is None else f"{d.a_name} → {d.b_name}"
            text = f"{name}: {grad_word(d.a_requires_grad)} → {grad_word(d.b_requires_grad)}"
            console.print(f"  {escape(text)}", overflow="ellipsis", no_wrap=True, crop=True)
        if len(grads) > limit:
            console.print(f"  [dim]... {len(grads) - limit:,} more (--json lists all)[/]")
    if report.plan is not None:
        color = "green" if report.plan.ok else "bold red"
        for line in report.plan.lines():
            console.print(f"[{color}]{escape(line)}[/]")
    console.print(
        f"[bold]{escape(report.summary_line())}[/] [dim]({fmt_bytes(report.bytes_read)} read in {report.seconds:.2f} s)[/]"
    )
