"""What a diff says: statuses, `TensorDiff` per tensor, `ModuleDiff` per module, `DiffReport`
with its summary and JSON (docs/audit-schema.md). Plain records: the stream fills them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint import TensorRecord
from ..enums import StrEnum
from ..jsonfile import compact_json, json_number, jsonable

if TYPE_CHECKING:
    from .plan import PlanCheck

SCHEMA = "mscope.diff"
SCHEMA_VERSION = 1


class Status(StrEnum):
    IDENTICAL = "identical"  # bit for bit
    CLOSE = "close"  # within atol + rtol * |b| everywhere
    CHANGED = "changed"
    ADDED = "added"
    REMOVED = "removed"
    RENAMED = "renamed"  # identical bytes under another name
    SHAPE_CHANGED = "shape-changed"
    DTYPE_CHANGED = "dtype-changed"
    UNREADABLE = "unreadable"
    PENDING = "pending"  # live diffs only (DiffStream / LiveDiff): values not compared yet


# Module constants, not Status.X in the loops: a module global is read 10x faster than an
# Enum class attribute.
IDENTICAL, CLOSE, CHANGED = Status.IDENTICAL, Status.CLOSE, Status.CHANGED
ADDED, REMOVED, RENAMED = Status.ADDED, Status.REMOVED, Status.RENAMED
SHAPE_CHANGED, DTYPE_CHANGED = Status.SHAPE_CHANGED, Status.DTYPE_CHANGED
UNREADABLE, PENDING = Status.UNREADABLE, Status.PENDING
# A finished report's statuses, in the order its counts list them (PENDING is never one).
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


@dataclass(slots=True)
class TensorDiff:
    name: str  # the name in B (in A for removed tensors)
    status: Status  # one of STATUSES (PENDING in live diffs)
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
    def status(self) -> Status:
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
        from .. import __version__

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


def describe(d: TensorDiff) -> str:
    """How a tensor moved, in one line (plan checks and the text report)."""
    if d.status in (ADDED, REMOVED):
        return f"{d.status}"
    if d.status == SHAPE_CHANGED:
        return f"shape {list(d.a_shape or ())} -> {list(d.b_shape or ())}"
    if d.status == UNREADABLE:
        return f"unreadable ({d.message})"
    bits = []
    if d.status == DTYPE_CHANGED:
        bits.append(f"dtype {d.a_dtype} -> {d.b_dtype}")
        if d.message:  # a quantized weight: which scheme, and whether its values were compared
            bits.append(d.message.partition("; ")[2] or d.message)
    if d.max_abs is not None:
        bits.append(f"max |Δ| {d.max_abs:.3g}")
    if d.rel_l2 is not None:
        bits.append(f"rel {d.rel_l2:.3g}")
    if d.cosine is not None:
        bits.append(f"cos {d.cosine:.6f}")
    if d.mismatched:
        bits.append(f"{d.mismatched:,} of {d.numel:,} outside tolerance")
    return ", ".join(bits) or d.status


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

