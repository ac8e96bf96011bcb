"""StrEnum for kinds, formats, severities and plan actions: members compare and serialise as
their plain string values, so JSON output and golden files are unchanged by using them."""

from __future__ import annotations

import enum
import sys

if sys.version_info >= (3, 11):
    StrEnum = enum.StrEnum
else:  # pragma: no cover - Python 3.10

    class StrEnum(str, enum.Enum):
        def __str__(self) -> str:
            return str.__str__(self)

        __format__ = str.__format__
