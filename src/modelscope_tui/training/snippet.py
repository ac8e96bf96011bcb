"""`mscope apply-plan`: a freeze plan as plain-PyTorch source that needs no mscope.

The snippet checks the model against the plan's fingerprint (its own copy of `model_shapes` and
`fingerprint`, spelled out in Python: it must run where mscope is not installed), then sets
requires_grad from a predicate: the plan's rules replayed when that gives exactly the plan's
lists, else the frozen names spelled out.
"""

from __future__ import annotations

import keyword
import os
import re
import textwrap
from typing import Any

from ..checkpoint import block_index
from ..errors import MscopeError
from ..patterns import compile_safe_regex, glob_condition
from ..units import safe_text
from .plan import PlanError, read_plan
from .session import Action, Selector


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
        f"# Freeze plan for {comment_line(ckpt.get('path', '?'))} ({comment_line(ckpt.get('fingerprint', 'no fingerprint'))}),",
        f"# {len(data['frozen'])} frozen / {len(data['trainable'])} trainable parameter names."
        f" Made by mscope {comment_line(data.get('mscope_version', '?'))}; needs only torch.",
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


def comment_line(text: Any) -> str:
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
        if action == Action.INVERT and selector == Selector.INVERT:
            lines += ["    # invert", "    frozen = not frozen"]
            continue
        if action not in (Action.FREEZE, Action.UNFREEZE):
            return None
        target = "True" if action == Action.FREEZE else "False"
        lines.append(f"    # {action} {selector} {comment_line(value)}".rstrip())
        if selector == Selector.ALL:
            lines.append(f"    frozen = {target}")
            continue
        if selector == Selector.LAST_N_BLOCKS:
            block = _block_conditions(value, names)
            if block is None:
                return None
            before, last = block
            if before:
                lines += [f"    if name.startswith({before}):", "        frozen = True"]
            if last:
                lines += [f"    if name.startswith({last}):", "        frozen = False"]
            continue
        if selector == Selector.GLOB:
            cond = glob_condition(value)
        elif selector == Selector.REGEX:
            try:  # replayed below on every name: only a pattern that cannot backtrack for ages
                compile_safe_regex(value)
            except MscopeError:
                return None  # the snippet spells out the frozen names instead
            cond = f"re.search({value!r}, name)"
        elif selector == Selector.CLASS:
            if "modules" not in rule:
                return None
            short = value.rsplit(".", 1)[-1]
            class_modules.setdefault(short, set()).update(rule["modules"])
            cond = f'any(name.startswith(m + ".") for m in class_modules.get({short!r}, ()) if m)'
        elif selector == Selector.NAMES:
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
