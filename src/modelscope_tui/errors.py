"""Named errors. Each carries the one line the CLI prints (what, which file, what to do)."""

from __future__ import annotations

from pathlib import Path

from .units import safe_text


class MscopeError(Exception):
    """Base class: anything mscope expects to go wrong with user input."""

    def __init__(self, message: str, path: str | Path | None = None, hint: str | None = None):
        self.message = message
        self.path = str(path) if path is not None else None
        self.hint = hint
        super().__init__(self.line())

    def line(self) -> str:
        where = f"{self.path}: " if self.path else ""
        tip = f" ({self.hint})" if self.hint else ""
        return _printable(f"{where}{self.message}{tip}")

    def __str__(self) -> str:  # path and hint may be filled in after the error is raised
        return self.line()


def _printable(text: str) -> str:
    """One line, whatever a file name or a pickle put in it (newlines, terminal escapes)."""
    return safe_text(text)


class NotFoundError(MscopeError):
    """The path does not exist or cannot be read."""


class UnsupportedFormatError(MscopeError):
    """The bytes are not any checkpoint format we know."""


class SeveralCheckpointsError(UnsupportedFormatError):
    """A directory holds several separate checkpoints, not one set: `candidates` are their paths,
    so a command can list them instead of guessing."""

    def __init__(self, message: str, path: str | Path, hint: str, candidates: list[Path]):
        super().__init__(message, path, hint)
        self.candidates = candidates


class CorruptCheckpointError(MscopeError):
    """The file claims a known format but its structure is broken or inconsistent."""


class UnsafePickleError(MscopeError):
    """A pickle exceeded our parsing limits (depth, size, objects) or is malformed."""


class TensorDataError(MscopeError):
    """A tensor's bytes cannot be read (missing, truncated, compressed, unsupported dtype)."""


class Cancelled(MscopeError):
    """A streamed pass (statistics, audit, diff, norm profile) was stopped through its `cancel`
    event; what it computed so far is kept by its caller."""

    def __init__(self) -> None:
        super().__init__("cancelled")
