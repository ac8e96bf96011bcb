"""ctypes binding of statkernel.c, the one-pass statistics loop behind `mscope audit --stats`.

The library (native.py) is compiled at install time by hatch_build.py (plain C, no Python C API).
When it is missing, stale (another MSCOPE_KERNEL_VERSION), or MSCOPE_STATS_KERNEL=numpy is
set, `load()` returns None and audit.py uses its numpy kernels: same numbers, ~3x slower.
"""

from __future__ import annotations

import ctypes
import os

from . import native

VERSION = 1  # MSCOPE_KERNEL_VERSION in statkernel.c
LIBRARY = native.LIBRARY
KINDS = {"f16": 0, "bf16": 1, "f32": 2}


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
    audit's thread pool runs it on several cores."""

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

    def stats(self, address: int, count: int, kind: int) -> CPart:
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
            if lib.mscope_kernel_version() == VERSION:
                kernel = Kernel(lib, portable)
        except AttributeError:
            kernel = None
    _loaded[portable] = kernel
    return kernel
