"""Freeze plan files: a Session's freeze state as JSON, written and read back (validated).

A plan records which model parameters train and which are frozen, the rules that got there, and
which norm layers must stay in eval mode. It is made from checkpoint metadata (no torch) and applied
by a training script with `apply_freeze_plan(model, "plan.json")` (apply.py), or without mscope at
all through the plain-PyTorch snippet `mscope apply-plan plan.json` prints (snippet.py).

Plan file format (`format: "mscope.freeze-plan"`, `version: 1`), one JSON object::

    {
      "format": "mscope.freeze-plan",
      "version": 1,
      "created": "2025-01-31T12:00:00Z",          # ISO-8601, UTC
      "mscope_version": "0.1.0",
      "checkpoint": {
        "path": "model.pt",                       # as given when the plan was made
        "format": "torch-zip",
        "fingerprint": "sha256:<hex>",            # see fingerprint.checkpoint_fingerprint()
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
  (state loaded from another plan): session.Action. `selector` is `glob`, `regex`, `class`,
  `names`, `all`, `invert`, `last_n_blocks` or `plan` (session.Selector); `value` the pattern, class name, names, or `prefix:N`;
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
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import MscopeError
from ..jsonfile import json_bytes, read_json_file
from ..write.atomic import atomic_write
from .fingerprint import checkpoint_fingerprint, checkpoint_shapes
from .session import Action, Selector, Session

PLAN_FORMAT = "mscope.freeze-plan"
PLAN_VERSION = 1
PLAN_ACTIONS = frozenset(action.value for action in Action)


class PlanError(MscopeError):
    """A freeze plan that cannot be read, or a model that does not match it (strict mode)."""


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
        if rule.selector == Selector.CLASS:
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
