"""ctypes binding of statkernel.c, the one-pass statistics loop behind `mscope audit --stats`.

The library (native.py) is compiled at install time by hatch_build.py (plain C, no Python C API).
When it is missing, stale (built from other sources: native.py checks their hash), or
MSCOPE_STATS_KERNEL=numpy is set, `load()` returns None and kernels.py uses numpy instead:
same numbers, ~3x slower.
"""

from __future__ import annotations

import ctypes
import os

from .. import native
from ..errors import TensorDataError

LIBRARY = native.LIBRARY
KINDS = {"f16": 0, "bf16": 1, "f32": 2}
_WIDTH = {0: 2, 1: 2, 2: 4}  # bytes per value of each kind


class CPart(ctypes.Structure):
    _fields_ = [
        ("n", ctypes.c_int64),
        ("finite", ctypes.c_int64),
        ("nan", ctypes.c_int64),
        ("inf", ctypes.c_int64),
        ("zeros", ctypes.c_int64),
        ("mn", ctypes.c_double),
        ("mx", ctypes.c_double),
        ("mean", ctypes.c_double),
        ("m2", ctypes.c_double),
        ("sumsq", ctypes.c_double),
    ]


class Kernel:
    """The loaded library. `stats` releases the GIL (ctypes does for every foreign call), so
    stream_stats' thread pool runs it on several cores."""

    def __init__(self, lib: ctypes.CDLL, portable: bool = False) -> None:
        self._fn = lib.mscope_stats
        self._fn.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(CPart),
        ]
        self._fn.restype = ctypes.c_int
        self.isa = "AVX2" if not portable and lib.mscope_kernel_isa() == 2 else "portable C"
        self._portable = int(portable)

    def stats(self, address: int, count: int, kind: int, lo: int | None = None, hi: int | None = None) -> CPart:
        """Statistics of `count` values at `address`. The loop reads raw memory, so the range is
        checked here, at the last Python step before C: it must lie in [lo, hi), the buffer the
        caller took the address from (the mapped member; default: exactly the range itself)."""
        width = _WIDTH.get(kind)
        if width is None:
            raise ValueError(f"statistics kernel: bad kind {kind}")
        if type(count) is not int or count < 0 or type(address) is not int or address <= 0:
            raise TensorDataError(f"statistics kernel: bad range ({address:#x}, {count})")
        end = address + count * width
        if lo is not None and hi is not None and not (lo <= address and end <= hi):
            raise TensorDataError(
                f"statistics kernel: range {address:#x}..{end:#x} lies outside its buffer {lo:#x}..{hi:#x}"
            )
        out = CPart()
        if self._fn(address, count, kind, self._portable, ctypes.byref(out)) != 0:
            raise ValueError(f"statistics kernel: bad kind {kind}")
        return out


_loaded: dict[bool, Kernel | None] = {}


def load(portable: bool = False) -> Kernel | None:
    """The kernel, or None when unavailable. `portable` forces the plain-C loop (for tests)."""
    if portable in _loaded:
        return _loaded[portable]
    kernel = None
    lib = native.library() if os.environ.get("MSCOPE_STATS_KERNEL", "").lower() != "numpy" else None
    if lib is not None:
        try:
            kernel = Kernel(lib, portable)
        except AttributeError:
            kernel = None
    _loaded[portable] = kernel
    return kernel
