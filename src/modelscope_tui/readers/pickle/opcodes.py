"""The pickle opcodes, described once, and the one tokenizer every opcode walker uses.

Four walkers read opcodes: the exact pre-scan (scan.scan_exact, the specification), its compiled
mirror (picklescan.c, which gets the columns of this table as arrays), and the two symbolic
machines of patch.py. They must agree on where each opcode's argument ends (that is the security
boundary: a length read wrongly by one of them lets bytes through as opcodes that another
skipped as data), so the Python ones decode no argument by hand: they read `OPCODES` and
`tokens`, and picklescan.c's token() is a line-by-line mirror of `tokens` (tests hold them equal).

The facts come from pickletools' descriptions; only what the scan adds on top (how an opcode
changes nesting depth, whether it pushes a value whose hash a file controls, which of its items
become dict keys or set members, and what it costs the unpickler) is written here by name.
"""

from __future__ import annotations

import pickletools
import struct
from collections.abc import Iterator
from typing import NamedTuple

# -- argument kinds -----------------------------------------------------------------------------
ARG_NONE = 0
ARG_FIXED = 1  # `width` bytes: an integer (little-endian; signed for int4) or BINFLOAT's double
ARG_COUNT = 2  # an unsigned length of `width` bytes, then that many bytes
ARG_COUNT_SIGNED = 3  # the same with a signed 4-byte length (BINSTRING, LONG4): negative is refused
ARG_LINE = 4  # text up to a newline
ARG_TWO_LINES = 5  # two such lines (GLOBAL, INST: module and name)
ARG_INVALID = 6  # not an opcode

MAX_LINE = 4096  # a text argument's newline must come within this many bytes (CPython's are short)

# -- how an opcode changes the nesting depth of what is on the stack (see scan.MAX_NESTING) ------
NEST_PLAIN, NEST_MARK, NEST_TO_MARK, NEST_INTO_MARK, NEST_POP_MARK = 0, 1, 2, 3, 4
NEST_INTO, NEST_DUP, NEST_GET, NEST_PUT, NEST_MEMOIZE = 5, 6, 7, 8, 9

# -- which items an opcode puts into a dict or set as keys or members (see scan.MAX_HASHED_KEYS) -
KEYS_NONE, KEYS_SECOND, KEYS_EVEN, KEYS_ALL = 0, 1, 2, 3

STOP = 0x2E
LONG1 = 0x8A
STACK_GLOBAL = 0x93

_NEST_MODES = {
    "MARK": NEST_MARK, "LIST": NEST_TO_MARK, "TUPLE": NEST_TO_MARK, "DICT": NEST_TO_MARK,
    "FROZENSET": NEST_TO_MARK, "INST": NEST_TO_MARK, "OBJ": NEST_TO_MARK, "APPENDS": NEST_INTO_MARK,
    "SETITEMS": NEST_INTO_MARK, "ADDITEMS": NEST_INTO_MARK, "POP_MARK": NEST_POP_MARK,
    "APPEND": NEST_INTO, "SETITEM": NEST_INTO, "BUILD": NEST_INTO, "DUP": NEST_DUP, "GET": NEST_GET,
    "BINGET": NEST_GET, "LONG_BINGET": NEST_GET, "PUT": NEST_PUT, "BINPUT": NEST_PUT,
    "LONG_BINPUT": NEST_PUT, "MEMOIZE": NEST_MEMOIZE,
}  # fmt: skip
# Values whose hash the file chooses: floats, ints past 2**55 (LONG1 decides by its length),
# tuples and frozensets hash from their items (scan.MAX_HASHED_KEYS explains why it matters).
_HASHY = {"FLOAT", "BINFLOAT", "INT", "LONG", "LONG4", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "FROZENSET"}
_KEYS = {"SETITEM": KEYS_SECOND, "SETITEMS": KEYS_EVEN, "DICT": KEYS_EVEN, "ADDITEMS": KEYS_ALL, "FROZENSET": KEYS_ALL}
# Rough bytes each opcode makes the C unpickler build and keep (CPython 3.11 object sizes; a
# reference on the stack or in a container is 8, the default). Length-prefixed and text
# arguments add two per byte (a str may widen): see scan.PICKLE_MEMORY_RATIO.
_COSTS = {
    "EMPTY_DICT": 64, "DICT": 64, "EMPTY_LIST": 56, "LIST": 56, "EMPTY_SET": 216,
    "FROZENSET": 216, "TUPLE": 40, "TUPLE1": 48, "TUPLE2": 56, "TUPLE3": 64, "INT": 32,
    "BININT": 32, "BININT2": 32, "LONG": 32, "LONG1": 32, "LONG4": 32, "FLOAT": 24,
    "BINFLOAT": 24, "STRING": 64, "BINSTRING": 64, "SHORT_BINSTRING": 64, "UNICODE": 64,
    "BINUNICODE": 64, "SHORT_BINUNICODE": 64, "BINUNICODE8": 64, "BINBYTES": 40,
    "SHORT_BINBYTES": 40, "BINBYTES8": 40, "BYTEARRAY8": 64, "REDUCE": 128, "NEWOBJ": 128,
    "NEWOBJ_EX": 128, "OBJ": 128, "INST": 128, "BUILD": 64, "GLOBAL": 64, "STACK_GLOBAL": 64,
    "PERSID": 256, "BINPERSID": 256, "SETITEM": 16, "PROTO": 0, "FRAME": 0, "STOP": 0,
    "POP": 0, "POP_MARK": 0,
}  # fmt: skip


class Opcode(NamedTuple):
    """One opcode: its argument, its stack effect, and what the pre-scan charges for it."""

    code: int
    name: str
    arg: int  # ARG_*
    width: int  # ARG_FIXED: bytes of the argument; ARG_COUNT*: bytes of its length; else 0
    pops: int  # items popped (for `to_mark`: those below the mark, after it is popped to)
    pushes: int
    to_mark: bool  # pops everything above the topmost MARK, and the MARK
    nest: int  # NEST_*
    hashy: bool  # pushes a value whose hash the file chooses
    keys: int  # KEYS_*
    cost: int  # bytes of objects the unpickler builds for it


def _describe(op: pickletools.OpcodeInfo) -> Opcode:
    arg, width = ARG_NONE, 0
    if op.arg is not None:
        n = op.arg.n
        if n > 0:
            arg, width = ARG_FIXED, n
        elif n == pickletools.UP_TO_NEWLINE:
            arg = ARG_LINE
        elif n == pickletools.TAKEN_FROM_ARGUMENT1:
            arg, width = ARG_COUNT, 1
        elif n == pickletools.TAKEN_FROM_ARGUMENT4:
            arg, width = ARG_COUNT_SIGNED, 4
        elif n == pickletools.TAKEN_FROM_ARGUMENT4U:
            arg, width = ARG_COUNT, 4
        elif n == pickletools.TAKEN_FROM_ARGUMENT8U:
            arg, width = ARG_COUNT, 8
        else:  # pragma: no cover - a pickletools we do not know
            raise AssertionError(f"unknown argument of {op.name}")
        if op.arg.name == "stringnl_noescape_pair":
            arg = ARG_TWO_LINES
    before = op.stack_before
    to_mark = pickletools.markobject in before
    return Opcode(
        code=op.code.encode("latin-1")[0],
        name=op.name,
        arg=arg,
        width=width,
        pops=before.index(pickletools.markobject) if to_mark else len(before),
        pushes=len(op.stack_after),
        to_mark=to_mark,
        nest=_NEST_MODES.get(op.name, NEST_PLAIN),
        hashy=op.name in _HASHY,
        keys=_KEYS.get(op.name, KEYS_NONE),
        cost=_COSTS.get(op.name, 8),
    )


_BY_CODE = {o.code: o for o in map(_describe, pickletools.opcodes)}
OPCODES: tuple[Opcode | None, ...] = tuple(_BY_CODE.get(byte) for byte in range(256))


def column(field: str, missing: int = 0) -> list[int]:
    """One field of every byte's row, as a list indexed by the byte (for hot loops and C)."""
    return [missing if o is None else int(getattr(o, field)) for o in OPCODES]


ARG = column("arg", ARG_INVALID)
WIDTH = column("width")
COST = column("cost", 8)  # an invalid byte is refused before the cost is looked at


def _fixed_formats() -> list[struct.Struct | None]:
    """How each fixed argument wider than a byte decodes: BINFLOAT is a big-endian double, the
    others little-endian integers (signed for pickletools' int4)."""
    formats: list[struct.Struct | None] = [None] * 256
    for op in pickletools.opcodes:
        if op.arg is not None and op.arg.n > 1:
            code = op.code.encode("latin-1")[0]
            fmt = {"float8": ">d", "int4": "<i", "uint4": "<I", "uint2": "<H", "uint8": "<Q"}[op.arg.name]
            formats[code] = struct.Struct(fmt)
    return formats


_FIXED = _fixed_formats()

# -- the tokenizer --------------------------------------------------------------------------------
# Why a malformed argument stops the walk; the walker words it (see tokens).
TRUNCATED = "truncated"  # the argument runs past the end of the data
NEGATIVE = "negative length"
UNTERMINATED = "unterminated text argument"  # no newline within MAX_LINE bytes
MALFORMED_GLOBAL = "malformed global name"  # GLOBAL / INST without both lines
UNKNOWN = "unknown opcode"


def tokens(data: bytes, pos: int = 0) -> Iterator[tuple[int, int, object, int]]:
    """(opcode, its offset, argument, offset of the next opcode) for each opcode of the pickle
    at `data[pos]`, up to and including STOP; without STOP when the data ends first. Reads nothing
    past the end, whatever a length says.

    The argument is the decoded value of a fixed one (an int, or BINFLOAT's float), the offset
    where a counted or text argument's bytes start (they end at the next opcode, or one byte
    before it for a text argument's newline), for GLOBAL and INST the offset of the newline
    between module and name, and None for none.

    A malformed argument ends the walk with one last tuple whose next offset is -1 and whose
    argument is the reason (TRUNCATED, NEGATIVE, UNTERMINATED, MALFORMED_GLOBAL, UNKNOWN), so a
    walker can still apply the opcode's stack effect before it refuses, as the exact scan does.
    Plain tuples, not a NamedTuple: a torch pickle has 30 opcodes per tensor.
    """
    kinds, widths, fixed = ARG, WIDTH, _FIXED
    end = len(data)
    find = data.find
    while pos < end:
        at = pos
        code = data[pos]
        kind = kinds[code]
        pos += 1
        if kind == ARG_FIXED:
            width = widths[code]
            if pos + width > end:
                yield code, at, TRUNCATED, -1
                return
            arg = data[pos] if width == 1 else fixed[code].unpack_from(data, pos)[0]
            pos += width
            yield code, at, arg, pos
        elif kind == ARG_NONE:
            yield code, at, None, pos
            if code == STOP:
                return
        elif kind == ARG_COUNT or kind == ARG_COUNT_SIGNED:
            width = widths[code]
            if pos + width > end:
                yield code, at, TRUNCATED, -1
                return
            size = data[pos] if width == 1 else int.from_bytes(data[pos : pos + width], "little", signed=kind == ARG_COUNT_SIGNED)
            if size < 0:
                yield code, at, NEGATIVE, -1
                return
            pos += width
            if size > end - pos:
                yield code, at, TRUNCATED, -1
                return
            yield code, at, pos, pos + size
            pos += size
        elif kind == ARG_LINE:
            nl = find(b"\n", pos, pos + MAX_LINE)
            if nl < 0:
                yield code, at, UNTERMINATED, -1
                return
            yield code, at, pos, nl + 1
            pos = nl + 1
        elif kind == ARG_TWO_LINES:
            first = find(b"\n", pos, pos + MAX_LINE)
            second = find(b"\n", first + 1, first + 1 + MAX_LINE) if first >= 0 else -1
            if second < 0:
                yield code, at, MALFORMED_GLOBAL, -1
                return
            yield code, at, first, second + 1
            pos = second + 1
        else:
            yield code, at, UNKNOWN, -1
            return
