"""A freeze plan checked against a diff: were the parameters it froze left bit-identical in B,
and did its trainable ones move at all?
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import PARAMETER, Checkpoint
from .report import ADDED, IDENTICAL, REMOVED, RENAMED, DiffReport, TensorDiff, describe


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
                    out.append(f"  {d.name}: {describe(d)}")
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



def check_plan(
    diff: DiffReport, plan: str | os.PathLike | dict[str, Any], model: Checkpoint | None = None
) -> PlanCheck:
    """Were the parameters the plan froze left bit-identical in B? (Also notes trainable ones that
    did not change at all.) With `model` (A, the checkpoint the plan should have been made for),
    its names/shapes/dtypes are checked against the plan's fingerprint: a mismatch, or a plan
    without one, becomes `fingerprint` warning lines. The result is stored on `diff.plan` too."""
    from ..training.fingerprint import check_fingerprint, checkpoint_shapes
    from ..training.plan import load_plan

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
