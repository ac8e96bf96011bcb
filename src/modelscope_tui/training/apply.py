"""Applying a freeze plan: to a Session (the explorer, `estimate --plan`), or to a live
`nn.Module` in a training script (`apply_freeze_plan`, exported by the package).

Both check the model against the plan's fingerprint first, freeze a tied Parameter when any of
its names is frozen (frozen wins a conflict), and report what did not match instead of failing,
unless strict. Torch is never imported here: `apply_freeze_plan` works on the model it is given.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .fingerprint import (
    FingerprintCheck,
    FingerprintStatus,
    check_fingerprint,
    checkpoint_shapes,
    model_shapes,
)
from .plan import PlanError, read_plan
from .session import Action, Change, Rule, Selector, Session

if TYPE_CHECKING:
    import torch


class PlanMismatchWarning(UserWarning):
    """A freeze plan applied to a model other than the one it was made for (names, shapes or
    dtypes differ); the message lists what did not match. `strict=True` raises PlanError instead."""


class PlanUncheckedWarning(UserWarning):
    """A freeze plan without a fingerprint (made by an older mscope): the model is not checked."""


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
    if strict and fp.status is FingerprintStatus.MISMATCH:
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
    if fp.status is not FingerprintStatus.MATCH:
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
        rule = Rule(Action.RESTORE, Selector.PLAN, label, changed)
        change = Change(f"apply {label}", names, before, after, rule, eval_before, eval_after)
        session.push(change)
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
    frozen_names, trainable_names = set(data["frozen"]), set(data["trainable"])
    planned = frozen_names | trainable_names
    peft = PeftNames.of(model, planned)
    named = [(peft.name(n), p) for n, p in model.named_parameters(remove_duplicate=False)]
    shapes = {peft.name(n): v for n, v in model_shapes(model).items() if not peft.skipped(n)}
    fp = check_fingerprint(data, shapes, (n for n, _ in named if n in shapes))

    groups: dict[int, tuple[Any, list[str]]] = {}
    for name, param in named:
        groups.setdefault(id(param), (param, []))[1].append(name)
    model_names = {n for _, names in groups.values() for n in names}

    eval_found: list[tuple[str, Any]] = []
    eval_missing: list[str] = []
    for module_name in data["eval_modules"]:
        try:
            eval_found.append((module_name, model.get_submodule(peft.prefix + module_name)))
        except AttributeError:
            eval_missing.append(module_name)

    missing = sorted(planned - model_names) + eval_missing
    not_in_plan = [
        n
        for _, names in groups.values()
        if not planned.intersection(names) and not any(map(peft.own_skipped, names))
        for n in names
    ]
    if strict and fp.status is FingerprintStatus.MISMATCH:
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
        # checkpoint.can_require_grad's rule, asked of torch itself: this is a live tensor.
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
    if fp.status is FingerprintStatus.MISMATCH:
        notes += fp.lines(label)
        _warnings.warn("\n".join(fp.lines(label)), PlanMismatchWarning, stacklevel=2)
    elif fp.status is FingerprintStatus.ABSENT:
        notes.append(fp.summary(label))
        _warnings.warn(fp.summary(label), PlanUncheckedWarning, stacklevel=2)
    if conflicts:
        notes.append(f"{len(conflicts)} tied parameter(s) listed both frozen and trainable: frozen")
    if peft.left:
        notes.append(
            f"{len(peft.left)} PEFT adapter parameter(s) are not in the plan (made for the base): "
            f"left as PEFT set them, e.g. {peft.left[0]}"
        )
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


@dataclass
class PeftNames:
    """A PeftModel's parameter names as a plan names them (readers.peft.peft_param_name):
    `base_model.model.` and PEFT's `base_layer` / `original_module` wrappers dropped, adapter
    names dropped from `lora_A.default`. A plan made for the base alone (no adapter name in it)
    leaves the adapter's own parameters to PEFT: they are neither checked nor reported missing."""

    prefix: str = ""
    adapters: frozenset[str] = frozenset()
    skip_own: bool = False
    left: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, model: Any, planned: set[str]) -> PeftNames:
        config = getattr(model, "peft_config", None)
        if not isinstance(config, dict):
            return cls()
        # PeftModel -> base_model (LoraModel) -> model (the base); a bare LoraModel: model.
        prefix = "base_model.model." if hasattr(model, "get_base_model") else "model."
        names = cls(prefix, frozenset(config))
        names.skip_own = not any(names.split(n)[1] for n, _ in model.named_parameters() if names.split(n)[0] in planned)
        return names

    def split(self, name: str) -> tuple[str, bool]:
        if not self.prefix:
            return name, False
        from ..readers.peft import peft_param_name

        return peft_param_name(name, self.adapters, self.prefix)

    def name(self, name: str) -> str:
        return self.split(name)[0]

    def skipped(self, name: str) -> bool:
        """An adapter tensor a base-only plan does not cover."""
        return self.skip_own and self.split(name)[1]

    def own_skipped(self, mapped: str) -> bool:
        if not self.skip_own or not self.prefix:
            return False
        from ..readers.peft import split_lora

        own = split_lora(mapped) is not None or ".modules_to_save." in f".{mapped}"
        if own:
            self.left.append(mapped)
        return own


def _train_stays_eval(self, mode: bool = True):
    """`train` of a plan eval module: always eval, so its running statistics never update."""
    return type(self).train(self, False)


# Named `train` so a pickled model (which stores the bound method as getattr(module, "train"))
# still loads without mscope; it then simply has the ordinary train() again.
_train_stays_eval.__name__ = "train"


