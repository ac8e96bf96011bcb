"""`mscope summary FILE`: the module tree, totals, entries and unsafe globals, as text or JSON."""

from __future__ import annotations

import argparse
import gc
import sys

from ..errors import MscopeError
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
        from ..summary import render_summary
        from ..textout import text_console

        render_summary(ckpt, text_console(), args.depth, args.filter)
    return common.EXIT_OK
