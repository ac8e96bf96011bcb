"""Raw pickle opcodes, for writing hostile pickles by hand (no pickler decides the spelling).

Nothing here unpickles anything: the bytes are only written to files for mscope to read.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

PROTO2, PROTO4 = b"\x80\x02", b"\x80\x04"
STOP, MARK, POP, DUP = b".", b"(", b"0", b"2"
TUPLE, TUPLE1, TUPLE2, EMPTY_TUPLE = b"t", b"\x85", b"\x86", b")"
EMPTY_DICT, EMPTY_LIST, SETITEM, SETITEMS, APPEND = b"}", b"]", b"s", b"u", b"a"
REDUCE, BUILD, NEWOBJ, NEWOBJ_EX, OBJ = b"R", b"b", b"\x81", b"\x92", b"o"
STACK_GLOBAL, MEMOIZE, NONE = b"\x93", b"\x94", b"N"


def s(text: str) -> bytes:
    """SHORT_BINUNICODE (or BINUNICODE when long)."""
    raw = text.encode()
    if len(raw) < 256:
        return b"\x8c" + bytes([len(raw)]) + raw
    return b"X" + struct.pack("<I", len(raw)) + raw


def i(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def glob(module: str, name: str) -> bytes:
    """GLOBAL: two text lines."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def sglob(module: str, name: str) -> bytes:
    """STACK_GLOBAL: module and name from the stack (protocol 4 resolves dotted names)."""
    return s(module) + s(name) + STACK_GLOBAL


def inst(module: str, name: str) -> bytes:
    """INST: MARK args... INST module name -> module.name(*args)."""
    return b"i" + module.encode() + b"\n" + name.encode() + b"\n"


def put(n: int) -> bytes:
    return b"q" + bytes([n])


def get(n: int) -> bytes:
    return b"h" + bytes([n])


def long_get(n: int) -> bytes:
    return b"j" + struct.pack("<I", n)


def call(func: bytes, *args: bytes) -> bytes:
    """REDUCE: func(*args)."""
    return func + MARK + b"".join(args) + TUPLE + REDUCE


def in_dict(value: bytes, proto: bytes = PROTO4) -> bytes:
    """A whole pickle: {'cfg': value} (a small, ordinary looking plain pickle)."""
    return proto + EMPTY_DICT + s("cfg") + value + SETITEM + STOP


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path
