"""What a tensor's values look like: `TensorStats` (and its flags), `Histogram`, and the
`Progress` of a streamed pass. Plain records with no numpy, so the CLI can name the defaults
without importing the kernels; stream.py computes them (the exact definitions are in kernels.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..checkpoint import FLOATING_DTYPES, TensorRecord
from ..jsonfile import json_number

DEFAULT_CHUNK_BYTES = 2 << 20  # source bytes per chunk (per-thread scratch: 2x for fp16, <= 8x)
# Flags (the audit's statistics findings share their names): thresholds.
EXPLODING_ABS = 1e4
DEAD_ZERO_FRACTION = 0.99
VANISHED_ABS = 1e-6


@dataclass(slots=True)
class TensorStats:
    """Statistics of one tensor (kernels.py has the exact definitions)."""

    name: str  # qualified name
    dtype: str
    shape: tuple[int, ...]
    numel: int
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    std: float | None = None
    sumsq: float = 0.0
    zeros: int = 0
    nan: int = 0
    inf: int = 0
    finite: int = 0
    flags: list[str] = field(default_factory=list)

    @property
    def norm(self) -> float:
        return math.sqrt(self.sumsq)

    @property
    def zero_fraction(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    @property
    def abs_max(self) -> float | None:
        if self.min is None or self.max is None:
            return None
        return max(abs(self.min), abs(self.max))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "numel": self.numel,
            "min": json_number(self.min),
            "max": json_number(self.max),
            "mean": json_number(self.mean),
            "std": json_number(self.std),
            "norm": json_number(self.norm),
            "zero_fraction": self.zero_fraction,
            "zeros": self.zeros,
            "nan": self.nan,
            "inf": self.inf,
            "flags": list(self.flags),
        }


@dataclass(slots=True)
class Histogram:
    lo: float
    hi: float
    counts: list[int]
    nan: int = 0
    inf: int = 0  # +-inf are outside every bin

    @property
    def edges(self) -> list[float]:
        n = len(self.counts)
        return [self.lo + (self.hi - self.lo) * i / n for i in range(n + 1)]


@dataclass(slots=True)
class Progress:
    """Where a streamed pass is: bytes done / total, elapsed seconds, ETA, current tensor."""

    done: int
    total: int
    elapsed: float
    tensor: str = ""

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    @property
    def eta(self) -> float | None:
        if self.done <= 0 or self.elapsed <= 0:
            return None
        return max(0.0, (self.total - self.done) * self.elapsed / self.done)


ProgressFn = Callable[[Progress], None]


def stat_flags(record: TensorRecord, st: TensorStats) -> list[str]:
    """Flags for one tensor's statistics: nan, inf, all-zero, constant, exploding, dead (the
    audit turns each into a finding of the same code)."""
    flags = []
    if st.nan:
        flags.append("nan")
    if st.inf:
        flags.append("inf")
    if st.numel == 0:
        return flags
    if st.zeros == st.numel:
        flags.append("all-zero")
    elif st.min is not None and st.min == st.max and not st.nan and st.numel > 1:
        flags.append("constant")
    floating = record.dtype in FLOATING_DTYPES or record.dtype.startswith("complex")
    if floating:
        am = st.abs_max
        if am is not None and am > EXPLODING_ABS and math.isfinite(am):
            flags.append("exploding")
        if st.zeros != st.numel and st.numel >= 16 and "constant" not in flags:
            if st.zero_fraction >= DEAD_ZERO_FRACTION or (am is not None and am < VANISHED_ABS):
                flags.append("dead")
    return flags

