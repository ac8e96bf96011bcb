"""The tree filter: which tensors a typed text shows (substring, or a glob when it has * ? [),
and the modules on the way to them."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

from .jobs import Job, Latest


@dataclass
class FilterResult:
    text: str
    tensors: set[str] | None  # None: no filter, everything shows
    modules: set[str] | None


class FilterJob(Job):
    def __init__(self, text: str, names: Iterable[str], a_only=None) -> None:
        super().__init__()
        self.text = text
        self.names = names  # this file's tensor names
        self.a_only = a_only  # diff mode: a callable listing what only A has (shown in the tree too)


class TreeFilter:
    def __init__(self) -> None:
        self.text = ""  # the filter applied to the tree
        self.reveal_after = None  # the row to return to once a cleared filter is applied
        self._jobs = Latest()

    def start(self, text: str, names: Iterable[str], a_only=None) -> FilterJob:
        """Typing: each key starts a new job and the one before is dropped."""
        return self._jobs.start(FilterJob(text, names, a_only))

    def is_current(self, job: FilterJob) -> bool:
        return self._jobs.is_current(job)

    @staticmethod
    def compute(job: FilterJob) -> FilterResult:
        """Worker thread: a walk over every name (100k at most a few tens of ms)."""
        text = job.text
        if not text:
            return FilterResult(text, None, None)
        candidates = list(job.names)
        if job.a_only is not None:
            candidates += job.a_only()
        return FilterResult(text, *match(text, candidates))


def match(text: str, names: Iterable[str]) -> tuple[set[str], set[str]]:
    """(matching names, every module above one of them, "" included). Case-insensitive; a glob
    when the text has * ? or [, else a substring."""
    needle = text.lower()
    glob = any(c in text for c in "*?[")
    found = []
    for name in names:
        low = name.lower()
        if (glob and fnmatch.fnmatchcase(low, needle)) or (not glob and needle in low):
            found.append(name)
    modules = {""}
    for name in found:
        parts = name.split(".")[:-1]
        for i in range(1, len(parts) + 1):
            modules.add(".".join(parts[:i]))
    return set(found), modules
