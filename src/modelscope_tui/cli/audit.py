"""`mscope audit FILE`: integrity, load-ability, waste; --stats reads every value. The arguments,
the run, and the text report (rich, imported when the report is printed)."""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from typing import Any

from ..audit.findings import (
    DEFAULT_FAIL_ON,
    ERROR,
    FAIL_ON_CHOICES,
    INFO,
    WARNING,
    AuditReport,
    parse_fail_on,
    sorted_findings,
)
from ..errors import MscopeError
from ..units import fmt_bytes, shorten, sparkline
from ..values.stats import DEFAULT_CHUNK_BYTES
from .common import progress_bar


def add_arguments(parser: argparse.ArgumentParser) -> None:

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
    parser.add_argument("--chunk-mb", default=f"{DEFAULT_CHUNK_BYTES >> 20}MiB", metavar="SIZE",
                        help="read per chunk and thread (bounds memory): a bare number is MiB (2**20 bytes), "
                        "or 512KiB, 4MiB, 4MB (x 10**6); default 2MiB")  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N", help="worker threads for --stats"
    )
    parser.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="with --stats: read the values on a Dask cluster, e.g. tcp://host:8786 "
        "(default $MSCOPE_DASK; docs/dask.md)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace) -> int:
    from ..audit.runner import audit_path
    from ..training.devicemap import parse_size

    fail_on = parse_fail_on(args.fail_on)
    try:
        chunk_bytes = parse_size(args.chunk_mb, bare=1 << 20)
    except MscopeError as exc:
        raise MscopeError(f"--chunk-mb: {exc.message}", hint=exc.hint) from None
    if chunk_bytes <= 0 or (args.threads is not None and args.threads < 1):
        raise MscopeError("--chunk-mb must be more than 0 and --threads at least 1")
    if args.dask is not None and not args.stats:
        raise MscopeError("--dask needs --stats (the statistics are what a cluster reads)")
    with progress_bar("reading") as progress:
        report = audit_path(
            args.file,
            stats=args.stats,
            dedupe=args.dedupe,
            crc=args.crc,
            fail_on=fail_on,
            chunk_bytes=max(4096, chunk_bytes),
            threads=args.threads,
            progress=progress,
            dask=args.dask if args.dask is not None else (os.environ.get("MSCOPE_DASK") or None),
        )
    if args.json:
        sys.stdout.write(report.to_json())
        sys.stdout.write("\n")
    else:
        from ..textout import text_console

        render_audit(report, text_console(), all_stats=getattr(args, "all_stats", False))
    return report.exit_code


def render_audit(report: AuditReport, console: Any, limit: int = 40, all_stats: bool = False) -> None:
    """The text report: errors and warnings, notes (init-like 1-D tensors counted, not listed),
    the add_safe_globals line, statistics of flagged and largest tensors, the verdict last."""
    from rich.table import Table

    from ..textout import safe_markup as escape  # text from files: controls, then markup

    name = report.path.name
    console.print(
        f"[bold]{escape(name)}[/] · {report.format} · {report.tensors:,} tensors · {fmt_bytes(report.file_bytes)}"
    )
    style = {ERROR: "bold red", WARNING: "yellow", INFO: "dim"}
    folded = Counter(
        f.code for f in report.findings if f.severity == INFO and f.code in ("all-zero", "constant")
    )
    findings = [
        f for f in sorted_findings(report.findings) if not (f.severity == INFO and f.code in folded)
    ]
    shown = findings[:limit]
    if shown:
        table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
        table.add_column("", no_wrap=True)
        table.add_column("code", no_wrap=True)
        table.add_column("finding", overflow="fold")
        for f in shown:
            table.add_row(
                f"[{style.get(f.severity, '')}]{f.severity}[/]", f.code, escape(f.message)
            )
        console.print(table)
        if len(findings) > len(shown):
            console.print(
                f"[dim]... {len(findings) - len(shown)} more findings (--json lists all)[/]"
            )
    if folded:
        what = " and ".join(
            f"{n} {'all-zero' if c == 'all-zero' else 'constant'}" for c, n in folded.items()
        )
        console.print(
            f"[dim]notes: {what} 1-D tensor(s) (biases / norm weights as initialised; --json lists them)[/]"
        )
    line = report.loadability.get("add_safe_globals")
    if line and not report.loadability.get("dangerous_globals"):
        console.print("[bold]to load with weights_only=True[/] (only if you trust the file):")
        console.print(f"  {escape(line)}", soft_wrap=True)
    if report.stats_requested and report.stats:
        info = report.stats_info
        console.print(
            f"[bold]statistics[/]: {len(report.stats):,} tensors, {fmt_bytes(info.get('bytes_read', 0))} "
            f"read in {info.get('seconds', 0):.2f} s ({info.get('threads')} thread(s))"
        )
        loud = {f.tensor for f in report.findings if f.severity != INFO and f.tensor}
        flagged = [s for s in report.stats.values() if s.name in loud]
        biggest = [
            s for s in sorted(report.stats.values(), key=lambda s: -s.numel) if s.name not in loud
        ]
        rows = flagged + biggest if all_stats else flagged[:20] + biggest[: max(3, 10 - len(flagged))]
        # Numbers are never cut (at 80 columns they came out as "-0.1…"): their columns take
        # what they need and the tensor name gives way, shortened in the middle.
        heads: tuple[str, ...] = ("min", "max", "mean", "std", "norm", "zeros", "flags")
        cells = [
            [fmt_g(s.min), fmt_g(s.max), fmt_g(s.mean), fmt_g(s.std), fmt_g(s.norm), f"{100 * s.zero_fraction:.1f}%", ",".join(s.flags)]
            for s in rows
        ]  # fmt: skip
        if not any(c[-1] for c in cells):  # no flags: the names get the room
            heads, cells = heads[:-1], [c[:-1] for c in cells]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
        # Optimizer state by its parameter (`features.3.weight · exp_avg`) where the file says
        # which one it is; the raw `optimizer/state.4.exp_avg` otherwise.
        labels = [stat_label(s.name, report.param_names) for s in rows]
        longest = max(len("tensor"), *(len(n) for n in labels))
        name_width = max(12, min(longest, console.width - sum(widths) - 2 * len(heads)))
        table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
        table.add_column("tensor", no_wrap=True, max_width=name_width)
        for head, width in zip(heads, widths):
            table.add_column(head, no_wrap=True, min_width=width, justify="left" if head == "flags" else "right")
        shown = under_parameters([s.name for s in rows], fit_names(labels, name_width), report.param_names)
        for label, c in zip(shown, cells):
            table.add_row(escape(label), *c)
        console.print(table)
        if len(rows) < len(report.stats):
            console.print(
                f"[dim]{len(rows):,} of {len(report.stats):,} tensors shown (flagged, then largest);"
                " --all-stats lists all[/]"
            )
        for prof in report.norm_profile[:3]:
            norms = [r["norm"] for r in prof["layers"]]
            console.print(
                f"norm profile of {escape(prof['container'])} ({len(norms)} layers): "
                f"{sparkline(norms, fit=True, floor=True)}  min {min(norms):.4g}, max {max(norms):.4g}"
            )
    color = (
        "green"
        if report.ok and not report.counts()[ERROR]
        else ("red" if not report.ok else "yellow")
    )
    console.print(f"[bold {color}]{escape(report.verdict_line())}[/]")


def stat_label(name: str, param_names: dict[str, tuple[str, str]]) -> str:
    param = param_names.get(name)
    return f"{param[0]} · {param[1]}" if param else name


def under_parameters(names: list[str], labels: list[str], param_names: dict[str, tuple[str, str]]) -> list[str]:
    """Optimizer state listed right after its parameter's row drops the parameter's name and
    hangs under it (`  ├ exp_avg`, `  └ exp_avg_sq`): at 80 columns the full label left
    `f.3.weig… exp_avg`."""
    out = list(labels)
    owner: str | None = None  # the parameter whose rows the previous row belongs to
    for i, name in enumerate(names):
        param = param_names.get(name)
        if param is not None and param[0] == owner:
            last = i + 1 == len(names) or (param_names.get(names[i + 1]) or ("",))[0] != owner
            out[i] = f"  {'└' if last else '├'} {param[1]}"
        else:
            owner = param[0] if param is not None else name
    return out


def fit_names(names: list[str], width: int) -> list[str]:
    """Each dotted name in `width` columns, no two alike: module names shortened to their first
    letter from the left, numbers and the last part kept (`m.e.layers.0.self_attn.in_proj_weight`
    -> `m.e.l.0.s.in_proj_weight`), so layer numbers stay visible, unless that makes two names
    alike (`features.3.weight`, `fc.3.weight`); then units.shorten against the others."""
    if all(len(n) <= width for n in names):
        return names
    short = [abbreviate(n, width) for n in names]
    if len(set(short)) < len(set(names)):
        short = names
    return [shorten(n, width, short) for n in short]


def fit_name(name: str, width: int) -> str:
    return fit_names([name], width)[0]


def abbreviate(name: str, width: int) -> str:
    """`name` with module names cut to their first letter, left to right, until it fits (or all are)."""
    if len(name) <= width:
        return name
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if len(parts[i]) > 1 and not parts[i].isdigit():
            parts[i] = parts[i][0]
            short = ".".join(parts)
            if len(short) <= width:
                return short
    return ".".join(parts)


def fmt_g(x: float | None) -> str:
    """A statistic in a table cell: 4 significant digits, '-' when there is none."""
    return "-" if x is None else f"{x:.4g}"

