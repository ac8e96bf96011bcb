"""Which model a freeze plan was made for: a hash of the model tensors' names, shapes and dtypes.

Metadata only (no tensor bytes), so a plan made on `model.pt` matches `model.safetensors`
holding the same weights, and a live `nn.Module` is checked without calling `state_dict()`.
Pure Python: `model_shapes` only walks the model it is given.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..checkpoint import Checkpoint
from ..enums import StrEnum

if TYPE_CHECKING:
    import torch


TensorShapes = dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype)


class FingerprintStatus(StrEnum):
    MATCH = "match"
    MISMATCH = "mismatch"
    ABSENT = "absent"  # a plan made by an older mscope, without a fingerprint: not checked


def checkpoint_shapes(ckpt: Checkpoint) -> TensorShapes:
    """The model tensors a state_dict holds (non-persistent buffers left out): name -> (shape, dtype)."""
    return {t.name: (tuple(t.shape), t.dtype) for t in ckpt.model_tensors if t.persistent}


def checkpoint_fingerprint(ckpt: Checkpoint) -> str:
    """`sha256:<hex>` of the model's tensor names, shapes and dtypes (sorted; no tensor bytes).

    Non-persistent buffers are left out (a state_dict does not hold them), so a full-module pickle,
    its state_dict and a safetensors copy of the same weights all give the same fingerprint.
    """
    return fingerprint((n, shape, dtype) for n, (shape, dtype) in checkpoint_shapes(ckpt).items())


@dataclass
class FingerprintCheck:
    """A model's tensors against the checkpoint a plan was made for.

    `status`: match, mismatch, or absent (an old plan without a fingerprint: not checked).
    `missing`: names the plan's checkpoint has and the model lacks; `extra`: the reverse;
    `changed`: (name, plan's "shape dtype", model's "shape dtype"). Plans that record only the
    hash (`detailed=False`) can list names from their parameter lists, but not shape changes.
    """

    status: FingerprintStatus
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    changed: list[tuple[str, str, str]] = field(default_factory=list)
    detailed: bool = True

    def __post_init__(self) -> None:
        self.status = FingerprintStatus(self.status)

    @property
    def match(self) -> bool | None:
        return None if self.status is FingerprintStatus.ABSENT else self.status is FingerprintStatus.MATCH

    def summary(self, label: str = "the plan") -> str:
        """One line: what did not match, counted, with the first of each kind."""
        if self.status is FingerprintStatus.ABSENT:
            return f"{label} has no fingerprint (made by an older mscope): the model's names and shapes are not checked"
        if self.status is FingerprintStatus.MATCH:
            return f"{label} matches this model"
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} plan name(s) missing in the model, e.g. {self.missing[0]!r}")
        if self.extra:
            parts.append(f"{len(self.extra)} model name(s) not in the plan, e.g. {self.extra[0]!r}")
        if self.changed:
            name, was, now = self.changed[0]
            parts.append(f"{len(self.changed)} shape/dtype change(s), e.g. {name!r} {was} -> {now}")
        if not parts:
            parts.append("names, shapes or dtypes differ (the plan records only a hash)")
        return f"{label} was made for a different model: {'; '.join(parts)}"

    def lines(self, label: str = "the plan", limit: int = 10) -> list[str]:
        """The summary, then one line per name that did not match (up to `limit` of each kind)."""
        out = [self.summary(label)]
        if self.status is not FingerprintStatus.MISMATCH:
            return out
        for title, items in (
            ("missing in the model", [repr(n) for n in self.missing]),
            ("not in the plan", [repr(n) for n in self.extra]),
            ("changed", [f"{n!r} {was} -> {now}" for n, was, now in self.changed]),
        ):
            for item in items[:limit]:
                out.append(f"  {title}: {item}")
            if len(items) > limit:
                out.append(f"  {title}: ... and {len(items) - limit} more")
        if not self.detailed:
            out.append("  (the plan records only a hash: shape changes cannot be listed)")
        return out


def check_fingerprint(data: dict[str, Any], shapes: TensorShapes, params: Iterable[str] = ()) -> FingerprintCheck:
    """Compare a loaded plan's checkpoint record with a model's tensors (`shapes`; `params`: its
    parameter names, used for plans that recorded only the hash)."""
    ckpt = data["checkpoint"]
    expected = ckpt.get("fingerprint")
    if expected is None:
        return FingerprintCheck(FingerprintStatus.ABSENT)
    recorded = ckpt.get("shapes")
    if isinstance(recorded, dict):
        plan_shapes = {n: (tuple(v[0]), v[1]) for n, v in recorded.items()}
        missing = sorted(n for n in plan_shapes if n not in shapes)
        extra = sorted(n for n in shapes if n not in plan_shapes)
        changed = [
            (n, _shape_text(*plan_shapes[n]), _shape_text(*shapes[n]))
            for n in sorted(plan_shapes)
            if n in shapes and plan_shapes[n] != shapes[n]
        ]
        if missing or extra or changed:
            return FingerprintCheck(FingerprintStatus.MISMATCH, missing, extra, changed)
        return FingerprintCheck(FingerprintStatus.MATCH)
    actual = fingerprint((n, shape, dtype) for n, (shape, dtype) in shapes.items())
    if actual == expected:
        return FingerprintCheck(FingerprintStatus.MATCH)
    planned = {*data["trainable"], *data["frozen"]}
    params = set(params)
    return FingerprintCheck(
        FingerprintStatus.MISMATCH, sorted(planned - params), sorted(params - planned), [], detailed=False
    )


def _shape_text(shape: tuple[int, ...], dtype: str) -> str:
    return f"[{', '.join(map(str, shape))}] {dtype}"


def fingerprint(items: Iterable[tuple[str, tuple[int, ...], str]]) -> str:
    """`sha256:<hex>` of (name, shape, dtype) lines, sorted. The snippet `apply-plan` prints
    recomputes it in plain Python (snippet.py): the two spellings must stay the same."""
    lines = sorted(
        f"{name}\t{','.join(map(str, shape))}\t{dtype}\n" for name, shape, dtype in items
    )
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8", "surrogatepass"))
    return f"sha256:{digest.hexdigest()}"


def model_fingerprint(model: torch.nn.Module) -> str:
    """The fingerprint of what `model.state_dict()` would hold, without calling it (state_dict
    hooks of wrapped models, FSDP for one, can gather tensors across ranks)."""
    return fingerprint((n, shape, dtype) for n, (shape, dtype) in model_shapes(model).items())


def model_shapes(model: torch.nn.Module) -> TensorShapes:
    """What `model.state_dict()` would hold, name -> (shape, dtype), without calling it."""
    items: TensorShapes = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        skip = getattr(module, "_non_persistent_buffers_set", ())
        tensors = [
            *module._parameters.items(),
            *((n, b) for n, b in module._buffers.items() if n not in skip),
        ]
        for name, t in tensors:
            if t is not None:
                items.setdefault(dot + name, (tuple(t.shape), str(t.dtype).removeprefix("torch.")))
    return items


