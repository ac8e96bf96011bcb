"""What the explorer tells the user, and when it shows it as a toast (plain Python, no Textual).

At 80x24 toasts stacked over the tree and over dialog buttons, and one warning came back after
every action. So: every message goes into the history of this run (M lists it); a message that
repeats the last one while nothing changed is counted there, not shown again; while a dialog is
open the toast waits, and shows when the dialog closes (a few at most, the rest in the history).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

HISTORY_MAX = 1000  # messages kept for M; the oldest go first
HELD_MAX = 3  # toasts shown at once when a dialog closes; the others are counted in one line


@dataclass(slots=True)
class Said:
    """One message of the run, as the history lists it."""

    time: float  # seconds since the epoch
    severity: str  # "information", "warning" or "error" (Textual's names)
    text: str
    count: int = 1  # said again with nothing changed in between: counted here, shown once


@dataclass(frozen=True, slots=True)
class Toast:
    text: str
    severity: str
    timeout: float | None


class Feedback:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.history: list[Said] = []
        self.held: list[Toast] = []
        self._last: tuple | None = None  # (severity, text, state) of the last message

    def say(
        self, text: str, severity: str, timeout: float | None, state: Hashable, dialog: bool
    ) -> Toast | None:
        """Record a message; returns the toast to show now, or None.

        state: what the app's messages are about (the freeze state, the panes, the filter...):
        the last message again, while it is unchanged, is counted, not shown again.
        dialog: a dialog has the focus; the toast is held until `release`."""
        key = (severity, text, state)
        if key == self._last and self.history:
            self.history[-1].count += 1
            return None
        self._last = key
        self.history.append(Said(self.clock(), severity, text))
        del self.history[:-HISTORY_MAX]
        toast = Toast(text, severity, timeout)
        if dialog:
            self.held.append(toast)
            return None
        return toast

    def release(self) -> list[Toast]:
        """The toasts held while a dialog was open, now that it closed: the last few, after a
        line that counts the others (they are in the history)."""
        held, self.held = self.held, []
        if len(held) <= HELD_MAX:
            return held
        shown = held[-(HELD_MAX - 1) :]
        more = len(held) - len(shown)
        line = Toast(
            f"{more} more message(s) came while the dialog was open: M lists them", "information", 6
        )
        return [line, *shown]
