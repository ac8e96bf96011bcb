"""Pause the cyclic garbage collector while building large acyclic structures.

Reading a 100k-tensor checkpoint creates millions of small tuples and records; each allocation
burst triggers generational collections that re-traverse everything built so far, which cost
a third of the unpickling time. Nothing built there needs the cycle collector.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
