"""`mscope diff A B`: compare two checkpoints tensor by tensor; the explorer in diff mode in a
terminal, text or JSON otherwise."""

from __future__ import annotations

import argparse
import gc
import os
import sys

from ..errors import MscopeError
from . import common
from .common import error, prefetch, progress_bar


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
    parser.add_argument("--debug", action="store_true", help="show tracebacks")



def run(args: argparse.Namespace) -> int:
    if common.has_terminal() and not (args.json or args.text or args.all_sections):
        return run_explorer(args)
    from ..diff import check_plan, diff_checkpoints, render_diff
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
        if not os.path.exists(path):
            raise MscopeError("no such file or directory", path)
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
