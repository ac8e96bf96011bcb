"""`mscope plan FILE [rules] -o PLAN`: a freeze plan from rules, through a Session, without the
explorer."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from ..readers.sources.location import as_location


class Step(argparse.Action):
    """Collects --freeze/--unfreeze/--freeze-class/--train-last in the order given."""

    def __call__(self, parser, namespace, values, option_string=None):
        steps = list(getattr(namespace, "steps", None) or [])
        steps.append((option_string, values))
        namespace.steps = steps


def add_arguments(plan: argparse.ArgumentParser) -> None:
    plan.add_argument("file", help="checkpoint file or directory")
    plan.add_argument(
        "--freeze",
        action=Step,
        dest="steps",
        metavar="GLOB",
        help="freeze tensors matching GLOB (repeatable)",
    )
    plan.add_argument(
        "--unfreeze",
        action=Step,
        dest="steps",
        metavar="GLOB",
        help="unfreeze tensors matching GLOB (repeatable)",
    )
    plan.add_argument(
        "--regex",
        action="store_true",
        help="--freeze/--unfreeze patterns are regular expressions (search)",
    )
    plan.add_argument(
        "--freeze-class",
        action=Step,
        dest="steps",
        metavar="NAME",
        help="freeze every module of this class",
    )
    plan.add_argument(
        "--train-last",
        action=Step,
        dest="steps",
        type=int,
        metavar="N",
        help="freeze the repeated blocks except the last N",
    )
    plan.add_argument(
        "--eval-norms",
        action="store_true",
        help="keep frozen norm layers with running statistics in eval mode",
    )
    plan.add_argument(
        "-o",
        "--output",
        default=None,
        metavar="PLAN",
        help="where to write the plan (default: FILE.freeze-plan.json next to FILE)",
    )
    plan.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing PLAN (the old one is kept as PLAN.bak)",
    )
    plan.add_argument(
        "--lora-config",
        default=None,
        metavar="OUT.json",
        help="also export the selection as a PEFT LoraConfig: OUT.json (LoraConfig(**json)) and OUT.py",
    )
    plan.add_argument("--lora-r", type=int, default=8, metavar="R", help="LoRA rank for --lora-config (8)")
    plan.add_argument("--lora-alpha", type=float, default=16, metavar="A", help="lora_alpha for --lora-config (16)")
    plan.add_argument("--lora-dropout", type=float, default=0.05, metavar="P", help="lora_dropout for --lora-config (0.05)")
    plan.add_argument("--debug", action="store_true", help="show tracebacks")
    plan.set_defaults(steps=[])


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """`mscope plan FILE [rules] -o PLAN`: build a plan through a Session and save it."""
    from ..readers import open_checkpoint
    from ..training.plan import PlanError, save_plan
    from ..training.session import Selector, Session
    from ..write.atomic import sibling_path

    out = out or sys.stdout
    dest = Path(args.output) if args.output else None
    if dest is not None and dest.exists() and not args.overwrite:
        raise PlanError("file exists", dest, "use --overwrite to replace it, or another -o")
    ckpt = open_checkpoint(args.file)
    session = Session(ckpt)
    kind = Selector.REGEX if args.regex else Selector.GLOB
    for option, value in args.steps:
        if option == "--freeze-class":
            if not session.modules_of_class(value):
                known = (
                    ", ".join(session.classes())
                    or "none: this file has no module classes (a state_dict)"
                )
                raise PlanError(f"no module of class {value!r} (classes: {known})", ckpt.path)
            result = session.freeze_class(value)
        elif option == "--train-last":
            result = session.train_last_n_blocks(value)
        else:
            result = session.freeze_pattern(value, kind, value=option == "--unfreeze")
            if not result.matched:
                raise PlanError(f"{option} {value!r} matches no tensor", ckpt.path)
        print(f"{option} {value}: {result.message}", file=out)
    if args.eval_norms:
        norms = session.frozen_norm_layers()
        if norms:
            session.set_eval_mode(norms)
            print(
                f"--eval-norms: {len(norms)} frozen norm layer(s) stay in eval: {', '.join(norms)}",
                file=out,
            )
        else:
            print("--eval-norms: no frozen norm layer with running statistics", file=out)
    print(session.totals_line(), file=out)
    dest = dest or sibling_path(as_location(args.file), "freeze-plan", ".json")
    written = save_plan(session, dest, overwrite=args.overwrite)
    print(f"wrote {written}", file=out)
    if args.lora_config:
        from ..training.peft import lora_config, save_lora_config

        export = lora_config(session, args.lora_r, args.lora_alpha, args.lora_dropout)
        for note in export.notes:
            print(f"LoraConfig: {note}", file=out)
        files = save_lora_config(export, args.lora_config, str(ckpt.path), overwrite=args.overwrite)
        print(f"LoraConfig: LoRA on {len(export.targets)} module(s), {len(export.saved)} in modules_to_save", file=out)
        print(f"wrote {files[0]} and {files[1]}", file=out)
    return 0
