"""`mscope apply-plan PLAN [--var model]`: print the plain-PyTorch snippet that applies a plan."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO


def add_arguments(apply: argparse.ArgumentParser) -> None:
    apply.add_argument("plan", help="freeze plan JSON (from `mscope plan` or the explorer)")
    apply.add_argument(
        "--var", default="model", help="name of the model variable in your script (default: model)"
    )
    apply.add_argument(
        "--strict",
        action="store_true",
        help="the snippet raises (instead of warning) when the model does not match the plan's fingerprint",
    )
    apply.add_argument("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """`mscope apply-plan PLAN [--var model]`: print the plain-PyTorch snippet."""
    from ..training.fingerprint import FingerprintCheck, FingerprintStatus
    from ..training.plan import read_plan
    from ..training.snippet import plan_snippet
    from ..units import safe_text

    data, source = read_plan(args.plan)
    if data["checkpoint"].get("fingerprint") is None:
        label = Path(source).name if source else "the plan"
        print(
            f"mscope: warning: {safe_text(FingerprintCheck(FingerprintStatus.ABSENT).summary(label))}", file=sys.stderr
        )
    (out or sys.stdout).write(plan_snippet(data, var=args.var, strict=args.strict))
    return 0
