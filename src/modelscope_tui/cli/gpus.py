"""`mscope gpus`: GPU memory, load and processes (NVML), once, or --watch."""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import MscopeError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..gpu import SCHEMA, SCHEMA_VERSION

    parser.add_argument(
        "--json",
        action="store_true",
        help=f"machine-readable output (schema {SCHEMA} v{SCHEMA_VERSION})",
    )
    parser.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds between refreshes (default 1)",
    )
    parser.add_argument(
        "--count", type=int, default=None, metavar="N", help="with --watch: stop after N refreshes"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")



def run(args: argparse.Namespace) -> int:
    """Exit 0 in every GPU state (no GPU is a valid answer); 2 for bad arguments."""
    from ..gpu import GpuMonitor, render_sample, sample_to_dict
    from ..jsonfile import compact_json

    if not args.interval > 0 or args.interval > 3600:
        raise MscopeError("--interval must be a number of seconds above 0 (at most 3600)")
    if args.count is not None and args.count < 1:
        raise MscopeError("--count must be 1 or more")
    monitor = GpuMonitor.from_env(interval=args.interval)
    try:
        if args.json and not args.watch:
            sys.stdout.write(
                compact_json(sample_to_dict(monitor.sample())) + "\n"
            )
            return 0
        if args.json:
            n = 0
            while True:
                s = monitor.sample()
                sys.stdout.write(
                    compact_json(sample_to_dict(s, monitor)) + "\n"
                )
                sys.stdout.flush()
                n += 1
                if args.count is not None and n >= args.count:
                    return 0
                time.sleep(args.interval)
        from ..textout import text_console

        console = text_console()
        if not args.watch:
            console.print(render_sample(monitor.sample(), monitor))
            return 0
        n = 0
        if not console.is_terminal:
            # Piped (`| tee`, a log): rich's Live would hold every frame until exit. Print each
            # frame as it comes, flushed, with a blank line between.
            try:
                while True:
                    console.print(render_sample(monitor.sample(), monitor))
                    console.file.flush()
                    n += 1
                    if args.count is not None and n >= args.count:
                        return 0
                    console.print()
                    time.sleep(args.interval)
            except (KeyboardInterrupt, BrokenPipeError):
                return 0
        from rich.live import Live

        try:
            with Live(console=console, auto_refresh=False, transient=False) as live:
                while True:
                    s = monitor.sample()
                    live.update(render_sample(s, monitor), refresh=True)
                    n += 1
                    if args.count is not None and n >= args.count:
                        break
                    time.sleep(args.interval)
        except KeyboardInterrupt:
            pass
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        monitor.close()
