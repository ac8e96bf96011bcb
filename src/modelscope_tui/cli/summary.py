"""`mscope summary FILE`: the module tree, totals, entries and unsafe globals, as text (rendered
here, with rich) or JSON (summary.py)."""

from __future__ import annotations

import argparse
import gc
import re
import sys
from typing import Any, NamedTuple

from ..checkpoint import PARAMETER, Checkpoint, ModuleNode, TensorRecord
from ..errors import MscopeError
from ..readers import FORMAT_LABELS
from ..summary import (
    AUTO_DEPTH_TENSORS,
    AUTO_MAX_CHILDREN,
    matches,
    optimizer_summaries,
    totals_line,
)
from ..units import fmt_bytes, fmt_count, safe_text
from . import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="checkpoint file or directory (sharded / DCP)")
    parser.add_argument("--json", action="store_true", help="machine-readable output (schema in README)")
    parser.add_argument("--depth", type=int, default=None, metavar="N", help="show modules down to depth N")
    parser.add_argument("--filter", default=None, metavar="GLOB", help="only tensors whose name matches GLOB")
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
    ckpt = open_checkpoint(args.file)
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

        render_summary(ckpt, text_console(), args.depth, args.filter)
    return common.EXIT_OK


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
