"""Command line: `mscope FILE`, `mscope summary FILE`. Errors are one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import __version__
from .errors import MscopeError

EXIT_OK, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 2, 3


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (only=COMMAND) one whose other sub-commands have no arguments: their
    argument code lives in heavy modules (audit, diff, freeze, gpu: 70 ms of imports) that a
    `summary` must not pay for. `only=""` gives just the command names."""

    def wanted(command: str) -> bool:
        return only is None or only == command

    parser = argparse.ArgumentParser(
        prog="mscope",
        description="Look inside PyTorch checkpoints without running code from them.",
    )
    parser.add_argument("--version", action="version", version=f"mscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    explore = sub.add_parser("open", help="the explorer (default: `mscope FILE`)")
    explore.add_argument("file", help="checkpoint file or directory")
    explore.add_argument("--interval", type=float, default=1.0, metavar="S", help="GPU panel refresh (seconds)")
    explore.add_argument("--debug", action="store_true", help="show tracebacks")

    est = sub.add_parser("estimate", help="memory a fine-tune needs (weights, grads, optimizer) for a freeze plan")
    est.add_argument("file", help="checkpoint file or directory")
    est.add_argument("--plan", metavar="PLAN", help="freeze plan JSON to apply first (default: as saved)")
    est.add_argument("--precision", default=None, help="one precision (fp32, amp, bf16-mixed, fp16-mixed, bf16, fp16, as-saved)")
    est.add_argument("--optimizer", default=None, help="one optimizer (adamw, adam, sgd-momentum, sgd, none)")
    est.add_argument("--free", default=None, metavar="SIZE", help="free memory to check against, e.g. 24GiB")
    est.add_argument("--strict", action="store_true", help="with --plan: a plan made for another model (names, shapes, dtypes) is an error")
    est.add_argument("--debug", action="store_true", help="show tracebacks")

    summary = sub.add_parser("summary", help="print the module tree, totals, entries and unsafe globals")
    summary.add_argument("file", help="checkpoint file or directory (sharded / DCP)")
    summary.add_argument("--json", action="store_true", help="machine-readable output (schema in README)")
    summary.add_argument("--depth", type=int, default=None, metavar="N", help="show modules down to depth N")
    summary.add_argument("--filter", default=None, metavar="GLOB", help="only tensors whose name matches GLOB")
    summary.add_argument("--debug", action="store_true", help="show tracebacks")

    plan = sub.add_parser("plan", help="write a freeze plan from rules, without the explorer")
    apply_plan = sub.add_parser("apply-plan", help="print plain-PyTorch code that applies a freeze plan")
    if wanted("plan") or wanted("apply-plan"):
        from .freeze import add_apply_plan_arguments, add_plan_arguments

        add_plan_arguments(plan)
        add_apply_plan_arguments(apply_plan)

    gpus = sub.add_parser("gpus", help="GPU memory, load and processes (NVML), without the explorer")
    if wanted("gpus"):
        from .gpu import add_gpus_arguments

        add_gpus_arguments(gpus)

    audit = sub.add_parser("audit", help="integrity, load-ability, waste; --stats: values, NaN/Inf (exit 1 on --fail-on)")
    if wanted("audit"):
        from .audit import add_audit_arguments

        add_audit_arguments(audit)

    diff = sub.add_parser("diff", help="compare two checkpoints tensor by tensor (any formats); --plan checks frozen ones")
    if wanted("diff"):
        from .diff import add_diff_arguments

        add_diff_arguments(diff)
    return parser


_ONE_SHOT = False  # set by entry(): this process ends when the command does


def entry() -> NoReturn:
    """The `mscope` command: main(), then exit without tearing down the heap. Freeing a
    100k-tensor checkpoint object by object took 5% of a summary; the OS reclaims it at once.
    atexit handlers still run and output is flushed; nothing else needs interpreter shutdown."""
    global _ONE_SHOT
    _ONE_SHOT = True
    code = main()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    # `mscope FILE` opens the explorer, or prints the summary without a terminal on both
    # stdin and stdout (a pipe, </dev/null, cron): the explorer would run blind there.
    if argv and not argv[0].startswith("-") and argv[0] not in _commands():
        argv = ["open" if has_terminal() else "summary", *argv]
    parser = build_parser(only=argv[0] if argv and not argv[0].startswith("-") else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    from .textout import SafeStream

    # The backstop for text from files (see textout): every print() of this command is escaped.
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = SafeStream(sys.stdout), SafeStream(sys.stderr)
    try:
        return _run_guarded(args, debug)
    finally:
        sys.stdout, sys.stderr = saved


def _run_guarded(args: argparse.Namespace, debug: bool) -> int:
    try:
        return run(args)
    except MscopeError as exc:
        if debug:
            raise
        _error(exc.line())
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_OK
    except Exception as exc:  # last resort: still one line, never a traceback without --debug
        if debug:
            raise
        _error(f"internal error: {type(exc).__name__}: {exc} (run again with --debug and report it)")
        return EXIT_INTERNAL


def run(args: argparse.Namespace) -> int:
    from .readers import open_checkpoint

    if args.command == "open":
        if not os.path.exists(args.file):
            raise MscopeError("no such file or directory", args.file)
        if not has_terminal():
            # Asked for the explorer by name: say why not, rather than print something else.
            raise MscopeError(
                "the explorer needs a terminal on stdin and stdout",
                hint=f"for text output use: mscope summary {args.file}",
            )
        if args.interval <= 0:
            raise MscopeError("--interval must be more than 0 seconds")
        gc.disable()  # until the first paint (MscopeApp._resume_gc)
        prefetch = _prefetch(args.file)  # parse while Textual imports (the first paint waits on both)
        from .tui.app import run_app

        code, line = run_app(args.file, gpu_interval=args.interval, prefetch=prefetch, gc_paused=True)
        if line:
            _error(line)
        return code
    if args.command == "estimate":
        return run_estimate(args)
    if args.command == "summary":
        if args.depth is not None and args.depth < 0:
            raise MscopeError("--depth must be 0 or more")
        if _ONE_SHOT:
            # Off for good, not paused: turning it back on makes the next allocation collect the
            # millions of objects just built (0.3 s of a 100k-tensor summary). Nothing here
            # makes cycles, and the process exits right after.
            gc.disable()
        ckpt = open_checkpoint(args.file)
        if args.json:
            from .gcpause import paused_gc
            from .summary import summary_json_chunks
            from .textout import raw_stream

            out = raw_stream(sys.stdout)  # ASCII JSON, controls escaped: the escaping pass is moot
            with paused_gc():  # hundreds of thousands of small strings, no cycles
                for chunk in summary_json_chunks(ckpt, args.depth, args.filter):
                    out.write(chunk)
            out.write("\n")
        else:
            from .summary import render_summary
            from .textout import text_console

            render_summary(ckpt, text_console(), args.depth, args.filter)
        return EXIT_OK
    if args.command in ("plan", "apply-plan"):
        from .freeze import run_apply_plan_command, run_plan_command

        return (run_plan_command if args.command == "plan" else run_apply_plan_command)(args)
    if args.command == "audit":
        from .audit import run_audit_command

        return run_audit_command(args)
    if args.command == "diff":
        if has_terminal() and not (args.json or args.text or args.all_sections):
            return run_diff_explorer(args)
        from .diff import run_diff_command

        return run_diff_command(args)
    if args.command == "gpus":
        from .gpu import run_gpus_command

        return run_gpus_command(args)
    raise MscopeError(f"unknown command {args.command!r}")


def has_terminal() -> bool:
    """Both ends are a terminal: keys can come in and the screen can go out."""
    try:
        return sys.stdin.isatty() and sys.stdout.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def _prefetch(path: str, **kwargs):
    """Start reading the checkpoint on a thread; the explorer picks up the result (or error)."""
    from concurrent.futures import ThreadPoolExecutor

    from .readers import open_checkpoint

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mscope-open")
    future = pool.submit(open_checkpoint, path, **kwargs)
    pool.shutdown(wait=False)
    return future


def run_diff_explorer(args: argparse.Namespace) -> int:
    """`mscope diff A B` in a terminal: the explorer on B in diff mode against A (the tree first,
    from metadata; values compared in a worker). --json, --text or --all-sections print instead."""
    if args.atol < 0 or args.rtol < 0:
        raise MscopeError("--atol and --rtol must be 0 or more")
    for path in (args.file_a, args.file_b):
        if not os.path.exists(path):
            raise MscopeError("no such file or directory", path)
    if args.plan:
        from .freeze import load_plan

        load_plan(args.plan)  # a bad plan fails before the explorer starts
    # Both files parse while Textual imports; like the text diff, damaged files still compare.
    gc.disable()  # until the first paint (MscopeApp._resume_gc)
    prefetch_b = _prefetch(args.file_b, strict=False)
    prefetch_a = _prefetch(args.file_a, strict=False)
    from .tui.app import run_app

    code, line = run_app(
        args.file_b,
        prefetch=prefetch_b,
        compare=args.file_a,
        compare_prefetch=prefetch_a,
        gc_paused=True,
        atol=args.atol,
        rtol=args.rtol,
        plan=args.plan,
    )
    if line:
        _error(line)
    return code


def run_estimate(args: argparse.Namespace) -> int:
    from . import estimate as est
    from .readers import open_checkpoint
    from .session import Session

    if args.precision or args.optimizer:  # a typo is one error line, before any output
        est.estimate([], args.precision or "fp32", args.optimizer or "adamw")
    session = Session(open_checkpoint(args.file))
    if args.plan:
        from .freeze import apply_plan_to_session

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
        from .devicemap import parse_size

        free = parse_size(args.free)
    print(session.totals_line())
    if args.precision or args.optimizer:
        print(est.render_text(est.estimate_for_session(session, args.precision or "fp32", args.optimizer or "adamw"), free))
    else:
        print(est.render_table(est.estimate_table(session), free))
    return EXIT_OK


def _commands() -> set[str]:
    parser = build_parser(only="")
    for action in parser._subparsers._group_actions:  # the sub-command names, from argparse itself
        return set(action.choices)
    return set()


def _error(line: str) -> None:
    from .units import safe_text

    print(f"mscope: error: {safe_text(line)}", file=sys.stderr)  # always one line


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
