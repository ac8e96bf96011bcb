"""Freeze plans: a Session's freeze state as a JSON file, and applying one to a real model.

A plan records which model parameters train and which are frozen, the rules that got there, and
which norm layers must stay in eval mode. It is made from checkpoint metadata (no torch) and applied
by a training script with `apply_freeze_plan(model, "plan.json")`, or without mscope at all through
the plain-PyTorch snippet `mscope apply-plan plan.json` prints.

Plan file format (`format: "mscope.freeze-plan"`, `version: 1`), one JSON object::

    {
      "format": "mscope.freeze-plan",
      "version": 1,
      "created": "2025-01-31T12:00:00Z",          # ISO-8601, UTC
      "mscope_version": "0.1.0",
      "checkpoint": {
        "path": "model.pt",                       # as given when the plan was made
        "format": "torch-zip",
        "fingerprint": "sha256:<hex>",            # see checkpoint_fingerprint()
        "shapes": {"embed.weight": [[40, 16], "float32"]},  # what the fingerprint hashes
        "tensors": 29,                            # model tensors (parameters and buffers)
        "parameters": 123456                      # parameter elements, tied weights once
      },
      "rules": [                                  # what the user did, in order (history)
        {"action": "freeze", "selector": "glob", "value": "blocks.[0-1].*", "count": 8}
      ],
      "trainable": ["blocks.2.fc.weight", ...],   # sorted parameter names that train
      "frozen": ["blocks.0.fc.weight", ...],      # sorted parameter names with requires_grad=False
      "eval_modules": ["blocks.0.norm"],          # modules to keep in eval mode
      "tied": {"lm_head.weight": "embed.weight"}, # alias -> first name of the same Parameter
      "notes": ["lm_head.weight is tied to embed.weight (one Parameter): they freeze together"]
    }

- `trainable` and `frozen` are authoritative; `rules` are the history that produced them (used to
  print a compact snippet when replaying them gives exactly the same lists). Both lists name every
  parameter, tied aliases included, so `model.named_parameters(remove_duplicate=False)` of the same
  model is fully covered. Buffers and integer tensors are never listed (they cannot require grad).
- `rules[].action` is `freeze` or `unfreeze`; the Session also records `invert` and `restore`
  (state loaded from another plan). `selector` is `glob`, `regex`, `class`, `names`, `all`,
  `invert`, `last_n_blocks` or `plan`; `value` the pattern, class name, names, or `prefix:N`;
  `count` how many tensors the rule changed. `class` rules also carry `modules`: the modules of
  that class in the checkpoint.
- `tied` (optional) maps each tied alias to the first name of its Parameter; tied names always
  freeze together.
- The fingerprint hashes metadata only (model tensor names, shapes and dtypes, sorted), so a plan
  made on `model.pt` matches `model.safetensors` holding the same weights; `checkpoint.shapes`
  spells the same tensors out (name -> [[dims], dtype]) so a mismatch can list what differs. A
  mismatch is a loud warning (PlanMismatchWarning, `mscope: warning:` lines) or, in strict mode,
  a PlanError; names are applied where they match. Plans without a fingerprint say so once.
- New keys may be added within a version; readers ignore keys they do not know.

This module never imports torch at import time; `apply_freeze_plan` works on the model it is given.
"""

from __future__ import annotations

import hashlib
import keyword
import os
import re
import textwrap
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .checkpoint import Checkpoint, block_index
from .errors import MscopeError
from .jsonfile import json_bytes, read_json_file
from .patterns import compile_safe_regex, glob_condition
from .session import Change, Rule, Session
from .units import safe_text
from .writers import atomic_write

if TYPE_CHECKING:
    import torch

PLAN_FORMAT = "mscope.freeze-plan"
PLAN_VERSION = 1
PLAN_ACTIONS = frozenset({"freeze", "unfreeze", "invert", "restore"})


class PlanError(MscopeError):
    """A freeze plan that cannot be read, or a model that does not match it (strict mode)."""


class PlanMismatchWarning(UserWarning):
    """A freeze plan applied to a model other than the one it was made for (names, shapes or
    dtypes differ); the message lists what did not match. `strict=True` raises PlanError instead."""


class PlanUncheckedWarning(UserWarning):
    """A freeze plan without a fingerprint (made by an older mscope): the model is not checked."""


# -- fingerprint -------------------------------------------------------------------------------
TensorShapes = dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype)


def checkpoint_shapes(ckpt: Checkpoint) -> TensorShapes:
    """The model tensors a state_dict holds (non-persistent buffers left out): name -> (shape, dtype)."""
    return {t.name: (tuple(t.shape), t.dtype) for t in ckpt.model_tensors if t.persistent}


def checkpoint_fingerprint(ckpt: Checkpoint) -> str:
    """`sha256:<hex>` of the model's tensor names, shapes and dtypes (sorted; no tensor bytes).

    Non-persistent buffers are left out (a state_dict does not hold them), so a full-module pickle,
    its state_dict and a safetensors copy of the same weights all give the same fingerprint.
    """
    return _fingerprint((n, shape, dtype) for n, (shape, dtype) in checkpoint_shapes(ckpt).items())


@dataclass
class FingerprintCheck:
    """A model's tensors against the checkpoint a plan was made for.

    `status`: "match", "mismatch", or "absent" (an old plan without a fingerprint: not checked).
    `missing`: names the plan's checkpoint has and the model lacks; `extra`: the reverse;
    `changed`: (name, plan's "shape dtype", model's "shape dtype"). Plans that record only the
    hash (`detailed=False`) can list names from their parameter lists, but not shape changes.
    """

    status: str
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    changed: list[tuple[str, str, str]] = field(default_factory=list)
    detailed: bool = True

    @property
    def match(self) -> bool | None:
        return None if self.status == "absent" else self.status == "match"

    def summary(self, label: str = "the plan") -> str:
        """One line: what did not match, counted, with the first of each kind."""
        if self.status == "absent":
            return f"{label} has no fingerprint (made by an older mscope): the model's names and shapes are not checked"
        if self.status == "match":
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
        if self.status != "mismatch":
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
        return FingerprintCheck("absent")
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
            return FingerprintCheck("mismatch", missing, extra, changed)
        return FingerprintCheck("match")
    actual = _fingerprint((n, shape, dtype) for n, (shape, dtype) in shapes.items())
    if actual == expected:
        return FingerprintCheck("match")
    planned = {*data["trainable"], *data["frozen"]}
    params = set(params)
    return FingerprintCheck(
        "mismatch", sorted(planned - params), sorted(params - planned), [], detailed=False
    )


def _shape_text(shape: tuple[int, ...], dtype: str) -> str:
    return f"[{', '.join(map(str, shape))}] {dtype}"


def _valid_shapes(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str)
        and isinstance(v, list)
        and len(v) == 2
        and isinstance(v[0], list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v[0])
        and isinstance(v[1], str)
        for k, v in value.items()
    )


def _fingerprint(items: Iterable[tuple[str, tuple[int, ...], str]]) -> str:
    lines = sorted(
        f"{name}\t{','.join(map(str, shape))}\t{dtype}\n" for name, shape, dtype in items
    )
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8", "surrogatepass"))
    return f"sha256:{digest.hexdigest()}"


def _model_fingerprint(model: torch.nn.Module) -> str:
    """The fingerprint of what `model.state_dict()` would hold, without calling it (state_dict
    hooks of wrapped models, FSDP for one, can gather tensors across ranks)."""
    return _fingerprint((n, shape, dtype) for n, (shape, dtype) in model_shapes(model).items())


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


# -- plan from a session -----------------------------------------------------------------------
def plan_from_session(session: Session) -> dict[str, Any]:
    """The session's freeze state as a plan dict (see the module docstring for the format)."""
    ckpt = session.ckpt
    trainable, frozen, notes, tied = [], [], [], {}
    for name, canon in session.canonical.items():
        (trainable if session.trainable[canon] else frozen).append(name)
        if canon != name:
            tied[name] = canon
            notes.append(f"{name} is tied to {canon} (one Parameter): they freeze together")
    rules = []
    for rule in session.history():
        entry: dict[str, Any] = {
            "action": rule.action,
            "selector": rule.selector,
            "value": rule.value,
            "count": rule.count,
        }
        if rule.selector == "class":
            short = rule.value.rsplit(".", 1)[-1]
            entry["modules"] = sorted(node.name for node in session.modules_of_class(short))
        rules.append(entry)
    if session.eval_modules:
        notes.append(
            "eval_modules keep their running statistics: requires_grad=False does not stop "
            "BatchNorm from updating running_mean/var in train mode"
        )
    return {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "created": datetime.now(timezone.utc)
        .replace(microsecond=0)
        .isoformat()
        .replace("+00:00", "Z"),
        "mscope_version": __version__,
        "checkpoint": {
            "path": str(ckpt.path),
            "format": ckpt.format,
            "fingerprint": checkpoint_fingerprint(ckpt),
            "shapes": {n: [list(shape), dtype] for n, (shape, dtype) in sorted(checkpoint_shapes(ckpt).items())},
            "tensors": len(ckpt.model_tensors),
            "parameters": ckpt.totals().parameters,
        },
        "rules": rules,
        "trainable": sorted(trainable),
        "frozen": sorted(frozen),
        "eval_modules": sorted(session.eval_modules),
        "tied": tied,
        "notes": notes,
    }


def save_plan(session: Session, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the session's plan to `path` atomically; an existing file needs `overwrite=True`
    (it is kept as `path.bak`)."""
    data = json_bytes(plan_from_session(session), indent=2) + b"\n"
    return atomic_write(path, lambda fh: fh.write(data), overwrite=overwrite)


# -- loading and validation --------------------------------------------------------------------
def load_plan(plan: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """Read and validate a plan (a path or an already-parsed dict); returns a normalised copy.

    Raises PlanError (one line, naming the file) on anything wrong.
    """
    return read_plan(plan)[0]


def read_plan(plan: str | os.PathLike | dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    if isinstance(plan, dict):
        return _validate(plan, None), None
    if not isinstance(plan, (str, os.PathLike)):
        raise PlanError(f"a plan is a file path or a dict, not {type(plan).__name__}")
    path = Path(plan)
    data = read_json_file(path, PlanError, "a freeze plan")
    return _validate(data, str(path)), str(path)


def _validate(data: Any, where: str | None) -> dict[str, Any]:
    def fail(message: str) -> PlanError:
        return PlanError(message, where)

    if not isinstance(data, dict):
        raise fail(f"not a freeze plan (expected a JSON object, found {_json_type(data)})")
    fmt = data.get("format")
    if fmt != PLAN_FORMAT:
        raise fail(f"not a freeze plan (format is {fmt!r}, expected {PLAN_FORMAT!r})")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise fail(f"plan version must be a positive integer, found {version!r}")
    if version > PLAN_VERSION:
        raise PlanError(
            f"plan version {version} is newer than this mscope reads ({PLAN_VERSION})",
            where,
            "upgrade mscope",
        )
    out = dict(data)
    for key, required in (
        ("trainable", True),
        ("frozen", True),
        ("eval_modules", False),
        ("notes", False),
    ):
        if key not in data:
            if required:
                raise fail(f"plan has no {key!r} list")
            out[key] = []
            continue
        out[key] = _strings(data[key], key, fail)
    both = set(out["trainable"]) & set(out["frozen"])
    if both:
        raise fail(f"{len(both)} name(s) are both trainable and frozen, e.g. {min(both)!r}")
    rules = data.get("rules", [])
    if not isinstance(rules, list):
        raise fail(f"'rules' must be a list, found {_json_type(rules)}")
    out["rules"] = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict):
            raise fail(f"rules[{i}] must be an object, found {_json_type(rule)}")
        action, selector, value = rule.get("action"), rule.get("selector"), rule.get("value", "")
        if action not in PLAN_ACTIONS:
            raise fail(
                f"rules[{i}].action must be one of {', '.join(sorted(PLAN_ACTIONS))}, found {action!r}"
            )
        if not isinstance(selector, str) or not isinstance(value, str):
            raise fail(f"rules[{i}] needs string 'selector' and 'value'")
        count = rule.get("count", 0)
        if not isinstance(count, int) or isinstance(count, bool):
            raise fail(f"rules[{i}].count must be an integer, found {count!r}")
        entry = dict(rule, value=value, count=count)
        if "modules" in rule:
            entry["modules"] = _strings(rule["modules"], f"rules[{i}].modules", fail)
        out["rules"].append(entry)
    tied = data.get("tied", {})
    if not isinstance(tied, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tied.items()
    ):
        raise fail("'tied' must be an object mapping names to names")
    out["tied"] = dict(tied)
    ckpt = data.get("checkpoint", {})
    if not isinstance(ckpt, dict):
        raise fail(f"'checkpoint' must be an object, found {_json_type(ckpt)}")
    fingerprint = ckpt.get("fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise fail("'checkpoint.fingerprint' must be a string")
    if "shapes" in ckpt and not _valid_shapes(ckpt["shapes"]):
        raise fail("'checkpoint.shapes' must map names to [[dims...], dtype]")
    out["checkpoint"] = dict(ckpt)
    return out


def _strings(value: Any, key: str, fail) -> list[str]:
    if not isinstance(value, list):
        raise fail(f"{key!r} must be a list of strings, found {_json_type(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise fail(f"{key}[{i}] must be a string, found {_json_type(item)}")
    return list(dict.fromkeys(value))


def _json_type(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
    }.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


# -- restoring a plan into a Session -----------------------------------------------------------
@dataclass
class SessionApplyReport:
    """What `apply_plan_to_session` did."""

    changed: int  # parameters (tied ones once) whose trainable state changed
    unknown: list[str]  # plan names the checkpoint does not have (ignored)
    untrainable: list[str]  # plan names that are buffers or integer tensors here (ignored)
    not_in_plan: list[str]  # checkpoint parameters the plan does not mention (left as they were)
    conflicts: list[str]  # tied names the plan sets differently (frozen wins)
    eval_modules: list[str]  # modules now flagged for eval mode
    unknown_eval_modules: list[str]
    fingerprint_match: bool | None  # None: the plan has no fingerprint
    warnings: list[str] = field(default_factory=list)
    message: str = ""
    fingerprint: FingerprintCheck | None = None


def apply_plan_to_session(
    session: Session, plan: str | os.PathLike | dict[str, Any], strict: bool = False
) -> SessionApplyReport:
    """Set the session's trainable state and eval modules from a plan, as one undoable change.

    Names the checkpoint lacks are reported and skipped; a fingerprint mismatch is a warning
    that lists what did not match (`strict=True`: PlanError, before changing anything). A plan
    without a fingerprint is applied with one warning saying it was not checked. Checkpoint
    parameters the plan does not mention keep their current state.
    """
    data, source = read_plan(plan)
    label = Path(source).name if source else "plan"
    fp = check_fingerprint(data, checkpoint_shapes(session.ckpt), session.canonical)
    if strict and fp.status == "mismatch":
        raise PlanError(fp.summary("the plan"), source, "without --strict it applies what matches")
    frozen, trainable = set(data["frozen"]), set(data["trainable"])
    planned = [*data["trainable"], *data["frozen"]]
    unknown = sorted(n for n in planned if n not in session.records)
    untrainable = sorted(n for n in planned if n in session.records and not session.can_train(n))

    by_canon: dict[str, list[str]] = {}
    for name, canon in session.canonical.items():
        by_canon.setdefault(canon, []).append(name)
    names, before, after, conflicts, not_in_plan = [], [], [], [], []
    for canon, group in by_canon.items():
        f = [n for n in group if n in frozen]
        t = [n for n in group if n in trainable]
        if not f and not t:
            not_in_plan.extend(group)
            continue
        if f and t:
            conflicts.append(f"{', '.join(f)} frozen but tied {', '.join(t)} trainable: frozen")
        value = not f
        if session.trainable[canon] != value:
            names.append(canon)
            before.append(session.trainable[canon])
            after.append(value)

    eval_known = [m for m in data["eval_modules"] if session.node(m) is not None and m]
    eval_unknown = [m for m in data["eval_modules"] if m not in eval_known]
    eval_before, eval_after = frozenset(session.eval_modules), frozenset(eval_known)

    match = fp.match
    warnings = []
    if fp.status != "match":
        warnings += fp.lines(label)
        if match is False:
            warnings[0] += "; names applied where they match"
    if unknown:
        warnings.append(f"{len(unknown)} plan name(s) not in this checkpoint, e.g. {unknown[0]!r}")
    if untrainable:
        warnings.append(
            f"{len(untrainable)} plan name(s) cannot require grad here, e.g. {untrainable[0]!r}"
        )
    if conflicts:
        warnings.append(
            f"{len(conflicts)} tied parameter(s) listed both frozen and trainable: frozen"
        )
    if eval_unknown:
        warnings.append(
            f"{len(eval_unknown)} eval module(s) not in this checkpoint, e.g. {eval_unknown[0]!r}"
        )

    changed = len(names)
    if names or eval_before != eval_after:
        rule = Rule("restore", "plan", label, changed)
        change = Change(f"apply {label}", names, before, after, rule, eval_before, eval_after)
        _push_change(session, change)
        message = f"applied {label}: {changed} parameter(s) changed"
    else:
        message = (
            f"{label}: no parameter changed (the plan is for a different model)"
            if match is False
            else f"{label}: the session already matches it"
        )
    return SessionApplyReport(
        changed,
        unknown,
        untrainable,
        not_in_plan,
        conflicts,
        sorted(eval_after),
        eval_unknown,
        match,
        warnings,
        message,
        fp,
    )


def _push_change(session: Session, change: Change) -> None:
    session.push(change)


# -- applying a plan to a real model -----------------------------------------------------------
@dataclass
class FreezeReport:
    """What `apply_freeze_plan` did to a model. Names are the model's parameter names."""

    frozen: list[str]  # names whose Parameter now has requires_grad=False
    trainable: list[str]  # names whose Parameter now has requires_grad=True
    missing_in_model: list[str]  # plan names (parameters or eval modules) the model lacks
    not_in_plan: list[str]  # model parameter names the plan does not mention (left untouched)
    eval_modules: list[str]  # modules put in eval mode
    conflicts: list[str] = field(default_factory=list)  # tied names the plan sets both ways
    notes: list[str] = field(default_factory=list)
    fingerprint_match: bool | None = None  # None: the plan has no fingerprint

    @property
    def ok(self) -> bool:
        return not self.missing_in_model and not self.not_in_plan

    def summary(self) -> str:
        return (
            f"frozen {len(self.frozen)}, trainable {len(self.trainable)}, eval {len(self.eval_modules)}; "
            f"missing in model {len(self.missing_in_model)}, not in plan {len(self.not_in_plan)}"
        )


def apply_freeze_plan(
    model: torch.nn.Module,
    plan: str | os.PathLike | dict[str, Any],
    strict: bool = False,
    keep_eval: bool = True,
) -> FreezeReport:
    """Set `requires_grad` on the model's parameters from a plan and put its eval modules in eval.

    - Every name of `model.named_parameters(remove_duplicate=False)` is looked up in the plan.
      A Parameter shared by several names (tied weights) is frozen if the plan lists any of its
      names frozen; a tied pair listed both ways is reported in `conflicts`. Parameters the plan
      does not mention are left as they are (`not_in_plan`); a tied name counts as mentioned when
      another name of the same Parameter is in the plan.
    - `eval_modules` are put in eval mode. With `keep_eval=True` (the default) they stay in eval
      after a later `model.train()`: their `train` is replaced by one that always passes
      mode=False. This matters because requires_grad=False does not stop BatchNorm from updating
      running_mean/var in train mode, and training loops call `model.train()` every epoch. To
      release a module: `del module.train`. (A `torch.save(model)` pickle keeps the module but
      not the lock; state_dicts are unaffected.)
    - The model's tensors (names, shapes, dtypes of what `state_dict()` would hold) are checked
      against the fingerprint of the checkpoint the plan was made for. A mismatch warns with
      `PlanMismatchWarning` listing missing names, extra names and shape changes (and is in
      `notes`); a plan without a fingerprint warns once with `PlanUncheckedWarning`.
    - `strict=True` raises PlanError, before changing anything, if a plan name is missing in the
      model, a model parameter is not in the plan, or the fingerprint does not match.
    """
    import warnings as _warnings

    data, source = read_plan(plan)
    label = Path(source).name if source else "the plan"
    fp = check_fingerprint(
        data, model_shapes(model), (n for n, _ in model.named_parameters(remove_duplicate=False))
    )
    frozen_names, trainable_names = set(data["frozen"]), set(data["trainable"])
    planned = frozen_names | trainable_names

    groups: dict[int, tuple[Any, list[str]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), (param, []))[1].append(name)
    model_names = {n for _, names in groups.values() for n in names}

    eval_found: list[tuple[str, Any]] = []
    eval_missing: list[str] = []
    for module_name in data["eval_modules"]:
        try:
            eval_found.append((module_name, model.get_submodule(module_name)))
        except AttributeError:
            eval_missing.append(module_name)

    missing = sorted(planned - model_names) + eval_missing
    not_in_plan = [
        n for _, names in groups.values() if not planned.intersection(names) for n in names
    ]
    if strict and fp.status == "mismatch":
        raise PlanError(fp.summary("the plan"), source, "strict=False applies what matches")
    if strict and (missing or not_in_plan):
        parts = []
        if missing:
            parts.append(f"{len(missing)} plan name(s) missing in the model, e.g. {missing[0]!r}")
        if not_in_plan:
            parts.append(
                f"{len(not_in_plan)} model parameter(s) not in the plan, e.g. {not_in_plan[0]!r}"
            )
        raise PlanError(
            f"model does not match the plan: {'; '.join(parts)}",
            source,
            "strict=False applies what matches",
        )

    frozen, trainable, conflicts, notes = [], [], [], []
    for param, names in groups.values():
        f = [n for n in names if n in frozen_names]
        t = [n for n in names if n in trainable_names]
        if not f and not t:
            continue
        if f and t:
            conflicts.append(f"{', '.join(f)} frozen but tied {', '.join(t)} trainable: frozen")
        value = not f
        if value and not (param.is_floating_point() or param.is_complex()):
            notes.append(
                f"{names[0]} is {str(param.dtype).removeprefix('torch.')} and cannot require grad"
            )
            continue
        if param.requires_grad != value:
            param.requires_grad_(value)
        (trainable if value else frozen).extend(names)
        untied = [n for n in names if n not in planned]
        if untied:
            notes.append(
                f"{', '.join(untied)} not in the plan but shares its Parameter with {(f or t)[0]}"
            )

    for _, module in eval_found:
        module.eval()
        if keep_eval:
            module.train = types.MethodType(_train_stays_eval, module)

    match = fp.match
    if fp.status == "mismatch":
        notes += fp.lines(label)
        _warnings.warn("\n".join(fp.lines(label)), PlanMismatchWarning, stacklevel=2)
    elif fp.status == "absent":
        notes.append(fp.summary(label))
        _warnings.warn(fp.summary(label), PlanUncheckedWarning, stacklevel=2)
    if conflicts:
        notes.append(f"{len(conflicts)} tied parameter(s) listed both frozen and trainable: frozen")
    return FreezeReport(
        frozen=frozen,
        trainable=trainable,
        missing_in_model=missing,
        not_in_plan=not_in_plan,
        eval_modules=[name for name, _ in eval_found],
        conflicts=conflicts,
        notes=notes,
        fingerprint_match=match,
    )


def _train_stays_eval(self, mode: bool = True):
    """`train` of a plan eval module: always eval, so its running statistics never update."""
    return type(self).train(self, False)


# Named `train` so a pickled model (which stores the bound method as getattr(module, "train"))
# still loads without mscope; it then simply has the ordinary train() again.
_train_stays_eval.__name__ = "train"


# -- plain-PyTorch snippet ---------------------------------------------------------------------
def plan_snippet(
    plan: str | os.PathLike | dict[str, Any], var: str = "model", strict: bool = False
) -> str:
    """Python source (torch only, no mscope) that applies the plan to the model in `var`.

    Parameters whose name the plan freezes get requires_grad=False and every other parameter
    True; tied parameters are frozen if any of their names is. The plan's rules are used when
    replaying them (globs, regexes, classes, block ranges) gives exactly the plan's lists, else an
    explicit set of frozen names.

    Before changing anything the snippet checks the model's tensors (names, shapes, dtypes of
    what `state_dict()` would hold) against the plan's fingerprint: a mismatch warns, listing
    what differs, or with `strict=True` raises RuntimeError. A plan without a fingerprint gets
    a comment saying the model is not checked.
    """
    data, _ = read_plan(plan)
    if not all(part.isidentifier() and not keyword.iskeyword(part) for part in var.split(".")):
        raise PlanError(f"--var {var!r} is not a Python name (like model or self.model)")
    compact = _compact_predicate(data)
    uses_classes = compact is not None and compact[1]
    body = compact[0] if compact is not None else _explicit_predicate(data["frozen"])
    imports = sorted({m for m in ("fnmatch", "re") if compact is not None and f"{m}." in body})
    ckpt = data["checkpoint"]
    header = [
        f"# Freeze plan for {_comment(ckpt.get('path', '?'))} ({_comment(ckpt.get('fingerprint', 'no fingerprint'))}),",
        f"# {len(data['frozen'])} frozen / {len(data['trainable'])} trainable parameter names."
        f" Made by mscope {_comment(data.get('mscope_version', '?'))}; needs only torch.",
    ]
    if data["eval_modules"]:
        imports.append("types")
    lines = [*header, ""]
    check = _check_source(data, strict)
    if check:
        imports = sorted({*imports, "warnings", *(["hashlib"] if "hashlib." in check else [])})
    lines += [f"import {m}" for m in imports] + ([""] if imports else [])
    lines += ["import torch", "", ""]
    if check:
        lines += [check, "", ""]
    lines += ["def freeze_from_plan(model: torch.nn.Module) -> None:"]
    lines += (
        ["    check_model(model)", ""]
        if check
        else ["    # The plan has no fingerprint (an older mscope): the model is not checked.", ""]
    )
    if uses_classes:
        lines += [
            "    class_modules: dict[str, set[str]] = {}",
            "    for module_name, module in model.named_modules(remove_duplicate=False):",
            "        class_modules.setdefault(type(module).__name__, set()).add(module_name)",
            "",
        ]
    lines += [textwrap.indent(body, "    ").rstrip("\n"), ""]
    lines += [
        "    # A Parameter shared by several names (tied weights) is frozen if any of its names is.",
        "    params = list(model.named_parameters(remove_duplicate=False))",
        "    frozen_ids = {id(p) for name, p in params if is_frozen(name)}",
        "    for _, p in params:",
        "        p.requires_grad_(id(p) not in frozen_ids)",
    ]
    if data["eval_modules"]:
        lines += [
            "",
            "    # requires_grad=False does not stop BatchNorm from updating running_mean/var in train",
            "    # mode, and model.train() would switch these back: their train() now always means eval.",
            "    def train(self, mode=True):",
            "        return torch.nn.Module.train(self, False)",
            "",
            f"    for module_name in {_list_literal(data['eval_modules'], 4)}:",
            "        module = model.get_submodule(module_name)",
            "        module.train = types.MethodType(train, module)",
            "        module.eval()",
        ]
    lines += ["", "", f"freeze_from_plan({var})", ""]
    return "\n".join(lines)


_CHECK_BODY = '''
def model_shapes(model: torch.nn.Module) -> dict:
    """What model.state_dict() would hold, name -> (shape, dtype), without calling it."""
    found = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        skip = getattr(module, "_non_persistent_buffers_set", ())
        tensors = [*module._parameters.items(), *((n, b) for n, b in module._buffers.items() if n not in skip)]
        for name, t in tensors:
            if t is not None:
                found.setdefault(dot + name, (tuple(t.shape), str(t.dtype).removeprefix("torch.")))
    return found


def check_model(model: torch.nn.Module) -> None:
    """The model against the checkpoint the plan was made for: names, shapes, dtypes."""
    found = model_shapes(model)
'''

_CHECK_DETAILED = '''    missing = sorted(n for n in PLAN_SHAPES if n not in found)
    extra = sorted(n for n in found if n not in PLAN_SHAPES)
    changed = sorted(n for n in PLAN_SHAPES if n in found and PLAN_SHAPES[n] != found[n])
    if not (missing or extra or changed):
        return
    lines = ["this model does not match the freeze plan's checkpoint:"]
    lines += [f"  missing in the model: {n!r}" for n in missing[:10]]
    lines += [f"  not in the plan: {n!r}" for n in extra[:10]]
    lines += [f"  changed: {n!r} {PLAN_SHAPES[n]} -> {found[n]}" for n in changed[:10]]
    lines.append(f"  ({len(missing)} missing, {len(extra)} not in the plan, {len(changed)} changed)")
'''

_CHECK_HASH = '''    text = sorted(f"{n}\\t{','.join(map(str, shape))}\\t{dtype}\\n" for n, (shape, dtype) in found.items())
    digest = hashlib.sha256("".join(text).encode("utf-8", "surrogatepass")).hexdigest()
    if f"sha256:{digest}" == PLAN_FINGERPRINT:
        return
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    missing, extra = sorted(PLAN_PARAMETERS - params), sorted(params - PLAN_PARAMETERS)
    lines = ["this model does not match the freeze plan's checkpoint (names, shapes or dtypes):"]
    lines += [f"  missing in the model: {n!r}" for n in missing[:10]]
    lines += [f"  not in the plan: {n!r}" for n in extra[:10]]
'''


def _check_source(data: dict[str, Any], strict: bool) -> str:
    """`check_model(model)` for the snippet, or "" when the plan has no fingerprint."""
    ckpt = data["checkpoint"]
    fingerprint = ckpt.get("fingerprint")
    if fingerprint is None:
        return ""
    shapes = ckpt.get("shapes")
    if isinstance(shapes, dict):
        items = "".join(
            f"    {n!r}: ({tuple(v[0])!r}, {v[1]!r}),\n" for n, v in sorted(shapes.items())
        )
        const = "PLAN_SHAPES = {\n" + items + "}\n"
        body = _CHECK_DETAILED
    else:
        names = sorted({*data["trainable"], *data["frozen"]})
        const = f"PLAN_FINGERPRINT = {fingerprint!r}\nPLAN_PARAMETERS = {{{', '.join(map(repr, names))}}}\n"
        body = _CHECK_HASH
    action = (
        '    raise RuntimeError("\\n".join(lines))'
        if strict
        else '    warnings.warn("\\n".join(lines), stacklevel=3)'
    )
    mode = "strict: a mismatch raises" if strict else "a mismatch warns (apply-plan --strict: raises)"
    return f"# The model the plan was made for ({mode}).\n{const}" + _CHECK_BODY + body + action


def _comment(text: Any) -> str:
    """Text from a plan inside a `#` comment: one line (a newline would end the comment and
    turn the rest into code), every unsafe character visibly escaped."""
    return safe_text(" ".join(str(text).split()))


def _list_literal(items: list[str], indent: int) -> str:
    if len(items) <= 3:
        return "[" + ", ".join(repr(s) for s in items) + "]"
    pad = " " * (indent + 4)
    return "[\n" + "".join(f"{pad}{s!r},\n" for s in items) + " " * indent + "]"


def _explicit_predicate(frozen: list[str]) -> str:
    if frozen:
        names = "".join(f"    {n!r},\n" for n in frozen)
        literal = "{\n" + names + "}"
    else:
        literal = "set()"
    return f"frozen_names = {literal}\n\ndef is_frozen(name: str) -> bool:\n    return name in frozen_names\n"


def _compact_predicate(data: dict[str, Any]) -> tuple[str, bool] | None:
    """`is_frozen` written from the plan's rules, if replaying them gives exactly its lists."""
    names = [*data["trainable"], *data["frozen"]]
    lines = ["def is_frozen(name: str) -> bool:", "    frozen = False"]
    class_modules: dict[str, set[str]] = {}
    for rule in data["rules"]:
        action, selector, value = rule["action"], rule["selector"], rule["value"]
        if action == "invert" and selector == "invert":
            lines += ["    # invert", "    frozen = not frozen"]
            continue
        if action not in ("freeze", "unfreeze"):
            return None
        target = "True" if action == "freeze" else "False"
        lines.append(f"    # {action} {selector} {_comment(value)}".rstrip())
        if selector == "all":
            lines.append(f"    frozen = {target}")
            continue
        if selector == "last_n_blocks":
            block = _block_conditions(value, names)
            if block is None:
                return None
            before, last = block
            if before:
                lines += [f"    if name.startswith({before}):", "        frozen = True"]
            if last:
                lines += [f"    if name.startswith({last}):", "        frozen = False"]
            continue
        if selector == "glob":
            cond = glob_condition(value)
        elif selector == "regex":
            try:  # replayed below on every name: only a pattern that cannot backtrack for ages
                compile_safe_regex(value)
            except MscopeError:
                return None  # the snippet spells out the frozen names instead
            cond = f"re.search({value!r}, name)"
        elif selector == "class":
            if "modules" not in rule:
                return None
            short = value.rsplit(".", 1)[-1]
            class_modules.setdefault(short, set()).update(rule["modules"])
            cond = f'any(name.startswith(m + ".") for m in class_modules.get({short!r}, ()) if m)'
        elif selector == "names":
            if not value or "..." in value:
                return None
            cond = "name in {" + ", ".join(repr(n) for n in sorted(set(value.split(",")))) + "}"
        else:
            return None
        lines += [f"    if {cond}:", f"        frozen = {target}"]
    lines.append("    return frozen")
    source = "\n".join(lines) + "\n"
    namespace: dict[str, Any] = {
        "fnmatch": __import__("fnmatch"),
        "re": re,
        "class_modules": class_modules,
    }
    try:
        exec(compile(source, "<freeze plan rules>", "exec"), namespace)
        is_frozen = namespace["is_frozen"]
        # The snippet freezes a tied Parameter when any of its names is frozen: replay that too.
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(data["tied"].get(n, n), []).append(n)
        predicted = {n for group in groups.values() if any(map(is_frozen, group)) for n in group}
        if predicted != set(data["frozen"]):
            return None
    except Exception:
        return None
    return source, bool(class_modules)


def _block_conditions(
    value: str, names: list[str]
) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    prefix, _, count = value.rpartition(":")
    if not prefix or not count.isdigit():
        return None
    n = int(count)
    lead = prefix + "."
    indices = sorted(
        {
            index
            for name in names
            if name.startswith(lead)
            for index in [block_index(name[len(lead) :].split(".", 1)[0])]
            if index is not None
        }
    )
    if n > len(indices):
        return None
    keep = indices[len(indices) - n :] if n else []
    before = tuple(f"{lead}{i}." for i in indices if i not in keep)
    last = tuple(f"{lead}{i}." for i in keep)
    return before, last
