"""The rich Console for plain-text command output."""

from __future__ import annotations

from typing import Any


def text_console(**kwargs: Any):
    """A Console whose broken pipe (`mscope summary | head`) ends the command quietly with
    exit 0 through main()'s BrokenPipeError handler, instead of rich's own SystemExit(1)."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            super_ = super()
            try:
                super_.on_broken_pipe()  # points stdout at /dev/null, then raises SystemExit(1)
            except SystemExit:
                pass
            raise BrokenPipeError

    return _Console(highlight=False, **kwargs)
