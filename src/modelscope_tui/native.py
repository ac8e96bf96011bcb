"""The compiled helpers (_native.so: statkernel.c, picklescan.c), opened once with ctypes.

hatch_build.py builds the library at install time. Everything it does has a Python fallback,
so `library()` returning None only makes mscope slower.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

LIBRARY = Path(__file__).with_name("_native.so")
_opened: list[ctypes.CDLL | None] = []


def library() -> ctypes.CDLL | None:
    if not _opened:
        lib = None
        if LIBRARY.exists():
            try:
                lib = ctypes.CDLL(str(LIBRARY))
            except OSError:
                lib = None
        _opened.append(lib)
    return _opened[0]
