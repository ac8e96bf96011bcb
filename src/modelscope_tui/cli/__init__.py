"""Command line: `mscope FILE` and `mscope COMMAND ...`. Each command is one module of this
package that owns its arguments, its run and its text; this module only dispatches. Errors are
one line on stderr with exit code 2, never a traceback (unless --debug)."""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from .. import __version__
from ..errors import MscopeError
from . import common
from .common import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_OK, error, silence_stdout

# name -> (module of this package, help line), in the order `mscope --help` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "open": ("open", "the explorer (default: `mscope FILE`)"),
    "estimate": ("estimate", "memory a fine-tune needs (weights, grads, optimizer) for a freeze plan"),
    "summary": ("summary", "print the module tree, totals, entries and unsafe globals"),
    "plan": ("plan", "write a freeze plan from rules, without the explorer"),
    "apply-plan": ("apply_plan", "print plain-PyTorch code that applies a freeze plan"),
    "gpus": ("gpus", "GPU memory, load and processes (NVML), without the explorer"),
    "audit": ("audit", "integrity, load-ability, waste; --stats: values, NaN/Inf (exit 1 on --fail-on)"),
    "diff": ("diff", "compare two checkpoints tensor by tensor (any formats); --plan checks frozen ones"),
    "convert": ("convert", "write a checkpoint as Hugging Face safetensors (sharded, --dtype, --verify)"),
}


def command_module(name: str):
    return importlib.import_module(f".{COMMANDS[name][0]}", __name__)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command by name and help; the arguments of `command` only (a command's module is
    imported when it runs, so `mscope summary` pays for no other command's imports)."""
    parser = argparse.ArgumentParser(
        prog="mscope",
        description="Look inside PyTorch checkpoints without running code from them.",
    )
    parser.add_argument("--version", action="version", version=f"mscope {__version__}")
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="for URLs: fetch metadata again instead of using ~/.cache/mscope (any position)",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="for an http(s) server without range support: fetch the file whole into "
        "~/.cache/mscope/downloads, up to MSCOPE_MAX_DOWNLOAD (default 2 GiB) (any position)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_line) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_line)
        if name == command:
            command_module(name).add_arguments(command_parser)
    return parser


def entry() -> NoReturn:
    """The `mscope` command: main(), then exit without tearing down the heap. Freeing a
    100k-tensor checkpoint object by object took 5% of a summary; the OS reclaims it at once.
    atexit handlers still run and output is flushed; nothing else needs interpreter shutdown."""
    common.ONE_SHOT = True
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
    # Line-wide switches, for this call only (main() also runs in-process: tests, the
    # explorer's own commands): set here, put back when the command ends.
    switches = []
    if "--no-cache" in argv:  # any command, anywhere on the line: metadata is re-fetched
        from ..readers.sources import cache

        argv = [a for a in argv if a != "--no-cache"]
        switches.append((cache, "ENABLED", False))
    if "--download" in argv:  # any command: a server without range support sends the file whole
        from ..readers.sources import http

        argv = [a for a in argv if a != "--download"]
        switches.append((http, "DOWNLOAD", True))
    before = [(module, name, getattr(module, name)) for module, name, _ in switches]
    for module, name, value in switches:
        setattr(module, name, value)
    try:
        return _main(argv, debug)
    finally:
        for module, name, value in before:
            setattr(module, name, value)


def _main(argv: list[str], debug: bool) -> int:
    # `mscope FILE` opens the explorer, or prints the summary without a terminal on both
    # stdin and stdout (a pipe, </dev/null, cron): the explorer would run blind there.
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        argv = ["open" if common.has_terminal() else "summary", *argv]
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    from ..textout import SafeStream

    # The backstop for text from files (see textout): every print() of this command is escaped.
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = SafeStream(sys.stdout), SafeStream(sys.stderr)
    try:
        return _run_guarded(args, debug)
    finally:
        sys.stdout, sys.stderr = saved


def _run_guarded(args: argparse.Namespace, debug: bool) -> int:
    try:
        return command_module(args.command).run(args)
    except MscopeError as exc:
        if debug:
            raise
        error(exc.line())
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        silence_stdout()
        return EXIT_OK
    except Exception as exc:  # last resort: still one line, never a traceback without --debug
        if debug:
            raise
        error(f"internal error: {type(exc).__name__}: {exc} (run again with --debug and report it)")
        return EXIT_INTERNAL
