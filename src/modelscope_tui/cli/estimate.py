"""`mscope estimate FILE`: the memory a fine-tune needs (weights, grads, optimizer) under a
freeze plan, per precision and optimizer."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence

from ..training.estimate import PRECISIONS, MemoryEstimate, fit_line, fits
from ..units import fmt_bytes, fmt_bytes_short


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="checkpoint file or directory")
    parser.add_argument("--plan", metavar="PLAN", help="freeze plan JSON to apply first (default: as saved)")
    parser.add_argument("--precision", default=None, help="one precision (fp32, amp, bf16-mixed, fp16-mixed, bf16, fp16, as-saved)")
    parser.add_argument("--optimizer", default=None, help="one optimizer (adamw, adam, sgd-momentum, sgd, none)")
    parser.add_argument("--free", default=None, metavar="SIZE", help="free memory to check against: 24GiB (x 2**30), 512MiB, 24GB (x 10**9), or bytes")
    parser.add_argument("--lora", type=int, default=None, metavar="RANK", help="also estimate LoRA of this rank on a frozen base (QLoRA with --quantize)")
    parser.add_argument("--targets", default=None, metavar="NAMES", help="with --lora: comma-separated target modules, e.g. q_proj,v_proj (default: every linear layer)")
    parser.add_argument("--quantize", default=None, choices=("nf4", "fp4", "int8"), help="with --lora: the base's linear layers quantized by bitsandbytes (nf4/fp4 with double quantization, as QLoRA)")
    parser.add_argument("--strict", action="store_true", help="with --plan: a plan made for another model (names, shapes, dtypes) is an error")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace) -> int:
    from ..readers import open_checkpoint
    from ..training import estimate as est
    from ..training.session import Session

    if args.precision or args.optimizer:  # a typo is one error line, before any output
        est.estimate([], args.precision or "fp32", args.optimizer or "adamw")
    if args.lora is None and (args.targets or args.quantize):
        raise est.EstimateError("--targets and --quantize describe a LoRA run: add --lora RANK")
    if args.lora is not None and args.lora < 1:
        raise est.EstimateError(f"--lora must be a rank of 1 or more, not {args.lora}")
    free = None
    if args.free:
        from ..training.devicemap import parse_size

        free = parse_size(args.free)
    session = Session(open_checkpoint(args.file))
    if args.plan:
        from ..training.apply import apply_plan_to_session

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
    print(session.totals_line())
    if args.precision or args.optimizer:
        print(render_text(est.estimate_for_session(session, args.precision or "fp32", args.optimizer or "adamw"), free))
    else:
        print(render_table(est.estimate_table(session), free))
    if args.lora is not None:
        targets = tuple(t.strip() for t in (args.targets or "").split(",") if t.strip())
        precisions = [args.precision] if args.precision else None
        optimizers = [args.optimizer] if args.optimizer else None
        rows, plan = est.lora_estimate_table(session, args.lora, targets, args.quantize, precisions, optimizers)
        print()
        print(lora_header(plan))
        print(render_table(rows, free))
    return 0


def lora_header(plan) -> str:
    """What the LoRA table below it estimates, in two lines."""
    from ..units import fmt_count, safe_text

    kind = "QLoRA" if plan.quantize or plan.base_quantized_bytes else "LoRA"
    where = ", ".join(safe_text(t) for t in plan.targets) if plan.targets else "every linear layer"
    pct = 100.0 * plan.adapter_params / (plan.base_params + plan.adapter_params) if plan.base_params else 0.0
    base = ", ".join(f"{safe_text(k)} {fmt_bytes(v)}" for k, v in plan.base_quantized_bytes.items())
    return (
        f"{kind} rank {plan.rank} on {plan.modules:,} module(s) ({where}): {fmt_count(plan.adapter_params)} "
        f"trainable ({pct:.2f}%)\nbase frozen, {fmt_count(plan.base_params)} params"
        + (f"; quantized {base}" if base else "; not quantized")
    )


def render_text(est: MemoryEstimate, free_bytes: int | None = None) -> str:
    """A multi-line report for the CLI (fits 80 columns)."""
    spec = PRECISIONS[est.precision]
    what = "inference (weights only)" if not est.training else f"training with {est.optimizer}"
    lines = [f"{est.precision}: {spec.label}; {what}"]
    for label, nbytes in est.components():
        lines.append(f"  {label:<28} {fmt_bytes(nbytes):>12}  {nbytes:>18,} B")
    lines.append(f"  {'total':<28} {fmt_bytes(est.total):>12}  {est.total:>18,} B")
    if est.step_scratch:
        lines.append(f"  {'peak during the step':<28} {fmt_bytes(est.peak):>12}  {est.peak:>18,} B")
    pct = 100.0 * est.trainable / est.parameters if est.parameters else 0.0
    lines.append(f"  trainable {est.trainable:,} of {est.parameters:,} parameters ({pct:.1f}%)")
    if est.buffers:
        lines.append(f"  buffers {est.buffers:,} elements")
    if free_bytes is not None:
        lines.append(f"  {fit_line(est, free_bytes)} (of {fmt_bytes(free_bytes)} free)")
    for note in est.notes:
        lines.extend(textwrap.wrap(note, 80, initial_indent="  note: ", subsequent_indent=" " * 8))
    return "\n".join(lines)


TABLE_FOOTER = (
    "total: held between steps; peak: during the optimizer step (torch's default Adam",
    "makes one temporary per parameter). Model states only: activations (batch x",
    "sequence length), the CUDA context and allocator overhead are not included",
)
TABLE_HEADER = ("precision", "optimizer", "weights", "grads", "master", "optim", "total", "peak")


def render_table(rows: Sequence[MemoryEstimate], free_bytes: int | None = None) -> str:
    """The estimate_table() rows as an aligned text table (at most 80 columns)."""
    header = list(TABLE_HEADER) + (["fits"] if free_bytes is not None else [])
    body = []
    for est in rows:
        cells = [
            est.precision,
            est.optimizer,
            fmt_bytes_short(est.weights),
            _dash(est.gradients),
            _dash(est.master_weights),
            _dash(est.optimizer_states),
            fmt_bytes_short(est.total),
            fmt_bytes_short(est.peak),
        ]
        if free_bytes is not None:
            cells.append("yes" if fits(est, free_bytes)[0] else "no")
        body.append(cells)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    # Two spaces between columns; one between the sizes where two would pass 80 columns (six
    # 7-wide `2.4 GiB` cells and the fits column): each size ends in its unit, so they stay apart.
    gap = "  " if sum(widths) + 2 * (len(widths) - 1) <= 80 else " "
    out = []
    for cells in [header, *body]:
        names = "  ".join(f"{c:<{w}}" for c, w in zip(cells[:2], widths[:2]))
        sizes = gap.join(f"{c:>{w}}" for c, w in zip(cells[2:8], widths[2:8]))
        fit = "".join(f"  {c:>{w}}" for c, w in zip(cells[8:], widths[8:]))
        out.append(f"{names}  {sizes}{fit}".rstrip())
    notes = list(TABLE_FOOTER)
    if free_bytes is not None:
        notes.insert(0, f"fits: the peak against {fmt_bytes(free_bytes)} free")
    return "\n".join(out + notes)


def _dash(nbytes: int) -> str:
    return fmt_bytes_short(nbytes) if nbytes else "-"
