"""`mscope audit FILE`: integrity, load-ability, waste; --stats reads every value."""

from __future__ import annotations

import argparse
import sys

from ..errors import MscopeError
from .common import progress_bar


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..audit import DEFAULT_CHUNK_BYTES, DEFAULT_FAIL_ON, FAIL_ON_CHOICES

    parser.add_argument("file", help="checkpoint file or directory (sharded / DCP)")
    parser.add_argument(
        "--json", action="store_true", help="machine-readable output (docs/audit-schema.md)"
    )
    parser.add_argument(
        "--stats", action="store_true", help="read every value: statistics, NaN/Inf, duplicates"
    )
    parser.add_argument(
        "--all-stats", action="store_true", help="with --stats: a row for every tensor in the text"
    )
    parser.add_argument(
        "--dedupe",
        action="store_true",
        help="find duplicated tensors without --stats (reads candidates)",
    )
    parser.add_argument(
        "--crc", action="store_true", help="check every zip member's CRC-32 (reads the whole file)"
    )
    parser.add_argument(
        "--fail-on",
        default=",".join(DEFAULT_FAIL_ON),
        metavar="LIST",
        help=f"exit 1 when a finding of these kinds is found (default {','.join(DEFAULT_FAIL_ON)}; "
        f"'none' never fails; choices: {', '.join(FAIL_ON_CHOICES)})",
    )
    parser.add_argument("--chunk-mb", type=float, default=DEFAULT_CHUNK_BYTES / (1 << 20), metavar="MB",
                        help="bytes read per chunk and thread (memory bound; default 2)")  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N", help="worker threads for --stats"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")



def run(args: argparse.Namespace) -> int:
    from ..audit import audit_path, parse_fail_on, render_audit

    fail_on = parse_fail_on(args.fail_on)
    if args.chunk_mb <= 0 or (args.threads is not None and args.threads < 1):
        raise MscopeError("--chunk-mb must be more than 0 and --threads at least 1")
    with progress_bar("reading") as progress:
        report = audit_path(
            args.file,
            stats=args.stats,
            dedupe=args.dedupe,
            crc=args.crc,
            fail_on=fail_on,
            chunk_bytes=max(4096, int(args.chunk_mb * (1 << 20))),
            threads=args.threads,
            progress=progress,
        )
    if args.json:
        sys.stdout.write(report.to_json())
        sys.stdout.write("\n")
    else:
        from ..textout import text_console

        render_audit(report, text_console(), all_stats=getattr(args, "all_stats", False))
    return report.exit_code
