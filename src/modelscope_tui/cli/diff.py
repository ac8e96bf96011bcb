"""`mscope diff A B`: compare two checkpoints tensor by tensor; the explorer in diff mode in a
terminal, text (rendered here) or JSON otherwise."""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
from typing import TYPE_CHECKING, Any

from ..errors import MscopeError
from ..units import fmt_bytes
from . import common
from .common import error, prefetch, progress_bar

if TYPE_CHECKING:
    from ..diff.report import DiffReport


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file_a", metavar="A", help="checkpoint before (file or directory)")
    parser.add_argument("file_b", metavar="B", help="checkpoint after (any format)")
    parser.add_argument(
        "--json", action="store_true", help="machine-readable output (docs/audit-schema.md)"
    )
    parser.add_argument(
        "--atol", type=float, default=1e-8, help="absolute tolerance (default 1e-8)"
    )
    parser.add_argument(
        "--rtol", type=float, default=1e-5, help="relative tolerance (default 1e-5)"
    )
    parser.add_argument(
        "--plan",
        metavar="PLAN",
        help="freeze plan: check its frozen parameters stayed bit-identical",
    )
    parser.add_argument(
        "--all-sections",
        action="store_true",
        help="also compare optimizer and other sections (prints text)",
    )
    parser.add_argument(
        "--text",
        action="store_true",
        help="print the report even in a terminal (default there: the explorer in diff mode)",
    )
    parser.add_argument(
        "--depth", type=int, default=2, metavar="N", help="modules shown down to depth N (text)"
    )
    parser.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="compare the values on a Dask cluster, e.g. tcp://host:8786, and print the report "
        "(default $MSCOPE_DASK; docs/dask.md)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace) -> int:
    if common.has_terminal() and not (args.json or args.text or args.all_sections or args.dask is not None):
        return run_explorer(args)
    from ..diff.plan import check_plan
    from ..diff.stream import diff_checkpoints
    from ..readers import open_checkpoint

    if args.atol < 0 or args.rtol < 0:
        raise MscopeError("--atol and --rtol must be 0 or more")
    a = open_checkpoint(args.file_a, strict=False)
    b = open_checkpoint(args.file_b, strict=False)
    if args.plan:
        from ..training.plan import load_plan

        load_plan(args.plan)  # a bad plan fails before the long pass
    with progress_bar("comparing") as progress:
        report = diff_checkpoints(
            a,
            b,
            args.atol,
            args.rtol,
            progress=progress,
            sections="all" if args.all_sections else "model",
            dask=args.dask if args.dask is not None else (os.environ.get("MSCOPE_DASK") or None),
        )
    if args.plan:
        check = check_plan(report, args.plan, a)
        for line in check.fingerprint:  # a plan made for another model is never silent
            print(f"mscope: warning: {line.strip()}", file=sys.stderr)
    if args.json:
        sys.stdout.write(report.to_json())
        sys.stdout.write("\n")
    else:
        from ..textout import text_console

        render_diff(report, text_console(), args.depth)
    return report.exit_code


def run_explorer(args: argparse.Namespace) -> int:
    """`mscope diff A B` in a terminal: the explorer on B in diff mode against A (the tree first,
    from metadata; values compared in a worker). --json, --text or --all-sections print instead."""
    if args.atol < 0 or args.rtol < 0:
        raise MscopeError("--atol and --rtol must be 0 or more")
    for path in (args.file_a, args.file_b):
        common.check_exists(path)
    if args.plan:
        from ..training.plan import load_plan

        load_plan(args.plan)  # a bad plan fails before the explorer starts
    # Both files parse while Textual imports; like the text diff, damaged files still compare.
    gc.disable()  # until the first paint (MscopeApp._resume_gc)
    prefetch_b = prefetch(args.file_b, strict=False)
    prefetch_a = prefetch(args.file_a, strict=False)
    from ..tui.app import run_app

    code, line = run_app(
        args.file_b,
        prefetch=prefetch_b,
        compare=args.file_a,
        compare_prefetch=prefetch_a,
        gc_paused=True,
        atol=args.atol,
        rtol=args.rtol,
        plan=args.plan,
    )
    if line:
        error(line)
    return code


def render_diff(report: DiffReport, console: Any, depth: int = 2, limit: int = 20) -> None:
    """The text report: per-module table to `depth`, then changed, renamed, added, removed and
    requires_grad-changed tensors (`limit` each), the plan check, and the summary line."""
    from rich.table import Table

    from ..diff.report import (
        ADDED,
        CHANGED,
        CLOSE,
        DTYPE_CHANGED,
        IDENTICAL,
        REMOVED,
        RENAMED,
        SHAPE_CHANGED,
        UNREADABLE,
        describe,
        grad_word,
    )
    from ..textout import safe_markup as escape  # text from files: controls, then markup

    console.print(
        f"[bold]A[/] {escape(report.a_path.name)} ({report.a_format}) → [bold]B[/] {escape(report.b_path.name)} "
        f"({report.b_format}) · atol {report.atol:g}, rtol {report.rtol:g}"
    )
    for n in report.notes:
        console.print(f"[dim]{escape(n)}[/]")
    style = {IDENTICAL: "green", CLOSE: "cyan", CHANGED: "yellow", ADDED: "blue", REMOVED: "red"}
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    table.add_column("module", no_wrap=True, overflow="ellipsis", max_width=40)
    for col in ("tensors", "identical", "changed", "added", "removed", "rel Δ", "max |Δ|"):
        table.add_column(col, justify="right", no_wrap=True)
    for m in report.modules:
        level = m.name.count(".") + 1 if m.name else 0
        if level > depth:
            continue
        indent = "  " * level
        table.add_row(
            f"[{style.get(m.status, '')}]{indent}{escape(m.name.rsplit('.', 1)[-1] or '(model)')}[/]",
            str(m.tensors), str(m.identical), str(m.changed), str(m.added), str(m.removed),
            "-" if m.rel_l2 is None else f"{m.rel_l2:.3g}", f"{m.max_abs:.3g}",
        )  # fmt: skip
    console.print(table)
    moved = sorted(
        (
            d
            for d in report.tensors
            if d.status in (CLOSE, CHANGED, DTYPE_CHANGED, SHAPE_CHANGED, UNREADABLE)
        ),
        key=lambda d: -(d.rel_l2 if d.rel_l2 is not None and math.isfinite(d.rel_l2) else math.inf),
    )
    for title, items in (
        ("changed", moved),
        ("renamed", [d for d in report.tensors if d.status == RENAMED]),
        ("added", [d for d in report.tensors if d.status == ADDED]),
        ("removed", [d for d in report.tensors if d.status == REMOVED]),
    ):
        if not items:
            continue
        console.print(f"[bold]{title}[/] ({len(items):,})")
        for d in items[:limit]:
            if d.status == RENAMED:
                text = f"{d.a_name} → {d.b_name}"
            elif d.status in (ADDED, REMOVED):
                shape = d.b_shape if d.status == ADDED else d.a_shape
                dtype = d.b_dtype if d.status == ADDED else d.a_dtype
                text = f"{d.name} {list(shape or ())} {dtype}"
            else:
                text = f"{d.name}: {describe(d)}"
            console.print(f"  {escape(text)}", overflow="ellipsis", no_wrap=True, crop=True)
        if len(items) > limit:
            console.print(f"  [dim]... {len(items) - limit:,} more (--json lists all)[/]")
    grads = report.grad_changes
    if grads:
        console.print(f"[bold]requires_grad changed[/] ({len(grads):,})")
        for d in grads[:limit]:
            name = d.b_name if d.a_name == d.b_name or d.a_name is None else f"{d.a_name} → {d.b_name}"
            text = f"{name}: {grad_word(d.a_requires_grad)} → {grad_word(d.b_requires_grad)}"
            console.print(f"  {escape(text)}", overflow="ellipsis", no_wrap=True, crop=True)
        if len(grads) > limit:
            console.print(f"  [dim]... {len(grads) - limit:,} more (--json lists all)[/]")
    if report.plan is not None:
        color = "green" if report.plan.ok else "bold red"
        for line in report.plan.lines():
            console.print(f"[{color}]{escape(line)}[/]")
    console.print(
        f"[bold]{escape(report.summary_line())}[/] [dim]({fmt_bytes(report.bytes_read)} read in {report.seconds:.2f} s)[/]"
    )
