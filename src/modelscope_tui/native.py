"""The compiled helpers (_native.so: native.c, values/statkernel.c, picklescan.c), opened once with ctypes.

hatch_build.py builds the library at install time and embeds `source_hash()` of the C sources in
it (`mscope_source_hash()`, from native.c). `library()` opens it only when that hash equals the
hash of the sources shipped next to this file, so a stale build (sources edited since) is ignored
without anyone bumping version numbers. Everything the library does has a Python fallback, so
`library()` returning None only makes mscope slower.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

HERE = Path(__file__).parent
LIBRARY = HERE / "_native.so"
SOURCES = ("native.c", "values/statkernel.c", "readers/pickle/picklescan.c")  # compiled together, hashed together
_opened: list[ctypes.CDLL | None] = []


def source_hash(folder: Path = HERE) -> str | None:
    """sha256 (hex) of the C sources in `folder`, in SOURCES order; None when one is missing.
    hatch_build.py loads this file by path and passes the result to the compiler."""
    digest = _sha256()
    for name in SOURCES:
        try:
            data = (folder / name).read_bytes()
        except OSError:
            return None
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def _sha256():
    """hashlib.sha256() without hashlib's OpenSSL load (3-8 ms on the big-pickle summary path):
    CPython's builtin sha256 module, the same digest."""
    try:
        from _sha2 import sha256  # Python 3.12+
    except ImportError:
        try:
            from _sha256 import sha256  # Python 3.10, 3.11
        except ImportError:  # pragma: no cover - a build without the builtin modules
            from hashlib import sha256
    return sha256()


def open_library(path: Path, expected_hash: str | None) -> ctypes.CDLL | None:
    """The library at `path` when it was built from sources hashing to `expected_hash`, else None
    (missing, unloadable, built without a hash, or stale)."""
    if expected_hash is None or not path.exists():
        return None
    try:
        lib = ctypes.CDLL(str(path))
        fn = lib.mscope_source_hash
    except (OSError, AttributeError):
        return None
    fn.argtypes = []
    fn.restype = ctypes.c_char_p
    built = fn()
    return lib if built is not None and built.decode("ascii", "replace") == expected_hash else None


def library() -> ctypes.CDLL | None:
    if not _opened:
        _opened.append(open_library(LIBRARY, source_hash()))
    return _opened[0]
