"""`mscope open FILE` (and `mscope FILE` in a terminal): the explorer."""

from __future__ import annotations

import argparse
import gc

from ..errors import MscopeError
from . import common
from .common import error, prefetch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="checkpoint file or directory")
    parser.add_argument(
        "--adapter", default=None, metavar="DIR", help="attach a PEFT adapter directory (adapter_config.json + weights) to FILE"
    )
    parser.add_argument("--interval", type=float, default=1.0, metavar="S", help="GPU panel refresh (seconds)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace) -> int:
    common.check_exists(args.file)
    if not common.has_terminal():
        # Asked for the explorer by name: say why not, rather than print something else.
        raise MscopeError(
            "the explorer needs a terminal on stdin and stdout",
            hint=f"for text output use: mscope summary {args.file}",
        )
    if args.interval <= 0:
        raise MscopeError("--interval must be more than 0 seconds")
    gc.disable()  # until the first paint (MscopeApp._resume_gc)
    future = prefetch(args.file, adapter=args.adapter)  # parse while Textual imports (the first paint waits on both)
    from ..tui.app import run_app

    code, line = run_app(args.file, gpu_interval=args.interval, prefetch=future, gc_paused=True)
    if line:
        error(line)
    return code
