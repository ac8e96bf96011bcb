"""What every command shares: exit codes, the one-line error, terminal detection, background
parsing, and the progress bar on stderr."""

from __future__ import annotations

import os
import sys
from typing import Any

from ..errors import MscopeError

EXIT_OK, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 2, 3

ONE_SHOT = False  # set by cli.entry(): this process ends when the command does


def has_terminal() -> bool:
    """Both ends are a terminal: keys can come in and the screen can go out."""
    try:
        return sys.stdin.isatty() and sys.stdout.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def error(line: str) -> None:
    from ..units import safe_text

    print(f"mscope: error: {safe_text(line)}", file=sys.stderr)  # always one line


def warning(line: str) -> None:
    print(f"mscope: warning: {line}", file=sys.stderr)


def silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


def check_exists(location: str) -> None:
    """A local path must exist before the explorer starts; a URL is checked by reading it (one
    line from its source), never turned into a local path (`s3://b/x` is not `s3:/b/x`)."""
    from ..readers.sources.location import is_url

    if not is_url(location) and not os.path.exists(location):
        raise MscopeError("no such file or directory", location)


def prefetch(path: str, adapter: str | None = None, **kwargs: Any):
    """Start reading the checkpoint on a thread; the explorer picks up the result (or error).
    adapter: a PEFT adapter directory to attach (readers.peft)."""
    from concurrent.futures import ThreadPoolExecutor

    from ..readers import open_checkpoint

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mscope-open")
    if adapter:
        from ..readers.peft import open_checkpoint_with_adapter

        future = pool.submit(open_checkpoint_with_adapter, path, adapter, **kwargs)
    else:
        future = pool.submit(open_checkpoint, path, **kwargs)
    pool.shutdown(wait=False)
    return future


class progress_bar:  # noqa: N801 - used as a context manager, like a function
    """A rich progress bar on stderr (bytes done / total, rate, ETA) when stderr is a terminal;
    otherwise a None callback (nothing printed, nothing imported). The callback takes the
    domain's progress record (.done, .total, .tensor)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar = None
        self.task = None

    def __enter__(self):
        if not sys.stderr.isatty():
            return None
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as Bar

        from ..textout import text_console

        self.bar = Bar(
            TextColumn(self.label),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("[dim]{task.description}", markup=True),
            console=text_console(stderr=True),
            transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task("", total=None)
        return self.update

    def update(self, p: Any) -> None:
        from rich.markup import escape

        self.bar.update(
            self.task, completed=p.done, total=p.total or None, description=escape(p.tensor[-40:])
        )

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
