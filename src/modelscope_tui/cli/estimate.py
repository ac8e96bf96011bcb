"""`mscope estimate FILE`: the memory a fine-tune needs (weights, grads, optimizer) under a
freeze plan, per precision and optimizer."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="checkpoint file or directory")
    parser.add_argument("--plan", metavar="PLAN", help="freeze plan JSON to apply first (default: as saved)")
    parser.add_argument("--precision", default=None, help="one precision (fp32, amp, bf16-mixed, fp16-mixed, bf16, fp16, as-saved)")
    parser.add_argument("--optimizer", default=None, help="one optimizer (adamw, adam, sgd-momentum, sgd, none)")
    parser.add_argument("--free", default=None, metavar="SIZE", help="free memory to check against, e.g. 24GiB")
    parser.add_argument("--strict", action="store_true", help="with --plan: a plan made for another model (names, shapes, dtypes) is an error")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace) -> int:
    from .. import estimate as est
    from ..readers import open_checkpoint
    from ..session import Session

    if args.precision or args.optimizer:  # a typo is one error line, before any output
        est.estimate([], args.precision or "fp32", args.optimizer or "adamw")
    session = Session(open_checkpoint(args.file))
    if args.plan:
        from ..freeze import apply_plan_to_session

        report = apply_plan_to_session(session, args.plan, strict=args.strict)
        # A plan made for another model must not pass as "already matches": every mismatch
        # is a warning line on stderr (names the plan has that this file lacks, and back, and
        # shape or dtype changes); --strict makes it an error.
        for line in report.warnings:
            print(f"mscope: warning: {line.strip()}", file=sys.stderr)
        if report.fingerprint_match is False and report.not_in_plan:
            print(
                f"mscope: warning: {len(report.not_in_plan)} parameter(s) of this file are not in the plan, "
                f"e.g. {report.not_in_plan[0]!r}",
                file=sys.stderr,
            )
        print(report.message)
    free = None
    if args.free:
        from ..devicemap import parse_size

        free = parse_size(args.free)
    print(session.totals_line())
    if args.precision or args.optimizer:
        print(est.render_text(est.estimate_for_session(session, args.precision or "fp32", args.optimizer or "adamw"), free))
    else:
        print(est.render_table(est.estimate_table(session), free))
    return 0
