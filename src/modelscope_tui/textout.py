"""The rich Console for plain-text command output, and the guard on the process's text streams.

Text from a file is made safe where it is formatted (units.safe_text); the guards here are the
backstop that holds for anything a renderer forgets: every plain-text byte mscope writes for a
human passes through safe_text once more, after layout. Our own styling (rich's ANSI codes)
is added after the guard, so colours still work.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from .units import safe_text

# Fast check for a chunk that needs no work (all JSON output, nearly all text): ASCII with no
# control character other than newline and tab.
_ASCII_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def safe_chunk(text: str) -> str:
    """safe_text for a block of output lines (newlines and tabs kept), cheap when clean."""
    if text.isascii() and _ASCII_UNSAFE.search(text) is None:
        return text
    return safe_text(text, multiline=True)


class SafeStream:
    """A text stream whose write() escapes unsafe characters (see safe_text); everything else
    is the wrapped stream's. Installed over sys.stdout/sys.stderr by the CLI for the length of
    a command, so a print() of a name from a file cannot reach the terminal raw, and a lone
    surrogate cannot raise UnicodeEncodeError. JSON output is ASCII already and passes as is."""

    def __init__(self, raw: Any):
        self.raw = raw

    def write(self, text: str) -> int:
        self.raw.write(safe_chunk(text))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def raw_stream(stream: Any) -> Any:
    """The stream under a SafeStream (rich writes its own escape codes, guarded per segment)."""
    return stream.raw if isinstance(stream, SafeStream) else stream


def text_console(**kwargs: Any):
    """A Console whose broken pipe (`mscope summary | head`) ends the command quietly with
    exit 0 through main()'s BrokenPipeError handler, instead of rich's own SystemExit(1).
    Every text segment it renders passes through safe_text before styling."""
    from rich.console import Console
    from rich.segment import Segment

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            super_ = super()
            try:
                super_.on_broken_pipe()  # points stdout at /dev/null, then raises SystemExit(1)
            except SystemExit:
                pass
            raise BrokenPipeError

        # rich's one point where segments become the output string (styles are applied here,
        # so escaping first keeps our colours and removes only what the text carried).
        def _render_buffer(self, buffer) -> str:
            return super()._render_buffer(
                seg if seg.control else Segment(safe_chunk(seg.text), seg.style, seg.control)
                for seg in buffer
            )

    if "file" not in kwargs:
        kwargs["file"] = raw_stream(sys.stderr if kwargs.get("stderr") else sys.stdout)
    return _Console(highlight=False, **kwargs)


def safe_markup(text: object) -> str:
    """Text from a file, ready to embed in rich markup: unsafe characters escaped (safe_text),
    then square brackets escaped so a name like `[bold]` or `[link=...]` stays literal."""
    from rich.markup import escape

    return escape(safe_text(text))
