"""A freeze selection as a PEFT `LoraConfig`: the modules a user chose to train become LoRA
targets (Linear, Embedding, Conv: a weight of 2 or more dimensions; a quantized weight chosen as a
LoRA target, the QLoRA case) or `modules_to_save` (norms, anything else, trained whole), so `get_peft_model(base, LoraConfig(**config))` adapts exactly the
selected modules and nothing else.

PEFT matches names its own way, and every candidate is checked against the whole module tree
with PEFT's rules before it is used (peft.tuners.tuners_utils.check_target_module_exists and
peft.utils.other._set_trainable):
- target_modules as a list: a module whose name equals an entry or ends with `.entry`; with
  `layers_to_transform` only in those blocks (the first number after `layers_pattern.`);
- target_modules as a string: a regex, `re.fullmatch`ed against each module name;
- modules_to_save: a module whose name ends with an entry (no dot needed: `norm` also matches
  `input_layernorm`), so entries are chosen long enough to hit only what was selected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..checkpoint import PARAMETER, ModuleNode, block_index
from ..errors import MscopeError
from .session import Session
from .snippet import comment_line

LORA_CLASSES = frozenset(
    {
        "Linear",
        "Embedding",
        "Conv1d",
        "Conv2d",
        "Conv3d",
        "Conv1D",
        "NonDynamicallyQuantizableLinear",
    }
)
MAX_LIST_ENTRIES = 8  # past this many target_modules entries a regex is offered, when shorter
DEFAULT_R, DEFAULT_ALPHA, DEFAULT_DROPOUT = 8, 16, 0.05


class LoraExportError(MscopeError):
    """A selection that no LoraConfig can express (nothing selected, an adapter view)."""


@dataclass
class LoraExport:
    """`config`: keyword arguments of `peft.LoraConfig` (JSON-able). `targets` / `saved`: the
    module names PEFT will adapt / copy with it, checked against the tree."""

    config: dict[str, Any]
    targets: list[str]
    saved: list[str]
    notes: list[str] = field(default_factory=list)


def list_matches(name: str, entry: str) -> bool:
    """PEFT's list rule for target_modules (and exclude_modules)."""
    return name == entry or name.endswith(f".{entry}")


def layer_of(name: str, pattern: str | None) -> int | None:
    """The block number PEFT reads from a module name for layers_to_transform."""
    if pattern:
        m = re.match(rf"(?:^|.*?\.){re.escape(pattern)}\.(?P<idx>\d+)\.", name)
    else:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    return int(m.group("idx")) if m else None


def selected_modules(session: Session) -> tuple[list[str], list[str], list[str]]:
    """(LoRA targets, modules_to_save, notes) of the session's trainable parameters, by module."""
    targets: list[str] = []
    saved: list[str] = []
    notes: list[str] = []
    biases: list[str] = []
    for node in session.ckpt.tree.walk():
        params = [t for t in node.tensors if t.kind == PARAMETER and session.can_train(t.name)]
        chosen = [t for t in params if session.is_trainable(t.name)]
        # A quantized Linear (bnb Linear4bit, GPTQ QuantLinear...) chosen in the session is a LoRA
        # target: PEFT wraps it with its own quantized-layer LoRA; the base stays frozen.
        quantized = next((t for t in node.tensors if session.is_lora_target(t.name)), None)
        if quantized is not None and node.name:
            targets.append(node.name)
            biases += [t.name for t in chosen]
            continue
        if not chosen:
            continue
        if not node.name:
            notes.append(
                f"top-level parameter(s) {', '.join(t.name for t in chosen)} have no module: left out"
            )
            continue
        weight = next((t for t in node.tensors if t.name.rpartition(".")[2] == "weight"), None)
        if _lora_able(node, weight) and weight is not None and session.is_trainable(weight.name):
            targets.append(node.name)
            biases += [t.name for t in params if t is not weight and session.is_trainable(t.name)]
        else:
            saved.append(node.name)
            if len(chosen) < len(params):
                notes.append(
                    f"{node.name}: trained whole (modules_to_save), not only {', '.join(t.name for t in chosen)}"
                )
    if biases:
        notes.append(
            f"{len(biases)} selected bias(es) of LoRA modules stay frozen (bias='none'), e.g. {biases[0]}"
        )
    return targets, saved, notes


def _lora_able(node: ModuleNode, weight: Any) -> bool:
    if node.class_name is not None:
        return node.class_name in LORA_CLASSES
    return weight is not None and len(weight.shape) >= 2


def lora_config(
    session: Session,
    r: int = DEFAULT_R,
    alpha: float = DEFAULT_ALPHA,
    dropout: float = DEFAULT_DROPOUT,
    regex: bool | None = None,
) -> LoraExport:
    """The LoraConfig that adapts exactly the session's selection. regex: True/False forces a
    regex / a list for target_modules; None picks the shorter (a list up to MAX_LIST_ENTRIES)."""
    if "peft_adapter" in session.ckpt.kind:
        raise LoraExportError(
            "this view already holds a PEFT adapter",
            session.ckpt.path,
            "export a LoraConfig from the base model alone",
        )
    if r < 1 or not 0.0 <= dropout < 1.0:
        raise LoraExportError(
            f"r must be 1 or more and dropout in [0, 1) (got r={r}, dropout={dropout})"
        )
    targets, saved, notes = selected_modules(session)
    if not targets and not saved:
        raise LoraExportError(
            "nothing is selected to train", session.ckpt.path, "unfreeze the modules to adapt first"
        )
    universe = [n.name for n in session.ckpt.tree.walk() if n.name]
    config: dict[str, Any] = {
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "bias": "none",
    }
    if targets:
        plain = shortest_list(targets, universe)
        layered = layered_list(targets, universe, session)
        options: list[tuple[Any, dict[str, Any]]] = []
        if plain is not None:
            options.append((plain, {}))
        if layered is not None:
            options.append(layered)
        pattern = target_regex(targets, universe)
        chosen: tuple[Any, dict[str, Any]] | None = None
        if options:
            chosen = min(
                options, key=lambda o: len(o[0]) + len(o[1].get("layers_to_transform", ())) // 4
            )
        if pattern is not None and (
            regex is True
            or chosen is None
            or (
                regex is None
                and len(chosen[0]) > MAX_LIST_ENTRIES
                and len(pattern) < len(repr(chosen[0]))
            )
        ):
            chosen = (pattern, {})
        if regex is False and isinstance(chosen[0] if chosen else None, str):
            chosen = (sorted(targets), {})
        if chosen is None:  # cannot happen: the escaped full names always make a regex
            raise LoraExportError("no target_modules entry matches exactly the selected modules")
        config["target_modules"] = chosen[0]
        config.update(chosen[1])
    else:
        # Only whole modules train: PEFT still wants a target; an empty list adapts nothing.
        config["target_modules"] = []
    if saved:
        entries = shortest_saved(saved, universe)
        if entries is None:
            raise LoraExportError(
                f"modules_to_save cannot name {saved[0]!r} without also naming another module",
                session.ckpt.path,
            )
        config["modules_to_save"] = entries
    return LoraExport(config, sorted(targets), sorted(saved), notes)


def _suffixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]  # shortest first


def shortest_list(
    targets: list[str],
    universe: list[str],
    layers: set[int] | None = None,
    pattern: str | None = None,
) -> list[str] | None:
    """Entries (each a dotted suffix of a target) that match every target and no other module
    under PEFT's list rule; None when some target has no such entry."""
    wanted = set(targets)

    def clean(entry: str) -> bool:
        for u in universe:
            if list_matches(u, entry) and u not in wanted:
                if layers is None or layer_of(u, pattern) in layers:
                    return False
        return True

    entries: list[str] = []
    covered: set[str] = set()
    for t in sorted(targets):
        if t in covered:
            continue
        entry = next((s for s in _suffixes(t) if clean(s)), None)
        if entry is None:
            return None
        entries.append(entry)
        covered.update(u for u in wanted if list_matches(u, entry))
    return sorted(set(entries))


def layered_list(
    targets: list[str], universe: list[str], session: Session
) -> tuple[list[str], dict[str, Any]] | None:
    """target_modules with layers_to_transform / layers_pattern, when every target sits in a block
    of one repeated group (`model.layers.N`) and the blocks narrow the list."""
    for group in session.block_groups():
        pattern = group.prefix.rpartition(".")[2]
        indices = {layer_of(t, pattern) for t in targets}
        if None in indices or not all(t.startswith(f"{group.prefix}.") for t in targets):
            continue
        entries = shortest_list(targets, universe, indices, pattern)  # type: ignore[arg-type]
        if entries is None:
            continue
        layers = sorted(indices)  # type: ignore[type-var]
        if layers == sorted(group.indices):
            return None  # every block: the plain list says it without layers_to_transform
        return entries, {"layers_to_transform": layers, "layers_pattern": pattern}
    return None


def target_regex(targets: list[str], universe: list[str]) -> str | None:
    """One regex (fullmatch) for the targets: names that differ in one block number share a
    branch, `model\\.layers\\.(?:3|4)\\.(?:mlp|self_attn\\.q_proj)`; checked against the tree."""
    branches: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    whole: list[str] = []
    templates: dict[tuple[str, str], list[int]] = {}
    for t in targets:
        parts = t.split(".")
        slots = [i for i, p in enumerate(parts) if block_index(p) is not None]
        if len(slots) != 1:
            whole.append(re.escape(t))
            continue
        i = slots[0]
        key = (".".join(parts[:i]), ".".join(parts[i + 1 :]))
        templates.setdefault(key, []).append(int(parts[i]))
    for (head, tail), numbers in templates.items():
        branches.setdefault((head, tuple(sorted(set(numbers)))), []).append(tail)
    pieces = []
    for (head, numbers), tails in sorted(branches.items()):
        nums = "|".join(map(str, numbers))
        nums = nums if len(numbers) == 1 else f"(?:{nums})"
        tails = sorted(set(tails))
        tail = (
            re.escape(tails[0])
            if len(tails) == 1
            else "(?:" + "|".join(map(re.escape, tails)) + ")"
        )
        pieces.append(
            (re.escape(head) + r"\." if head else "") + nums + (r"\." + tail if tail else "")
        )
    pieces += sorted(whole)
    pattern = pieces[0] if len(pieces) == 1 else "(?:" + "|".join(pieces) + ")"
    compiled = re.compile(pattern)
    if {u for u in universe if compiled.fullmatch(u)} != set(targets):
        return None
    return pattern


def shortest_saved(saved: list[str], universe: list[str]) -> list[str] | None:
    """modules_to_save entries: dotted suffixes such that `name.endswith(entry)` holds for the
    saved modules only."""
    wanted = set(saved)
    entries: set[str] = set()
    for s in sorted(saved):
        entry = next(
            (e for e in _suffixes(s) if all(u in wanted for u in universe if u.endswith(e))), None
        )
        if entry is None:
            return None
        entries.add(entry)
    return sorted(entries)


def lora_config_json(export: LoraExport) -> bytes:
    """The config as JSON that `LoraConfig(**json.load(f))` accepts."""
    from ..jsonfile import json_bytes

    return json_bytes(export.config, indent=2) + b"\n"


def save_lora_config(
    export: LoraExport, path: Any, source: str = "", overwrite: bool = False
) -> tuple[Any, Any]:
    """Write PATH (JSON) and PATH with `.py` (the snippet) atomically; (json path, snippet path)."""
    from pathlib import Path

    from ..write.atomic import atomic_write

    path = Path(path)
    script = path.with_suffix(".py") if path.suffix != ".py" else path.with_name(path.name + ".py")
    data = lora_config_json(export)
    code = lora_snippet(export, source).encode("utf-8")
    written = atomic_write(path, lambda fh: fh.write(data), overwrite=overwrite)
    return written, atomic_write(script, lambda fh: fh.write(code), overwrite=overwrite)


def lora_snippet(export: LoraExport, source: str = "") -> str:
    """A Python snippet that builds the LoraConfig and wraps `model` (the base, loaded as usual)."""
    lines = [
        f"# PEFT LoraConfig for the freeze selection of {comment_line(source) or 'a checkpoint'} (made by mscope):",
        f"# LoRA on {len(export.targets)} module(s), {len(export.saved)} trained whole (modules_to_save).",
    ]
    lines += [f"# note: {comment_line(n)}" for n in export.notes]
    lines += [
        "from peft import LoraConfig, get_peft_model",
        "",
        "",
        "def add_lora(model):",
        "    config = LoraConfig(",
    ]
    for key, value in export.config.items():
        lines.append(f"        {key}={value!r},")
    lines += [
        "    )",
        "    return get_peft_model(model, config)",
        "",
        "",
        "# model = add_lora(model)",
        "# model.print_trainable_parameters()",
        "",
    ]
    return "\n".join(lines)
