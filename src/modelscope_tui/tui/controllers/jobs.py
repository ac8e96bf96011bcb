"""One background job per feature at a time: starting a new one cancels the one before, and the
results of a replaced job are dropped when they arrive."""

from __future__ import annotations

import threading
from typing import TypeVar


class Job:
    """One run of a background computation. Domain code polls `cancel` (a threading.Event, as
    audit, diff and placement expect); the `Latest` that started it says whether it is still the
    newest. Subclasses carry what the run needs."""

    def __init__(self) -> None:
        self.cancel = threading.Event()


J = TypeVar("J", bound=Job)


class Latest:
    """The newest Job of one kind. Identity, not a counter: a job is current while it is the
    one object this holds."""

    def __init__(self) -> None:
        self.job: Job | None = None

    def start(self, job: J) -> J:
        """Make `job` the current one; the previous one is cancelled."""
        self.cancel()
        self.job = job
        return job

    def is_current(self, job: Job) -> bool:
        return job is self.job

    def cancel(self) -> None:
        """Ask the current job to stop; its results still count (a stopped diff reports)."""
        if self.job is not None:
            self.job.cancel.set()

    def drop(self) -> None:
        """Cancel the current job and ignore whatever it still reports."""
        self.cancel()
        self.job = None
