"""`mscope summary`: the checkpoint as JSON (versioned schema) or as a rich text report."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from json.encoder import encode_basestring_ascii as _enc
from typing import Any, NamedTuple

from .checkpoint import PARAMETER, Checkpoint, ModuleNode, TensorRecord
from .jsonfile import compact_json
from .patterns import glob_matches
from .readers import FORMAT_LABELS
from .units import fmt_bytes, fmt_count, safe_text

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
        key = (location, t.shard, t.tied_to, t.alias_of, t.note)
        tail = tails.get(key)
        if tail is None:
            tail = tails[key] = (
                f'"location":{enc(location)},"shard":{_scalar(t.shard)},"tied_to":{_scalar(t.tied_to)},'
                f'"alias_of":{_scalar(t.alias_of)},"note":{_scalar(t.note)}}}'
            )
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


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------
def render_summary(ckpt: Checkpoint, console: Any, depth: int | None = None, pattern: str | None = None) -> None:
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    totals = ckpt.totals()
    label = FORMAT_LABELS.get(ckpt.format, ckpt.format)
    # Text from the file (names, keys, values, globals) goes through safe_text before layout,
    # and through rich's markup escape where it meets markup; the console escapes again, after.
    where = f" (model at [bold]{escape(safe_text(ckpt.model_path))}[/])" if ckpt.model_path else ""
    name = safe_text(ckpt.path.name)
    console.print(f"[bold]{escape(name)}[/] · {label} · {ckpt.kind.replace('_', ' ')}{where}")
    dtypes = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in totals.bytes_by_dtype.items()) or "no tensors"
    console.print(f"{totals.tensors:,} tensors · {fmt_bytes(totals.nbytes)} · {dtypes}")

    show_tensors = depth is None and (pattern is not None or totals.tensors <= AUTO_DEPTH_TENSORS)
    max_children = None
    if depth is None and not show_tensors:
        # A chosen depth, not an asked-for one: 10,000 blocks under one module would print
        # 10,000 rows (11 s of table layout) that nobody reads.
        depth, max_children = 2, AUTO_MAX_CHILDREN
    table = Table(box=None, pad_edge=False, show_edge=False, expand=False, header_style="bold")
    table.add_column("Module / tensor", overflow="ellipsis", no_wrap=True, max_width=34)
    table.add_column("Shape", overflow="ellipsis", no_wrap=True, max_width=16)
    table.add_column("Dtype", no_wrap=True, max_width=9, overflow="ellipsis")
    table.add_column("Train", no_wrap=True)
    table.add_column("Params", justify="right", no_wrap=True)
    table.add_column("Bytes", justify="right", no_wrap=True)

    for node, prefix, level in _visible_nodes(ckpt.tree, depth, pattern, max_children):
        if isinstance(node, _Folded):
            table.add_row(
                Text(f"{prefix}… {node.count:,} more ({safe_text(node.first)} … {safe_text(node.last)})", style="dim"),
                "", "", _module_mark(node.trainable, node.params), fmt_count(node.params) if node.params else "-",
                fmt_bytes(node.nbytes),
            )  # fmt: skip
            continue
        stats = node.stats
        if node.name or node.class_path or node.children:
            name = safe_text(node.short_name) or "(root)"
            cls = f" {safe_text(node.class_name)}" if node.class_name else ""
            mark = _module_mark(stats.trainable, stats.params)
            table.add_row(
                Text(prefix) + Text(name, style="bold") + Text(cls, style="cyan"),
                "", "", mark, fmt_count(stats.params) if stats.params else "-", fmt_bytes(stats.nbytes),
            )  # fmt: skip
        if not show_tensors and (depth is not None and level >= depth):
            continue
        if show_tensors or depth is None or level < depth:
            child_prefix = _child_prefix(prefix, bool(node.name or node.class_path or node.children))
            tensors = node.tensors
            if max_children is not None and len(tensors) > max_children:
                # A flat state dict keeps 100k tensors in one module: their rows (rich's table
                # layout, 1 ms each) were the 39 s of its summary. The rest is one row, as for modules.
                rest = tensors[max_children:]
                tensors = tensors[:max_children]
            else:
                rest = []
            for t in tensors:
                if not matches(t.name, pattern):
                    continue
                leaf = safe_text(t.name.rsplit(".", 1)[-1])
                style = "" if t.kind == PARAMETER else "dim"
                extra = f" = {safe_text(t.alias_of)}" if t.alias_of else ""
                table.add_row(
                    Text(child_prefix + leaf + extra, style=style),
                    "×".join(map(str, t.shape)) or "scalar",
                    safe_text(t.dtype),
                    _tensor_mark(t),
                    f"{t.numel:,}" if t.kind == PARAMETER else f"({t.kind})",
                    fmt_bytes(t.nbytes),
                )
            if rest:
                params = [t for t in rest if t.kind == PARAMETER and t.alias_of is None]
                trainable = sum(t.numel for t in params if t.trainable)
                total = sum(t.numel for t in params)
                table.add_row(
                    Text(f"{child_prefix}… {len(rest):,} more tensors ({safe_text(rest[0].name.rsplit('.', 1)[-1])} … "
                         f"{safe_text(rest[-1].name.rsplit('.', 1)[-1])})", style="dim"),
                    "", "", _module_mark(trainable, total), fmt_count(total) if total else "-",
                    fmt_bytes(sum(t.nbytes for t in rest if t.alias_of is None)),
                )  # fmt: skip
    console.print(table)
    if not show_tensors:
        console.print(f"[dim]{totals.tensors:,} tensors; modules to depth {depth} (--depth N or --filter GLOB shows more)[/]")
    console.print(f"[bold]{totals_line(ckpt)}[/]")
    if totals.buffers:
        console.print(f"buffers and other tensors: {totals.buffers:,} elements")

    locations = totals.bytes_by_location
    if locations:
        text = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in locations.items())
        console.print(f"stored on: {text}")
        if any(not loc.startswith("cpu") for loc in locations):
            console.print("[yellow]tensors were saved on an accelerator: on a CPU-only machine load with map_location='cpu'[/]")

    other = {k: v for k, v in ckpt.sections.items() if v != "model" and k in totals.sections}
    if other:
        console.print("[bold]Other tensors[/] [dim](not counted above)[/]")
        for name, role in other.items():
            sec = totals.sections[name]
            console.print(f"  {escape(safe_text(name))} [dim]({role})[/]: {sec['tensors']:,} tensors, {fmt_bytes(sec['bytes'])}")
    for section, line in optimizer_summaries(ckpt).items():
        console.print(f"  {escape(safe_text(section))}: {escape(safe_text(line))}", overflow="ellipsis", no_wrap=True, crop=True)
    if ckpt.entries:
        console.print("[bold]Entries[/]")
        lines, hidden = entry_lines(ckpt.entries)
        for line in lines:
            console.print(Text(f"  {safe_text(line)}"), overflow="ellipsis", no_wrap=True, crop=True)
        if hidden:
            console.print(f"  [dim]... {hidden:,} more (--json lists all)[/]")
    if ckpt.metadata.get("safetensors_metadata"):
        console.print("[bold]Metadata[/]")
        for k, v in ckpt.metadata["safetensors_metadata"].items():
            console.print(Text(f"  {safe_text(k)} = {safe_text(v)}"), overflow="ellipsis", no_wrap=True, crop=True)
    _render_globals(ckpt, console)
    for w in ckpt.refusals + ckpt.warnings:
        console.print(f"[yellow]warning:[/] {escape(safe_text(w))}")
    for p in ckpt.problems:
        console.print(f"[red]problem:[/] {escape(safe_text(p))}")


def _render_globals(ckpt: Checkpoint, console: Any) -> None:
    from rich.markup import escape

    unsafe = ckpt.unsafe_globals
    if not unsafe:
        if ckpt.globals:
            console.print("[green]pickle globals: all allowlisted (loads with weights_only=True)[/]")
        return
    dangerous = [g for g in unsafe if g.safety == "dangerous"]
    if dangerous:
        console.print(
            f"[bold red]DANGEROUS: {len(dangerous)} global(s) can run code when this file is loaded "
            "with torch.load(weights_only=False)[/]"
        )
        for g in dangerous:
            console.print(f"  [bold red]{escape(safe_text(g.qualname))}[/] [dim]{escape(safe_text(g.reason))}[/]", overflow="ellipsis", no_wrap=True, crop=True)
            for call in g.calls:
                console.print(f"    [red]would call {escape(safe_text(call))}[/]", overflow="ellipsis", no_wrap=True, crop=True)
    rest = [g for g in unsafe if g.safety != "dangerous"]
    if rest:
        console.print(f"[yellow]{len(rest)} global(s) outside the weights_only allowlist[/] [dim](a plain torch.load would import them)[/]")
        for g in rest:
            console.print(f"  {escape(safe_text(g.qualname))}", overflow="ellipsis", no_wrap=True, crop=True)


HYPER_PREFIXES = ("hyper_parameters", "hparams", "config", "args", "cfg")
FOLD_COUNTERS = 6  # more numeric entries than this under one parent fold into one line


def entry_lines(entries: list, limit: int = 40) -> tuple[list[str], int]:
    """Entries for the text summary: hyper-parameters first (they answer "how was this
    trained"), runs of numeric counters under one parent (Lightning's `loops.*.batch_progress`)
    folded into one line, identical lines once with a count. Returns (lines, entries not shown)."""
    hyper = [e for e in entries if e.path.split(".", 1)[0] in HYPER_PREFIXES]
    rest = [e for e in entries if e.path.split(".", 1)[0] not in HYPER_PREFIXES]
    counters: dict[str, list] = {}
    for e in rest:
        parts = e.path.split(".")
        if len(parts) >= 3 and isinstance(e.value, (int, float)):
            counters.setdefault(".".join(parts[:2]), []).append(e)
    # Counters repeat their leaf names (ready/started/completed under total and current);
    # hyper-parameters do not (lr, eps, weight_decay) and stay listed.
    folded = {
        k: v for k, v in counters.items()
        if len(v) > FOLD_COUNTERS and len({e.path.rsplit(".", 1)[-1] for e in v}) * 2 <= len(v)
    }  # fmt: skip
    lines: list[str] = []
    counts: dict[str, int] = {}
    done_groups: set[str] = set()
    for e in hyper + rest:
        group = ".".join(e.path.split(".")[:2])
        if group in folded and isinstance(e.value, (int, float)):
            if group not in done_groups:
                done_groups.add(group)
                values = [v.value for v in folded[group]]
                line = f"{group}.* = {len(values)} counters ({min(values):g} to {max(values):g})"
                counts[line] = 1
                lines.append(line)
            continue
        line = f"{_short_path(e.path)} = {_short_value(e.value)}"
        if line in counts:
            counts[line] += 1
            continue
        counts[line] = 1
        lines.append(line)
    out = [f"{line} (x{counts[line]})" if counts[line] > 1 else line for line in lines]
    return out[:limit], max(0, len(out) - limit)


_BRACED = re.compile(r"\{[^{}]{8,}\}")


def _short_path(path: str) -> str:
    """Lightning keys its callbacks' state by their repr (`ModelCheckpoint{'monitor': ...}`):
    the braces fold to `{…}` so the field after them stays visible."""
    return _BRACED.sub("{…}", path) if len(path) > 40 else path


def _short_value(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _module_mark(trainable: int, params: int) -> str:
    if not params:
        return ""
    if trainable == params:
        return "yes"
    return "no" if trainable == 0 else "mixed"


def _tensor_mark(t: TensorRecord) -> str:
    if t.kind != PARAMETER:
        return ""
    return "yes" if t.trainable else "no"


def _child_prefix(prefix: str, node_has_row: bool) -> str:
    return prefix.replace("├─ ", "│  ").replace("└─ ", "   ") + "  " if node_has_row else prefix


class _Folded(NamedTuple):
    """Children of one module past the report's limit, as one row with their totals."""

    first: str
    last: str
    count: int
    params: int
    trainable: int
    nbytes: int


def _folded(children: list[ModuleNode]) -> _Folded:
    stats = [c.stats for c in children]
    return _Folded(
        children[0].short_name, children[-1].short_name, len(children), sum(s.params for s in stats),
        sum(s.trainable for s in stats), sum(s.nbytes for s in stats),
    )  # fmt: skip


def _visible_nodes(root: ModuleNode, depth: int | None, pattern: str | None, max_children: int | None = None):
    """(node, tree prefix, level) in display order, depth-limited and filtered, no recursion.
    Past max_children children of one module, the rest come as one _Folded row."""
    stack: list[tuple[ModuleNode | _Folded, str, int]] = [(root, "", 0)]
    while stack:
        node, prefix, level = stack.pop()
        yield node, prefix, level
        if isinstance(node, _Folded) or (depth is not None and level >= depth):
            continue
        children: list = [c for c in node.children.values() if pattern is None or any(matches(t.name, pattern) for t in c.all_tensors())]
        if max_children is not None and len(children) > max_children:
            children = [*children[:max_children], _folded(children[max_children:])]
        base = prefix.replace("├─ ", "│  ").replace("└─ ", "   ")
        items = []
        for i, child in enumerate(children):
            branch = "└─ " if i == len(children) - 1 else "├─ "
            items.append((child, base + branch, level + 1))
        stack.extend(reversed(items))
