"""What `mscope summary` says about a checkpoint, as data: the JSON document (versioned schema),
the totals line and optimizer lines. The text rendering is cli/summary.py."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from json.encoder import encode_basestring_ascii as _enc
from typing import Any

from .checkpoint import PARAMETER, Checkpoint, ModuleNode, TensorRecord
from .jsonfile import compact_json
from .patterns import glob_matches
from .readers import FORMAT_LABELS

SCHEMA = "mscope.summary"
SCHEMA_VERSION = 1
AUTO_DEPTH_TENSORS = 400  # above this many tensors the text report stops listing every tensor
AUTO_MAX_CHILDREN = 24  # ...and lists at most this many children of one module, then one "more" row


def matches(name: str, pattern: str | None) -> bool:
    return pattern is None or glob_matches(name, pattern)


def optimizer_summaries(ckpt: Checkpoint) -> dict[str, str]:
    """One line per optimizer section: kind (from its state names), groups, lr, params with state."""
    out: dict[str, str] = {}
    for section, role in ckpt.sections.items():
        if role != "optimizer":
            continue
        prefix = f"{section}."
        entries = {e.path[len(prefix) :]: e.value for e in ckpt.entries if e.path.startswith(prefix)}
        tensors = [t for t in ckpt.tensors if t.section == section]
        state_names = {t.name.rsplit(".", 1)[-1] for t in tensors}
        groups = {_after(k, "param_groups") for k in entries} - {None}
        params_with_state = {_after(t.name, "state") for t in tensors} - {None}
        if {"exp_avg", "exp_avg_sq"} <= state_names:
            kind = "AdamW-like" if any(v is True for k, v in entries.items() if k.endswith("decoupled_weight_decay")) else "Adam-like"
        elif "momentum_buffer" in state_names:
            kind = "SGD with momentum"
        elif "square_avg" in state_names:
            kind = "RMSprop-like"
        elif tensors:
            kind = "optimizer"
        else:
            kind = "no state"
        lrs = sorted({v for k, v in entries.items() if k.endswith(".lr") and isinstance(v, (int, float))})
        lr = f", lr {', '.join(f'{x:g}' for x in lrs[:3])}" if lrs else ""
        n_groups = len(groups) if groups else 0
        out[section] = (
            f"{kind}: {n_groups} param group(s){lr}, state for {len(params_with_state):,} parameter(s), "
            f"{len(tensors):,} tensors"
        )
    return out


def optimizer_param_names(ckpt: Checkpoint) -> dict[str, tuple[str, str]]:
    """Optimizer state tensors by the parameter they belong to: qualified name (`optimizer/
    state.4.exp_avg`) -> (`features.3.weight`, `exp_avg`), where that mapping is certain.

    torch numbers an optimizer's parameters in param_groups order, and `Adam(model.parameters())`
    takes them in model.parameters() order: the model's parameter entries in state-dict order,
    buffers and tied repeats skipped. Certain means one param group, as many indices as model
    parameters, and every state tensor that is not a scalar shaped like its parameter; otherwise
    (groups split by weight decay, a filtered parameter list) the raw names stay."""
    params = [t for t in ckpt.model_tensors if t.kind == PARAMETER and t.alias_of is None]
    # One optimizer per (section, path before `state`): Lightning keeps a list of them
    # (`optimizer_states` / `0.state.3.exp_avg`), a plain checkpoint one (`optimizer` / `state.3.exp_avg`).
    found: dict[tuple[str, str], dict[str, tuple[str, str]] | None] = {}
    for t in ckpt.tensors:
        if ckpt.sections.get(t.section.split(".", 1)[0]) != "optimizer":
            continue
        parts = t.name.split(".")
        i = parts.index("state") if "state" in parts else -1
        key = (t.section, ".".join(parts[: max(i, 0)]))
        names = found.setdefault(key, {})
        if names is None:
            continue
        index = int(parts[i + 1]) if 0 <= i < len(parts) - 2 and parts[i + 1].isdigit() else len(params)
        if index >= len(params) or (t.shape and t.shape != params[index].shape):
            found[key] = None
            continue
        names[t.qualified_name] = (params[index].name, ".".join(parts[i + 2 :]))
    out: dict[str, tuple[str, str]] = {}
    for (section, optimizer), names in found.items():
        prefix = ".".join(p for p in (section, optimizer, "param_groups.") if p)
        groups = [e.value for e in ckpt.entries if e.path.startswith(prefix) and e.path.endswith(".params")]
        if names and len(groups) == 1 and _list_length(groups[0]) == len(params):
            out.update(names)
    return out


def _list_length(value: Any) -> int | None:
    """The length of a list entry as the reader renders it: `[0, 1, 2]`, `[0, ..., (10 items)]`."""
    if isinstance(value, list):
        return len(value)
    if not isinstance(value, str) or not (value.startswith("[") and value.endswith("]")):
        return None
    if value.endswith(" items)]"):
        count = value[value.rfind("(") + 1 : -len(" items)]")].replace(",", "")
        return int(count) if count.isdigit() else None
    return len(value[1:-1].split(", ")) if value != "[]" else 0


def _after(path: str, component: str) -> str | None:
    """The path component right after `component` (`0.state.3.exp_avg`, "state" -> "3")."""
    parts = path.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == component:
            return ".".join(parts[: i + 2])
    return None


def totals_line(ckpt: Checkpoint) -> str:
    t = ckpt.totals()
    return f"trainable params: {t.trainable:,} || all params: {t.parameters:,} || trainable%: {t.trainable_percent:.2f}"


# ----------------------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------------------
def tensor_dict(t: TensorRecord) -> dict[str, Any]:
    return {
        "name": t.name,
        "section": t.section,
        "shape": list(t.shape),
        "dtype": t.dtype,
        "kind": t.kind,
        "requires_grad": t.requires_grad,
        "trainable": t.trainable,
        "numel": t.numel,
        "bytes": t.nbytes,
        "stride": list(t.stride),
        "storage_offset": t.storage_offset,
        "storage": t.storage.key if t.storage is not None else None,
        "location": t.location,
        "shard": t.shard,
        "tied_to": t.tied_to,
        "alias_of": t.alias_of,
        "note": t.note,
        "quant": t.quant.to_dict() if t.quant is not None else None,
        "companion_of": t.companion_of,
    }


def summary_modules(ckpt: Checkpoint, depth: int | None = None, pattern: str | None = None) -> Iterator[ModuleNode]:
    if depth is None and pattern is None:
        yield from ckpt.tree.walk()
        return
    for node in ckpt.tree.walk():
        level = node.name.count(".") + 1 if node.name else 0
        if depth is not None and level > depth:
            continue
        if pattern is not None and node.name and not any(matches(t.name, pattern) for t in node.all_tensors()):
            continue
        yield node


def module_dict(node: ModuleNode) -> dict[str, Any]:
    stats = node.stats
    return {
        "name": node.name,
        "class": node.class_path,
        "training": node.training,
        "attributes": {k: _jsonable(v) for k, v in node.attributes.items()},
        "tensors": stats.tensors,
        "parameters": stats.params,
        "trainable": stats.trainable,
        "bytes": stats.nbytes,
    }


def summary_dict(
    ckpt: Checkpoint, depth: int | None = None, pattern: str | None = None, with_lists: bool = True
) -> dict[str, Any]:
    """The summary as plain data. with_lists=False leaves `modules` and `tensors` as None (see
    summary_json, which renders those two itself)."""
    totals = ckpt.totals()
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "file": str(ckpt.path),
        "format": ckpt.format,
        "format_label": FORMAT_LABELS.get(ckpt.format, ckpt.format),
        "kind": ckpt.kind,
        "model_path": ckpt.model_path,
        "hierarchy": "file" if ckpt.has_real_hierarchy else "names",
        "totals": {
            "tensors": totals.tensors,
            "parameters": totals.parameters,
            "trainable": totals.trainable,
            "frozen": totals.frozen,
            "trainable_percent": round(totals.trainable_percent, 4),
            "buffers": totals.buffers,
            "bytes": totals.nbytes,
            "file_tensor_bytes": totals.file_bytes,
            "bytes_by_dtype": totals.bytes_by_dtype,
            "bytes_by_location": totals.bytes_by_location,
            "quantized": totals.quantized,
        },
        "sections": {
            name: {"role": role, **totals.sections.get(name, {"tensors": 0, "bytes": 0})}
            for name, role in ckpt.sections.items()
            if role != "model"
        },
        "modules": [module_dict(n) for n in summary_modules(ckpt, depth, pattern)] if with_lists else None,
        "tensors": [tensor_dict(t) for t in ckpt.tensors if pattern is None or matches(t.name, pattern)]
        if with_lists
        else None,
        "entries": [{"path": e.path, "type": e.type, "value": _jsonable(e.value)} for e in ckpt.entries],
        "globals": [
            {
                "module": g.module,
                "name": g.name,
                "safety": g.safety,
                "reason": g.reason,
                "count": g.count,
                "calls": g.calls,
                "pickle": g.pickle,
            }
            for g in ckpt.globals
        ],
        "metadata": {k: _jsonable(v) for k, v in ckpt.metadata.items()},
        "warnings": ckpt.warnings,
        "problems": ckpt.problems,
        "reference_refuses": ckpt.refusals,
    }


# The two long lists are rendered with f-strings around the C string encoder: the same text as
# json.dumps(summary_dict(...), separators=(",", ":")) (a test holds them equal), about 3x
# faster than building 200k dicts for the encoder on a 100k-tensor file.
def summary_json(ckpt: Checkpoint, depth: int | None = None, pattern: str | None = None) -> str:
    return "".join(summary_json_chunks(ckpt, depth, pattern))


def summary_json_chunks(
    ckpt: Checkpoint, depth: int | None = None, pattern: str | None = None, batch: int = 4096
) -> Iterator[str]:
    """summary_json in pieces of `batch` records, so the whole text never sits in memory."""
    data = summary_dict(ckpt, depth, pattern, with_lists=False)
    keys = list(data)
    split = keys.index("modules")
    assert keys[split + 1] == "tensors"
    yield compact_json({k: data[k] for k in keys[:split]})[:-1] + ',"modules":['
    yield from _joined(_modules_json(summary_modules(ckpt, depth, pattern)), batch)
    yield '],"tensors":['
    tensors = ckpt.tensors if pattern is None else [t for t in ckpt.tensors if matches(t.name, pattern)]
    yield from _joined(_tensors_json(tensors), batch)
    yield "]," + compact_json({k: data[k] for k in keys[split + 2 :]})[1:]


def _joined(items: Iterator[str], batch: int) -> Iterator[str]:
    """Comma-joined, in batches: `a,b` then `,c,d`."""
    first = True
    while True:
        chunk = ",".join(itertools.islice(items, batch))
        if not chunk:
            return
        yield chunk if first else "," + chunk
        first = False




def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if type(value) is str:
        return _enc(value)
    return compact_json(value)


def _modules_json(nodes: Iterator[ModuleNode]) -> Iterator[str]:
    # Generators with their caches in locals, not a function per record: 220k calls were a
    # fifth of the rendering.
    enc = _enc
    implied = '"class":null,"training":null,"attributes":{}'  # every module implied by names
    for node in nodes:
        stats = node.stats
        if node.class_path is None and node.training is None and not node.attributes:
            middle = implied
        else:
            attributes = compact_json({k: _jsonable(v) for k, v in node.attributes.items()})
            middle = f'"class":{_scalar(node.class_path)},"training":{_scalar(node.training)},"attributes":{attributes}'
        yield (
            f'{{"name":{enc(node.name)},{middle},"tensors":{stats.tensors},"parameters":{stats.params},'
            f'"trainable":{stats.trainable},"bytes":{stats.nbytes}}}'
        )


def _tensors_json(tensors: list[TensorRecord]) -> Iterator[str]:
    """Tensor records; the runs of fields that repeat across tensors are rendered once."""
    enc = _enc
    dims: dict[tuple[int, ...], str] = {}
    kinds: dict[tuple, str] = {}
    tails: dict[tuple, str] = {}
    sections: dict[str, str] = {}
    for t in tensors:
        shape = dims.get(t.shape)
        if shape is None:
            shape = dims[t.shape] = ",".join(map(str, t.shape))
        stride = dims.get(t.stride)
        if stride is None:
            stride = dims[t.stride] = ",".join(map(str, t.stride))
        key = (t.dtype, t.kind, t.requires_grad, t.kind_from_file)
        kind = kinds.get(key)
        if kind is None:
            kind = kinds[key] = (
                f'"dtype":{enc(t.dtype)},"kind":{enc(t.kind)},"requires_grad":{_scalar(t.requires_grad)},'
                f'"trainable":{_scalar(t.trainable)}'
            )
        section = sections.get(t.section)
        if section is None:
            section = sections[t.section] = enc(t.section)
        storage = t.storage
        if storage is None:
            location, storage_key = "cpu", "null"
        else:
            location, storage_key = storage.location, enc(storage.key)
        key = (location, t.shard, t.tied_to, t.alias_of, t.note, t.companion_of)
        tail = tails.get(key) if t.quant is None else None
        if tail is None:
            quant = "null" if t.quant is None else compact_json(t.quant.to_dict())
            tail = (
                f'"location":{enc(location)},"shard":{_scalar(t.shard)},"tied_to":{_scalar(t.tied_to)},'
                f'"alias_of":{_scalar(t.alias_of)},"note":{_scalar(t.note)},"quant":{quant},'
                f'"companion_of":{_scalar(t.companion_of)}}}'
            )
            if t.quant is None:
                tails[key] = tail
        yield (
            f'{{"name":{enc(t.name)},"section":{section},"shape":[{shape}],{kind},"numel":{t.numel},'
            f'"bytes":{t.nbytes},"stride":[{stride}],"storage_offset":{t.storage_offset},'
            f'"storage":{storage_key},{tail}'
        )


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else repr(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value[:64]]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in list(value.items())[:256]}
    return repr(value)[:200]
