"""`NA`: a figure the GPU cannot give, as a value rather than an exception (as in nvitop's API)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class NAType:
    """A figure the GPU cannot give. Falsy, renders as "n/a", one instance (`NA`)."""

    _instance: NAType | None = None

    def __new__(cls) -> NAType:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NA"

    def __str__(self) -> str:
        return "n/a"

    def __format__(self, spec: str) -> str:
        try:
            return format("n/a", spec)
        except ValueError:  # a numeric spec such as ".1f"
            return "n/a"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "NA"

    def __copy__(self) -> NAType:
        return self

    def __deepcopy__(self, memo: Any) -> NAType:
        return self


NA = NAType()


def is_na(value: Any) -> bool:
    return value is NA


def na_or(value: Any, render: Callable[[Any], str] = str) -> str:
    """`render(value)`, or "n/a" for NA / None."""
    return "n/a" if value is NA or value is None else render(value)
