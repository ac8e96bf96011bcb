"""`mscope summary FILE`: the module tree, totals, entries and unsafe globals, as text (rendered
here, with rich) or JSON (summary.py)."""

from __future__ import annotations

import argparse
import gc
import re
import sys
from typing import Any, NamedTuple

from ..checkpoint import PARAMETER, Checkpoint, ModuleNode, TensorRecord
from ..errors import MscopeError, SeveralCheckpointsError
from ..readers import FORMAT_LABELS
from ..readers.gguf import fact_lines
from ..readers.peft import fact_lines as adapter_fact_lines
from ..summary import (
    AUTO_DEPTH_TENSORS,
    AUTO_MAX_CHILDREN,
    matches,
    optimizer_summaries,
    totals_line,
)
from ..units import common_prefix, fmt_bytes, fmt_count, safe_text
from . import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Bytes: each tensor's elements times its element size; a tensor saved twice under two "
        "names counts once. Views of another tensor's storage (marked 'view of') count their own "
        "size, so the file may store less: the header then says how much is stored, the figure "
        "`mscope audit` reports. Sizes are binary: KiB = 1,024 bytes, MiB = 2**20, GiB = 2**30 "
        "(JSON: bytes)."
    )
    parser.add_argument("file", help="checkpoint file or directory (sharded / DCP)")
    parser.add_argument("--json", action="store_true", help="machine-readable output (schema in README)")
    parser.add_argument(
        "--adapter", default=None, metavar="DIR", help="attach a PEFT adapter directory (adapter_config.json + weights) to FILE"
    )
    parser.add_argument("--depth", type=int, default=None, metavar="N", help="show modules down to depth N")
    parser.add_argument("--filter", default=None, metavar="GLOB", help="only tensors whose name matches GLOB")
    parser.add_argument("--wide", action="store_true", help="exact counts and full names, however wide the table gets")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace) -> int:
    from ..readers import open_checkpoint

    if args.depth is not None and args.depth < 0:
        raise MscopeError("--depth must be 0 or more")
    if common.ONE_SHOT:
        # Off for good, not paused: turning it back on makes the next allocation collect the
        # millions of objects just built (0.3 s of a 100k-tensor summary). Nothing here
        # makes cycles, and the process exits right after.
        gc.disable()
    try:
        if args.adapter:
            from ..readers.peft import open_checkpoint_with_adapter

            ckpt = open_checkpoint_with_adapter(args.file, args.adapter)
        else:
            ckpt = open_checkpoint(args.file)
    except SeveralCheckpointsError as exc:
        list_checkpoints(exc, args.json)
        return common.EXIT_BAD_INPUT  # no summary was made: a script must not take this for one
    if args.json:
        from ..gcpause import paused_gc
        from ..summary import summary_json_chunks
        from ..textout import raw_stream

        out = raw_stream(sys.stdout)  # ASCII JSON, controls escaped: the escaping pass is moot
        with paused_gc():  # hundreds of thousands of small strings, no cycles
            for chunk in summary_json_chunks(ckpt, args.depth, args.filter):
                out.write(chunk)
        out.write("\n")
    else:
        from ..textout import text_console

        render_summary(ckpt, text_console(), args.depth, args.filter, wide=args.wide)
    return common.EXIT_OK


LISTING_LABELS = {
    "zip": "torch zip (torch.save or TorchScript)",
    "index-dir": "sharded set (*.index.json)",
    "index-json": "shard index (JSON)",
}


def list_checkpoints(exc: SeveralCheckpointsError, as_json: bool) -> None:
    """A directory of separate checkpoints: one line each (format by content, size), and how to
    pick one, instead of a one-line error that names six."""
    from ..readers import sniff

    rows = []
    for path in exc.candidates:
        try:
            kind = sniff(path)
            label = LISTING_LABELS.get(kind) or FORMAT_LABELS.get(kind, str(kind))
        except (MscopeError, OSError) as err:
            label = f"unreadable: {err.message if isinstance(err, MscopeError) else err.strerror or err}"
        try:
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) if path.is_dir() else path.stat().st_size
        except OSError:
            size = None
        rows.append((path, label, size))
    if as_json:
        from ..jsonfile import compact_json

        doc = {
            "directory": exc.path,
            "error": exc.message,
            "checkpoints": [{"name": p.name, "format": label, "bytes": size} for p, label, size in rows],
        }
        sys.stdout.write(compact_json(doc) + "\n")
        return
    names = [safe_text(p.name) + ("/" if p.is_dir() else "") for p, _, _ in rows]
    width = max(map(len, names))
    lines = [f"{safe_text(exc.path)} holds {len(rows)} separate checkpoints, not one set; name one:"]
    for name, (_, label, size) in zip(names, rows):
        lines.append(f"  {name:<{width}}  {'' if size is None else fmt_bytes(size):>9}  {safe_text(label)}")
    lines.append(f"e.g. mscope summary {safe_text(str(rows[0][0]))}")
    sys.stdout.write("\n".join(lines) + "\n")


def render_summary(
    ckpt: Checkpoint, console: Any, depth: int | None = None, pattern: str | None = None, wide: bool = False
) -> None:
    """The text report, laid out for `console.width` columns (`wide`: exact counts and full names,
    however wide that makes the table)."""
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
    dtypes = [f"{k} {fmt_bytes(v)}" for k, v in totals.bytes_by_dtype.items()] or ["no tensors"]
    stored = f" ({fmt_bytes(totals.file_bytes)} stored: views share storage)" if totals.file_bytes < totals.nbytes else ""
    for line in _wrap_items([f"{totals.tensors:,} tensors · {fmt_bytes(totals.nbytes)}{stored} ·", *dtypes], console.width):
        console.print(Text(line), no_wrap=True, crop=False)

    show_tensors = depth is None and (pattern is not None or totals.tensors <= AUTO_DEPTH_TENSORS)
    max_children = None
    if depth is None and not show_tensors:
        # A chosen depth, not an asked-for one: 10,000 blocks under one module would print
        # 10,000 rows (11 s of table layout) that nobody reads.
        depth, max_children = 2, AUTO_MAX_CHILDREN
    rows = list(_rows(ckpt, depth, pattern, max_children, show_tensors))
    layout = _Layout.fit(rows, console.width, wide)
    table = Table(box=None, pad_edge=False, show_edge=False, expand=False, header_style="bold")
    table.add_column("Module / tensor", no_wrap=True, width=layout.name_width)
    # Shape and dtype are what a reader came for: their columns are as wide as their longest
    # value, never cut; the name gives way instead (indentation first, then its middle).
    table.add_column("Shape", no_wrap=True, min_width=layout.widths[0])
    table.add_column("Dtype", no_wrap=True, min_width=layout.widths[1])
    table.add_column("Train", no_wrap=True)
    table.add_column("Params", justify="right", no_wrap=True)
    table.add_column("Bytes", justify="right", no_wrap=True)
    for row, (prefix, parts) in zip(rows, layout.names(rows)):
        name = Text()
        name.append(prefix)
        for text, style in parts:
            name.append(text, style=style)
        params = row.params_compact if layout.compact_counts else row.params
        table.add_row(name, row.shape, row.dtype, row.mark, params, row.nbytes)
    if wide and layout.total > console.width:
        console.width = layout.total  # the lines are longer than the terminal: it wraps them
    console.print(table)
    if not show_tensors:
        console.print(f"[dim]{totals.tensors:,} tensors; modules to depth {depth} (--depth N or --filter GLOB shows more)[/]")
    console.print(f"[bold]{totals_line(ckpt)}[/]")
    if totals.buffers:
        console.print(f"buffers and other tensors: {totals.buffers:,} elements")
    for scheme, q in totals.quantized.items():
        bits = 8 * q["bytes"] / q["parameters"] if q["parameters"] else 0.0
        console.print(
            f"quantized {escape(safe_text(scheme))}: {q['weights']:,} weights, {fmt_count(q['parameters'])} params, "
            f"{fmt_bytes(q['bytes'])}, {bits:.2f} bits/param"
        )

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
    gguf_rows = fact_lines(ckpt)
    if gguf_rows:
        console.print("[bold]GGUF[/]")
        for label, value in gguf_rows:
            console.print(Text(f"  {label}: {safe_text(value)}"), overflow="ellipsis", no_wrap=True, crop=True)
    peft_rows = adapter_fact_lines(ckpt)
    if peft_rows:
        console.print("[bold]PEFT adapter[/]")
        for label, value in peft_rows:
            console.print(Text(f"  {label}: {safe_text(value)}"), overflow="ellipsis", no_wrap=True, crop=True)
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
    """(node, its parent, tree prefix, level) in display order, depth-limited and filtered, no recursion.
    Past max_children children of one module, the rest come as one _Folded row."""
    stack: list[tuple[ModuleNode | _Folded, ModuleNode | None, str, int]] = [(root, None, "", 0)]
    while stack:
        node, parent, prefix, level = stack.pop()
        yield node, parent, prefix, level
        if isinstance(node, _Folded) or (depth is not None and level >= depth):
            continue
        children: list = [c for c in node.children.values() if pattern is None or any(matches(t.name, pattern) for t in c.all_tensors())]
        if max_children is not None and len(children) > max_children:
            children = [*children[:max_children], _folded(children[max_children:])]
        base = prefix.replace("├─ ", "│  ").replace("└─ ", "   ")
        items = []
        for i, child in enumerate(children):
            branch = "└─ " if i == len(children) - 1 else "├─ "
            items.append((child, node, base + branch, level + 1))
        stack.extend(reversed(items))


class _Row(NamedTuple):
    group: int  # rows with the same group are siblings (children of one module)
    prefix: str  # the tree drawing
    parts: tuple[tuple[str, str], ...]  # (text, style): name, class, marker
    shape: str = ""
    dtype: str = ""
    mark: str = ""
    params: str = ""
    params_compact: str = ""
    nbytes: str = ""


def _rows(ckpt: Checkpoint, depth: int | None, pattern: str | None, max_children: int | None, show_tensors: bool):
    for node, parent, prefix, level in _visible_nodes(ckpt.tree, depth, pattern, max_children):
        if isinstance(node, _Folded):
            count = fmt_count(node.params) if node.params else "-"
            text = f"… {node.count:,} more ({safe_text(node.first)} … {safe_text(node.last)})"
            yield _Row(id(parent), prefix, ((text, "dim"),), "", "", _module_mark(node.trainable, node.params), count, count, fmt_bytes(node.nbytes))
            continue
        stats = node.stats
        if node.name or node.class_path or node.children:
            name = safe_text(node.short_name) or "(root)"
            cls = f" {safe_text(node.class_name)}" if node.class_name else ""
            count = fmt_count(stats.params) if stats.params else "-"
            parts = ((name, "bold"), (cls, "cyan")) if cls else ((name, "bold"),)
            yield _Row(id(parent), prefix, parts, "", "", _module_mark(stats.trainable, stats.params), count, count, fmt_bytes(stats.nbytes))
        if not show_tensors and (depth is not None and level >= depth):
            continue
        child_prefix = _child_prefix(prefix, bool(node.name or node.class_path or node.children))
        tensors = node.tensors
        rest = []
        if max_children is not None and len(tensors) > max_children:
            # A flat state dict keeps 100k tensors in one module: their rows (rich's table
            # layout, 1 ms each) were the 39 s of its summary. The rest is one row, as for modules.
            tensors, rest = tensors[:max_children], tensors[max_children:]
        for t in tensors:
            if t.companion_of is not None or not matches(t.name, pattern):
                continue  # a quantized weight's companions are listed under it
            if t.quant is not None:
                yield from _quant_rows(ckpt, t, node, child_prefix)
                continue
            style = "" if t.kind == PARAMETER else "dim"
            parts = [(safe_text(t.name.rsplit(".", 1)[-1]), style)]
            if t.alias_of:
                parts.append((f" = {safe_text(t.alias_of)}", style))
            elif t.tied_to:
                parts.append((f" (view of {safe_text(t.tied_to)})", "dim"))
            exact = f"{t.numel:,}" if t.kind == PARAMETER else f"({t.kind})"
            compact = fmt_count(t.numel) if t.kind == PARAMETER else f"({t.kind})"
            yield _Row(id(node), child_prefix, tuple(parts), "×".join(map(str, t.shape)) or "scalar", safe_text(t.dtype),
                       _tensor_mark(t), exact, compact, fmt_bytes(t.nbytes))  # fmt: skip
        if rest:
            params = [t for t in rest if t.kind == PARAMETER and t.alias_of is None]
            trainable = sum(t.numel for t in params if t.trainable)
            total = sum(t.numel for t in params)
            text = (f"… {len(rest):,} more tensors ({safe_text(rest[0].name.rsplit('.', 1)[-1])} … "
                    f"{safe_text(rest[-1].name.rsplit('.', 1)[-1])})")  # fmt: skip
            count = fmt_count(total) if total else "-"
            yield _Row(id(node), child_prefix, ((text, "dim"),), "", "", _module_mark(trainable, total), count, count,
                       fmt_bytes(sum(t.nbytes for t in rest if t.alias_of is None)))  # fmt: skip


def _quant_rows(ckpt: Checkpoint, t: TensorRecord, node: ModuleNode, prefix: str):
    """A quantized weight as one logical row (its logical name, shape, scheme and parameters,
    its real bytes), then its packed data and companions as stored, one level in."""
    q = t.quant
    mark = "no"  # a quantized base never trains (checkpoint.trains)
    yield _Row(id(node), prefix, ((safe_text(q.leaf), ""),), "×".join(map(str, q.logical_shape)), safe_text(q.scheme),
               mark, f"{q.logical_numel:,}", fmt_count(q.logical_numel), fmt_bytes(q.nbytes))  # fmt: skip
    inner = prefix + "  "
    # A GGML block type has no companions: the logical row says everything its packed row would.
    for name in (t.name, *q.companions) if q.companions else ():
        c = ckpt.tensor(name) or t
        leaf = name[len(q.logical_name) + 1 :] if name.startswith(q.logical_name + ".") else name.rsplit(".", 1)[-1]
        leaf = f"{leaf} (packed)" if c is t else leaf
        yield _Row(id(t), inner, ((safe_text(leaf), "dim"),), "×".join(map(str, c.shape)) or "scalar", safe_text(c.dtype),
                   "", "", "", fmt_bytes(c.nbytes))  # fmt: skip


HEADERS = ("Module / tensor", "Shape", "Dtype", "Train", "Params", "Bytes")
GAP = 2  # spaces between columns (rich: padding 1 each side, no edge padding)
MIN_NAME = len(HEADERS[0])


class _Layout(NamedTuple):
    name_width: int
    widths: tuple[int, ...]  # shape, dtype, train, params, bytes
    compact_counts: bool
    total: int

    @classmethod
    def fit(cls, rows: list[_Row], width: int, wide: bool) -> _Layout:
        """Exact counts when they fit (or `wide`), compact ones (`38.6M`) when the table would
        otherwise cut names short; the name column gets what the others leave."""
        names = max([len(HEADERS[0])] + [len(r.prefix) + sum(len(s) for s, _ in r.parts) for r in rows])

        def others(compact: bool) -> tuple[int, ...]:
            columns = (
                [r.shape for r in rows], [r.dtype for r in rows], [r.mark for r in rows],
                [r.params_compact if compact else r.params for r in rows], [r.nbytes for r in rows],
            )  # fmt: skip
            return tuple(max([len(h)] + [len(v) for v in col]) for h, col in zip(HEADERS[1:], columns))

        exact = others(False)
        if wide:
            return cls(names, exact, False, names + sum(exact) + GAP * len(exact))
        compact = names + sum(exact) + GAP * len(exact) > width
        widths = others(True) if compact else exact
        name_width = max(MIN_NAME, min(names, width - sum(widths) - GAP * len(widths)))
        return cls(name_width, widths, compact, name_width + sum(widths) + GAP * len(widths))

    def names(self, rows: list[_Row]) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
        """Each row's tree prefix and name parts, fitted to the name column: the indentation
        first (each level to one character, in every row, so the tree stays one drawing), then
        the middle of a name, keeping its end; where that would show two siblings alike, the
        part where they differ (`in_proj_weight` / `in_proj_bias`, `running_mean` / `running_var`)."""
        width = self.name_width
        if all(len(r.prefix) + _length(r.parts) <= width for r in rows):
            return [(r.prefix, r.parts) for r in rows]
        fitted = []
        for r in rows:
            prefix = _compress(r.prefix)
            room = width - len(prefix)
            parts = r.parts
            if _length(parts) > room:
                tail = _length(parts[1:])
                if room - tail < 6:  # no room for a class name or marker: the name alone
                    parts, tail = parts[:1], 0
                parts = ((_middle_ellipsis(parts[0][0], max(room - tail, 3)), parts[0][1]), *parts[1:])
            fitted.append((prefix, parts))
        _tell_siblings_apart(rows, fitted)
        return fitted


def _length(parts: tuple[tuple[str, str], ...]) -> int:
    return sum(len(s) for s, _ in parts)


def _compress(prefix: str) -> str:
    """`│  │  └─ ` as `││└─ `: one character per ancestor level."""
    out, i = [], 0
    while i + 3 <= len(prefix):
        unit = prefix[i : i + 3]
        out.append(unit if unit in ("├─ ", "└─ ") else unit[0])
        i += 3
    return "".join(out) + prefix[i:]


def _tell_siblings_apart(rows: list[_Row], fitted: list) -> None:
    """Where two siblings were shortened to the same text, show each from the first character
    where its name differs from the other's."""
    by_group: dict[tuple[int, str], list[int]] = {}
    for i, r in enumerate(rows):
        by_group.setdefault((r.group, fitted[i][1][0][0]), []).append(i)
    for same in by_group.values():
        names = {rows[i].parts[0][0] for i in same}
        if len(names) < 2:
            continue
        for i in same:
            name = rows[i].parts[0][0]
            shown, style = fitted[i][1][0]
            width = len(shown)
            start = max(common_prefix(name, rows[j].parts[0][0]) for j in same if rows[j].parts[0][0] != name)
            window = name[start:]
            text = "…" + (window if len(window) <= width - 1 else window[: width - 2] + "…")
            fitted[i] = (fitted[i][0], ((text, style), *fitted[i][1][1:]))



def _middle_ellipsis(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    head = max(1, (width - 1) // 3)
    tail = width - 1 - head
    return text[:head] + "…" + text[len(text) - tail :]


def _wrap_items(items: list[str], width: int) -> list[str]:
    """Items joined by ', ' and wrapped between items, never inside one (`48 B` stays whole)."""
    lines: list[str] = []
    line = ""
    for i, item in enumerate(items):
        sep = "" if not line else (" " if i == 1 else ", ")
        if line and len(line) + len(sep) + len(item) > width:
            lines.append(line + ("," if i > 1 else ""))
            line = item
        else:
            line += sep + item
    return [*lines, line]
