"""`mscope gpus`: GPU memory, load and processes (NVML), once, or --watch, and its text.

Importing this module stays cheap (the schema names and the NA helpers only): the monitor and
rich come in when the command runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import MscopeError
from ..gpu.na import NA, na_or
from ..gpu.schema import SCHEMA, SCHEMA_VERSION
from ..units import fmt_bytes, safe_text, sparkline

if TYPE_CHECKING:
    from ..gpu.monitor import GpuMonitor
    from ..gpu.snapshot import GpuSample, GpuSnapshot


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    from ..gpu.monitor import GpuMonitor
    from ..gpu.schema import sample_to_dict
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


# -- text (rich, imported when a frame is drawn) ----------------------------------------------


def _pct(value: Any) -> str:
    return na_or(value, lambda v: f"{v}%")


def _watts(value: Any) -> str:
    return na_or(value, lambda v: f"{v:.0f}")


def gpu_lines(g: GpuSnapshot, history: Sequence[int] = ()) -> list[tuple[str, str]]:
    """(label, text) rows describing one GPU: what the CLI prints and a panel can reuse."""
    from ..gpu.backend import LOST_STATUS  # the backends' words; loaded with the monitor anyway

    rows: list[tuple[str, str]] = [("id", f"{na_or(g.uuid)}  bus {na_or(g.pci_bus_id)}")]
    if g.lost or g.status:
        rows.append(("status", g.status or LOST_STATUS))
        if g.lost:
            return rows
    frac = g.memory_fraction
    mem = f"{na_or(g.memory_used, fmt_bytes)} / {na_or(g.memory_total, fmt_bytes)}"
    if frac is not NA:
        mem += f" ({frac * 100:.0f}%)"
    if history:
        mem += "  " + sparkline(
            history, 16, top=g.memory_total if g.memory_total is not NA else None
        )
    rows.append(("memory", mem))
    rows.append(
        (
            "",
            f"reserved {na_or(g.memory_reserved, fmt_bytes)}  free {na_or(g.memory_free, fmt_bytes)}",
        )
    )
    rows.append(
        (
            "load",
            f"gpu {_pct(g.util_gpu)}  mem {_pct(g.util_memory)}  {na_or(g.temperature, lambda v: f'{v}°C')}"
            f"  power {_watts(g.power_draw)} / {_watts(g.power_limit)} W",
        )
    )
    if g.torch_memory is not None:
        t = g.torch_memory
        rows.append(
            (
                "torch",
                f"allocated {fmt_bytes(t.allocated)}  reserved {fmt_bytes(t.reserved)}"
                f"  peak {fmt_bytes(t.max_allocated)}",
            )
        )
    if g.mig_mode is not NA:
        rows.append(("MIG", "on" if g.mig_mode else "off"))
    for m in g.mig_devices:
        where = f"cuda:{m.cuda_index}" if m.cuda_index is not None else "-"
        rows.append(
            (
                f"  mig {m.index}",
                f"{where}  {na_or(m.memory_used, fmt_bytes)} / {na_or(m.memory_total, fmt_bytes)}"
                f"  gi {na_or(m.gpu_instance_id)} ci {na_or(m.compute_instance_id)}",
            )
        )
    if not g.processes:
        rows.append(("processes", "none"))
    for p in g.processes[:8]:
        me = " (this process)" if p.is_self else ""
        name = safe_text(na_or(p.name))  # another user's process names its own command line
        if len(name) > 28:
            name = name[:27] + "…"
        rows.append(
            (
                "processes" if p is g.processes[0] else "",
                f"{p.pid:>7}  {name}{me}  {na_or(p.used_memory, fmt_bytes)}",
            )
        )
    if len(g.processes) > 8:
        rows.append(("", f"… {len(g.processes) - 8} more"))
    return rows


def render_sample(sample: GpuSample, monitor: GpuMonitor | None = None) -> Any:
    """A rich renderable: the status line, then one compact table per GPU (≤ 80 columns)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = [Text(sample.status, style="bold" if sample.ok else "bold yellow")]
    if not sample.ok:
        parts.append(Text(sample.host.line()))
        return Group(*parts)
    note = sample.cuda_mapping.note
    if note:
        parts.append(Text(f"cuda mapping: {note}", style="dim"))
    for g in sample.gpus:
        history = monitor.memory_history(g.nvml_index) if monitor is not None else ()
        table = Table(
            title=Text(f"{g.label}  {safe_text(g.name)}"),
            title_justify="left",
            title_style="bold red" if g.lost else "bold",
            show_header=False,
            box=box.ROUNDED,
            padding=(0, 1),
        )
        table.add_column("what", style="dim", no_wrap=True, width=9)
        table.add_column("value", overflow="fold", width=62)
        for label, text in gpu_lines(g, history if len(history) > 1 else ()):
            table.add_row(label, Text(text))  # Text, not markup: a process name may hold `[`
        parts.append(table)
    parts.append(Text(sample.host.line(), style="dim"))
    return Group(*parts)

