"""PEFT adapters: a directory with `adapter_config.json` and `adapter_model.safetensors` (or `.bin`),
alone or attached to the base model it modifies.

PEFT saves keys as `base_model.model.<base module>.lora_A.weight`, without the adapter's name;
`modules_to_save` copies under the base tensor's own name (`base_model.model.lm_head.weight`);
DoRA's magnitude as `<module>.lora_magnitude_vector`. mscope names them after the base module
they modify: `model.layers.0.self_attn.q_proj.lora_A.weight`, `lm_head.modules_to_save.weight`,
`...q_proj.lora_magnitude_vector`, so the implied module tree hangs them under that module.
`peft_param_name` maps a live PeftModel's parameter names onto the same names (apply_freeze_plan).

Attached to a base, the base's parameters are frozen (PEFT freezes them) and the adapter's train:
the counts are `PeftModel.get_nb_trainable_parameters()`'s. What does not fit the base (a target
module it lacks, A/B shapes that do not match its weight) is a finding, never a crash.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import PARAMETER, Checkpoint, TensorRecord
from ..errors import CorruptCheckpointError, UnsupportedFormatError

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
MAX_CONFIG_BYTES = 1 << 20  # PEFT writes about 1 KB; a list of every module name stays far below
MAX_LIST = 10_000  # target_modules / modules_to_save / layers_to_transform entries
MAX_TEXT = 4096  # one string of the config (a module name, a regex)
SAVED_PREFIX = "base_model.model."  # PeftModel.base_model (the tuner) .model (the base)
COPY_PART = "modules_to_save"  # the trainable copy of a modules_to_save module, in our names
BASE_PARTS = frozenset({"base_layer", "original_module"})  # PEFT's wrappers keep the base here
KIND = "peft_adapter"


class AdapterError(CorruptCheckpointError):
    """An adapter directory whose config cannot be used (garbage, wrong types, no weights)."""


@dataclass(frozen=True)
class AdapterConfig:
    """What mscope uses of adapter_config.json; the rest is kept verbatim in `extra` (bounded)."""

    peft_type: str = "LORA"
    r: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] = field(default_factory=list)
    layers_to_transform: list[int] | None = None
    use_dora: bool = False
    fan_in_fan_out: bool = False
    bias: str = "none"
    base_model: str | None = None
    task_type: str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def facts(self) -> dict[str, Any]:
        """The config as JSON-able facts (summary --json `metadata.peft`)."""
        return {
            "peft_type": self.peft_type,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules,
            "modules_to_save": self.modules_to_save,
            "layers_to_transform": self.layers_to_transform,
            "use_dora": self.use_dora,
            "fan_in_fan_out": self.fan_in_fan_out,
            "bias": self.bias,
            "base_model_name_or_path": self.base_model,
            "task_type": self.task_type,
            "rank_pattern": self.rank_pattern,
            "alpha_pattern": self.alpha_pattern,
        }


def is_adapter_dir(path: Path) -> bool:
    try:
        return path.is_dir() and (path / CONFIG_NAME).is_file()
    except OSError:
        return False


def read_adapter_config(path: str | os.PathLike) -> AdapterConfig:
    """Parse and type-check adapter_config.json: any problem is one line naming the key."""
    from ..jsonfile import read_json_file

    path = Path(path)
    data = read_json_file(path, AdapterError, "a PEFT adapter_config.json", limit=MAX_CONFIG_BYTES)
    if not isinstance(data, dict):
        raise AdapterError(
            f"not a PEFT adapter config (a JSON {type(data).__name__}, not an object)", path
        )

    def fail(key: str, want: str) -> AdapterError:
        got = data[key]
        shown = type(got).__name__ if not isinstance(got, (str, int, float)) else repr(got)[:40]
        return AdapterError(
            f"{key!r} must be {want}, not {shown}", path, "the adapter config is damaged"
        )

    def text(key: str, default: str | None = None) -> str | None:
        value = data.get(key, default)
        if value is None:
            return default
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise fail(key, f"a string of at most {MAX_TEXT} characters")
        return value

    def number(key: str, kind: type, low: float, high: float) -> Any:
        value = data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise fail(key, "a number" if kind is float else "an integer")
        if not low <= value <= high:
            raise fail(key, f"between {low} and {high}")
        return kind(value)

    def names(key: str, allow_regex: bool) -> list[str] | str | None:
        value = data.get(key)
        if value is None:
            return None
        if allow_regex and isinstance(value, str):
            return text(key)
        if not isinstance(value, list) or len(value) > MAX_LIST:
            raise fail(
                key,
                f"a list of at most {MAX_LIST:,} module names"
                + (" or a regex" if allow_regex else ""),
            )
        if not all(isinstance(v, str) and 0 < len(v) <= MAX_TEXT for v in value):
            raise AdapterError(
                f"{key!r} must list module names (non-empty strings)",
                path,
                "the adapter config is damaged",
            )
        return list(value)

    def pattern_map(key: str, kind: type) -> dict[str, Any]:
        value = data.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict) or len(value) > MAX_LIST:
            raise fail(key, "an object of module patterns")
        out = {}
        for k, v in value.items():
            if (
                len(k) > MAX_TEXT
                or isinstance(v, bool)
                or not isinstance(v, (int, float) if kind is float else int)
            ):
                raise AdapterError(
                    f"{key!r} must map module patterns to numbers",
                    path,
                    "the adapter config is damaged",
                )
            out[k] = kind(v)
        return out

    def flag(key: str) -> bool:
        value = data.get(key, False)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise fail(key, "true or false")
        return value

    layers = data.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and (
        not isinstance(layers, list)
        or len(layers) > MAX_LIST
        or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 31 for i in layers
        )
    ):
        raise AdapterError(
            "'layers_to_transform' must be a list of layer numbers",
            path,
            "the adapter config is damaged",
        )
    saved = names("modules_to_save", allow_regex=False) or []
    return AdapterConfig(
        peft_type=text("peft_type", "LORA") or "LORA",
        r=number("r", int, 0, 1 << 31),
        alpha=number("lora_alpha", float, -(1 << 31), 1 << 31),
        dropout=number("lora_dropout", float, 0.0, 1.0),
        target_modules=names("target_modules", allow_regex=True),
        modules_to_save=list(saved),
        layers_to_transform=layers,
        use_dora=flag("use_dora"),
        fan_in_fan_out=flag("fan_in_fan_out"),
        bias=text("bias", "none") or "none",
        base_model=text("base_model_name_or_path"),
        task_type=text("task_type"),
        rank_pattern=pattern_map("rank_pattern", int),
        alpha_pattern=pattern_map("alpha_pattern", float),
    )


def adapter_lora_args(
    path: str | os.PathLike, rank: int | None, targets: str | None
) -> tuple[int, str | None]:
    """`estimate --adapter DIR`: the adapter's rank and target modules, where not given. A regex
    target_modules cannot be a list of names: then every linear layer is estimated, said so."""
    path = Path(path)
    if not is_adapter_dir(path):
        raise UnsupportedFormatError(f"not a PEFT adapter directory (no {CONFIG_NAME})", path)
    config = read_adapter_config(path / CONFIG_NAME)
    if rank is None:
        if not config.r:
            raise AdapterError(
                "the adapter config has no rank 'r'", path / CONFIG_NAME, "give --lora RANK"
            )
        rank = config.r
    if targets is None and isinstance(config.target_modules, list):
        targets = ",".join(config.target_modules)
    return rank, targets


# -- names -------------------------------------------------------------------------------------
class Role:
    """What an adapter tensor is to the base (`TensorRecord.note` keeps it)."""

    LORA = "lora"  # lora_A / lora_B / lora_embedding_* / lora_magnitude_vector of a base module
    COPY = "modules_to_save"  # the trainable copy of a whole base module
    OVERRIDE = "trained base tensor"  # a base tensor the adapter retrains in place (bias="all")


def split_lora(name: str) -> tuple[str, str, str] | None:
    """`a.q_proj.lora_A.weight` -> (`a.q_proj`, `lora_A`, `weight`); None when no part is `lora_*`."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.startswith("lora_") and i:
            return ".".join(parts[:i]), part, ".".join(parts[i + 1 :])
    return None


def in_modules_to_save(module: str, modules_to_save: list[str]) -> bool:
    """PEFT's own rule (utils.other._set_trainable): a module whose name ends with an entry."""
    return any(module.endswith(m) for m in modules_to_save)


def adapter_name(key: str, config: AdapterConfig) -> tuple[str, str]:
    """A saved key as mscope names it, and its role (Role)."""
    name = key[len(SAVED_PREFIX) :] if key.startswith(SAVED_PREFIX) else key
    lora = split_lora(name)
    if lora is not None:
        return name, Role.LORA
    module, _, leaf = name.rpartition(".")
    if module and in_modules_to_save(module, config.modules_to_save):
        return f"{module}.{COPY_PART}.{leaf}", Role.COPY
    return name, Role.OVERRIDE


def peft_param_name(
    name: str, adapters: frozenset[str] | set[str], prefix: str = SAVED_PREFIX
) -> tuple[str, bool]:
    """A live PeftModel's parameter name as mscope names it, and whether it is the adapter's.

    `base_model.model.x.q_proj.base_layer.weight` -> `x.q_proj.weight` (the base's);
    `...q_proj.lora_A.default.weight` -> `x.q_proj.lora_A.weight`;
    `...lora_magnitude_vector.default.weight` -> `...lora_magnitude_vector` (as PEFT saves it);
    `...lm_head.modules_to_save.default.weight` -> `lm_head.modules_to_save.weight`;
    `...lm_head.original_module.weight` -> `lm_head.weight`."""
    if name.startswith(prefix):
        name = name[len(prefix) :]
    parts = name.split(".")
    out: list[str] = []
    own = False
    i = 0
    while i < len(parts):
        part = parts[i]
        if part in BASE_PARTS:
            i += 1
            continue
        out.append(part)
        if (
            (part.startswith("lora_") or part == COPY_PART)
            and i + 1 < len(parts)
            and parts[i + 1] in adapters
        ):
            own = True
            i += 2
            if part == "lora_magnitude_vector" and parts[i:] == ["weight"]:
                break
            continue
        i += 1
    return ".".join(out), own


# -- reading -----------------------------------------------------------------------------------
def weights_file(path: Path) -> Path:
    for name in WEIGHT_NAMES:
        candidate = path / name
        if candidate.is_file():
            return candidate
    raise UnsupportedFormatError(
        f"PEFT adapter directory without {' or '.join(WEIGHT_NAMES)}",
        path,
        "copy the adapter's weights next to its config",
    )


def read_adapter(path: Path, read: Callable[[Path], Checkpoint]) -> Checkpoint:
    """The adapter alone: its tensors under the names of the base modules they modify.

    `read` reads the weights file (readers' dispatcher: a `.bin` is parsed, never unpickled)."""
    config = read_adapter_config(path / CONFIG_NAME)
    weights = weights_file(path)
    ckpt = read(weights)
    ckpt.path = path
    ckpt.kind = KIND
    roles: dict[str, int] = {}
    seen: dict[str, str] = {}
    for t in ckpt.tensors:
        if t.section:
            continue
        name, role = adapter_name(t.name, config)
        if name in seen:  # `x.weight` and `base_model.model.x.weight`: keep both, distinctly
            ckpt.warnings.append(
                f"adapter keys {seen[name]!r} and {t.name!r} both name {name!r}; the second keeps its key"
            )
            continue
        seen[name] = t.name
        t.name = name
        t.note = role
        roles[role] = roles.get(role, 0) + 1
    facts = config.facts()
    facts["adapter_path"] = str(path)
    facts["weights"] = weights.name
    facts["tensors_by_role"] = roles
    ckpt.metadata["peft"] = facts
    if ckpt.__dict__.get("_by_name") is not None:
        del ckpt.__dict__["_by_name"]
    return ckpt


def open_checkpoint_with_adapter(
    base: str | os.PathLike, adapter: str | os.PathLike, strict: bool = True
) -> Checkpoint:
    """`mscope BASE --adapter DIR`: the base with the adapter attached (attach_adapter)."""
    from . import open_checkpoint

    adapter_path = Path(adapter)
    if not is_adapter_dir(adapter_path):
        raise UnsupportedFormatError(
            f"--adapter needs a PEFT adapter directory (with {CONFIG_NAME})", adapter_path,
            "the directory PeftModel.save_pretrained wrote",
        )  # fmt: skip
    base_ckpt = open_checkpoint(base, strict=strict)
    if base_ckpt.kind == KIND:
        raise UnsupportedFormatError(
            "the base is itself a PEFT adapter", base, "open the base model with --adapter DIR"
        )
    return attach_adapter(base_ckpt, open_checkpoint(adapter_path, strict=strict))


def attach_adapter(base: Checkpoint, adapter: Checkpoint) -> Checkpoint:
    """A new Checkpoint: the base's records, frozen, and the adapter's, trainable, under one tree."""
    facts = dict(adapter.metadata.get("peft") or {})
    fan_in_fan_out = bool(facts.get("fan_in_fan_out"))
    by_name: dict[str, TensorRecord] = {}
    for t in base.model_tensors:
        by_name.setdefault(t.name, t)
        if (
            t.quant is not None
        ):  # a quantized weight (quant.py): `q_proj.qweight` is `q_proj.weight`
            by_name.setdefault(t.quant.logical_name, t)
    findings: list[str] = []
    replaced: dict[str, TensorRecord] = {}
    added: list[TensorRecord] = []
    missing_modules: dict[str, None] = {}
    for t in adapter.model_tensors:
        role = t.note
        if role == Role.LORA:
            module, part, _ = split_lora(t.name) or ("", "", "")
            weight = by_name.get(f"{module}.weight")
            if weight is None:
                missing_modules.setdefault(module)
            else:
                problem = lora_shape_problem(part, t.shape, logical_shape(weight), fan_in_fan_out)
                if problem:
                    findings.append(f"{t.name}: {problem}")
            added.append(t)
        elif role == Role.COPY:
            module, _, leaf = t.name.rpartition(f".{COPY_PART}.")
            original = by_name.get(f"{module}.{leaf}")
            if original is None:
                missing_modules.setdefault(module)
            elif logical_shape(original) != t.shape:
                findings.append(
                    f"{t.name} {list(t.shape)} copies {original.name} {list(logical_shape(original))}: shapes differ"
                )
            added.append(t)
        else:
            original = by_name.get(t.name)
            if original is None:
                findings.append(f"{t.name}: the adapter trains a tensor the base lacks")
                added.append(t)
            else:
                if logical_shape(original) != t.shape:
                    findings.append(
                        f"{t.name} {list(t.shape)} replaces the base's {list(logical_shape(original))}: shapes differ"
                    )
                replaced[t.name] = t
    for module in missing_modules:
        findings.append(f"the adapter targets {module!r}, which the base lacks")

    tensors: list[TensorRecord] = []
    for t in base.tensors:
        if t.section == "" and t.name in replaced:
            tensors.append(replaced[t.name])
            continue
        if t.section == "" and t.kind == PARAMETER:
            t = frozen_record(t)
        tensors.append(t)
    tensors.extend(added)

    facts["findings"] = findings
    facts["base_path"] = str(base.path)
    if base.module_root is not None:
        facts["note"] = "the base's own module classes are not shown: the tree is implied by names"
    combined = Checkpoint(
        base.path,
        base.format,
        kind=f"{base.kind} + {KIND}",
        tensors=tensors,
        entries=list(base.entries),
        globals=[*base.globals, *adapter.globals],
        model_path=base.model_path,
        sections=dict(base.sections),
        metadata={**base.metadata, "peft": facts},
        files=[*base.files, *adapter.files],
        warnings=[
            *base.warnings,
            *(f"adapter: {w}" for w in adapter.warnings),
            *(f"adapter: {f}" for f in findings),
        ],
        problems=[*base.problems, *(f"adapter: {p}" for p in adapter.problems)],
        refusals=[*base.refusals, *(f"adapter: {r}" for r in adapter.refusals)],
    )
    combined.over_budget = base.over_budget | adapter.over_budget
    return combined


def frozen_record(t: TensorRecord) -> TensorRecord:
    """A copy of a base record that says it is frozen, as PEFT freezes the base; the base's own
    record stays as read (records are not changed after reading)."""
    out = TensorRecord(
        t.name, t.shape, t.dtype, t.stride, t.storage_offset, t.storage, False, t.kind, True,
        t.section, t.shard, t.persistent, t.note, t.tied_to, t.alias_of, t.pickle_seq,
    )  # fmt: skip
    out.quant = t.quant
    out.companion_of = t.companion_of
    return out


def logical_shape(t: TensorRecord) -> tuple[int, ...]:
    """The shape the model sees: a packed quantized weight's unpacked one."""
    return t.quant.logical_shape if t.quant is not None else t.shape


def lora_shape_problem(
    part: str, shape: tuple[int, ...], weight: tuple[int, ...], fan_in_fan_out: bool
) -> str | None:
    """Why a LoRA factor cannot sit on a base weight of shape `weight`, or None when it fits.

    Linear [out, in]: lora_A [r, in], lora_B [out, r] (GPT-2's Conv1D stores [in, out]:
    fan_in_fan_out). Embedding [num, dim]: lora_embedding_A [r, num], lora_embedding_B [dim, r].
    Conv [out, in, k...]: lora_A [r, in, k...], lora_B [out, r, 1...]. DoRA's magnitude: [out]."""
    if not shape or not weight:
        return None
    if part == "lora_magnitude_vector":
        out_f = weight[1] if fan_in_fan_out and len(weight) > 1 else weight[0]
        return (
            None
            if shape[0] == out_f
            else f"{list(shape)} does not fit the base weight {list(weight)} (needs {out_f} values)"
        )
    if len(weight) < 2:
        return None
    out_f, in_f = (weight[1], weight[0]) if fan_in_fan_out else (weight[0], weight[1])
    if part in ("lora_A", "lora_embedding_B"):
        want = in_f if part == "lora_A" else weight[1]
        got = shape[1] if len(shape) > 1 else None
        if got != want:
            return (
                f"{list(shape)} does not fit the base weight {list(weight)} (needs {want} columns)"
            )
    elif part in ("lora_B", "lora_embedding_A"):
        want = out_f if part == "lora_B" else weight[0]
        index = 0 if part == "lora_B" else 1
        got = shape[index] if len(shape) > index else None
        if got != want:
            where = "rows" if index == 0 else "columns"
            return (
                f"{list(shape)} does not fit the base weight {list(weight)} (needs {want} {where})"
            )
    return None


def fact_lines(ckpt: Checkpoint) -> list[tuple[str, str]]:
    """(label, value) rows of an adapter's config, for the summary and the explorer's root."""
    facts = ckpt.metadata.get("peft")
    if not isinstance(facts, dict):
        return []
    rows = [("type", f"{facts.get('peft_type')}" + (" (DoRA)" if facts.get("use_dora") else ""))]
    for key, label in (("r", "rank"), ("lora_alpha", "alpha"), ("lora_dropout", "dropout")):
        if facts.get(key) is not None:
            rows.append((label, f"{facts[key]:g}"))
    for key, label in (
        ("target_modules", "target modules"),
        ("modules_to_save", "modules to save"),
        ("layers_to_transform", "layers"),
        ("rank_pattern", "rank pattern"),
        ("alpha_pattern", "alpha pattern"),
        ("base_model_name_or_path", "base model"),
    ):
        value = facts.get(key)
        if value:
            rows.append(
                (
                    label,
                    value
                    if isinstance(value, str)
                    else ", ".join(map(str, value if isinstance(value, list) else value.items())),
                )
            )
    if facts.get("base_path"):
        rows.append(("adapter", str(facts.get("adapter_path"))))
    roles = facts.get("tensors_by_role") or {}
    if roles:
        rows.append(("tensors", ", ".join(f"{k} x{v:,}" for k, v in roles.items())))
    findings = facts.get("findings") or []
    rows.append(
        ("fits base", "yes" if not findings else f"{len(findings):,} finding(s), see warnings")
        if facts.get("base_path")
        else ("base", "not attached (mscope BASE --adapter DIR)")
    )
    return rows
