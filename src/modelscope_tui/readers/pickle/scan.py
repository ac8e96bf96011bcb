"""The opcode pre-scan: every pickle is walked once before anything is built from it.

`scan_pickle` checks every length and memo index against the bytes actually present (so no
number read from the file can make us allocate), bounds the objects the unpickler would build
(memory, nesting depth, hash-flooding keys), and finds STOP. `scan_exact` is the specification;
picklescan.c mirrors it in C for speed, and tests hold the two equal.
"""

from __future__ import annotations

import functools
import pickletools
import re
import struct
from collections.abc import Callable

from ...errors import UnsafePickleError

# ----------------------------------------------------------------------------------------------
# Opcode scan
# ----------------------------------------------------------------------------------------------
_INVALID, _NEWLINE, _COUNT1, _COUNT4S, _COUNT4U, _COUNT8 = -9, -1, -2, -3, -4, -5
_LONG_BINPUT, _PUT, _STOP, _TWO_LINES = -6, -7, -8, -10


def _opcode_table() -> list[int]:
    table = [_INVALID] * 256
    for op in pickletools.opcodes:
        code = op.code.encode("latin-1")[0]
        table[code] = 0 if op.arg is None else op.arg.n
        if op.name == "STOP":
            table[code] = _STOP
        elif op.name == "LONG_BINPUT":
            table[code] = _LONG_BINPUT
        elif op.name == "PUT":
            table[code] = _PUT
        elif op.name in ("GLOBAL", "INST"):
            table[code] = _TWO_LINES
    return table


_OPCODES = _opcode_table()

# -- nesting ------------------------------------------------------------------------------
# CPython hashes a tuple (a dict key, a set member) by recursing in C with no depth guard: a
# 200k-deep tuple used as a key overflowed the C stack inside the unpickler (SIGSEGV). So the
# exact walk (and picklescan.c, from the same table) follows the depth of every stack slot: an
# object built from others is one deeper than the deepest of them, a container filled by
# APPEND/SETITEM/BUILD at least one deeper than what went in, a memo GET as deep as the PUT
# recorded (or the deepest seen, when the index was never PUT). Over MAX_NESTING: refused. A
# list mutated after it was memoised keeps its old depth in the memo; that cannot reach hash
# (a list is unhashable), and every other recursion over objects is guarded or iterative.
MAX_NESTING = 1000  # a full torch.save(model) nests about 3 levels per module level
_N_PLAIN, _N_MARK, _N_TO_MARK, _N_INTO_MARK, _N_POP_MARK, _N_INTO, _N_DUP, _N_GET, _N_PUT, _N_MEMOIZE = range(10)
_MARK_DEPTH = -1  # a MARK on the depth stack


def _nesting_table() -> tuple[list[int], list[int], list[int]]:
    """(mode, pops, pushes) of each opcode byte, from pickletools' stack effects."""
    modes, pops, pushes = [_N_PLAIN] * 256, [0] * 256, [0] * 256
    special = {
        "MARK": _N_MARK, "LIST": _N_TO_MARK, "TUPLE": _N_TO_MARK, "DICT": _N_TO_MARK,
        "FROZENSET": _N_TO_MARK, "INST": _N_TO_MARK, "OBJ": _N_TO_MARK, "APPENDS": _N_INTO_MARK,
        "SETITEMS": _N_INTO_MARK, "ADDITEMS": _N_INTO_MARK, "POP_MARK": _N_POP_MARK,
        "APPEND": _N_INTO, "SETITEM": _N_INTO, "BUILD": _N_INTO, "DUP": _N_DUP, "GET": _N_GET,
        "BINGET": _N_GET, "LONG_BINGET": _N_GET, "PUT": _N_PUT, "BINPUT": _N_PUT,
        "LONG_BINPUT": _N_PUT, "MEMOIZE": _N_MEMOIZE,
    }  # fmt: skip
    for op in pickletools.opcodes:
        code = op.code.encode("latin-1")[0]
        modes[code] = special.get(op.name, _N_PLAIN)
        pops[code] = len(op.stack_before) - (1 if op.name in ("APPEND", "SETITEM", "BUILD") else 0)
        pushes[code] = len(op.stack_after)
    return modes, pops, pushes


_NEST_MODE, _NEST_POPS, _NEST_PUSHES = _nesting_table()

# -- hash flooding ----------------------------------------------------------------------------
# Python ints hash to themselves mod 2**61-1 (so k * (2**61-1) all hash to 0), and float, tuple
# and frozenset hashes follow from their items': a file can fill a dict or set with keys that all
# collide, and each insertion then compares against every earlier one (100k int keys: 83 s).
# str and bytes hashes are keyed per process, and ints below 2**56 hash to distinct values. So
# the scans also follow, for each stack slot, whether its hash is the file's choice ("hashy":
# floats, longer ints, tuples, frozensets; a memo GET as the PUT recorded), and count such keys
# and members going into dicts and sets (SETITEM, SETITEMS, DICT, ADDITEMS, FROZENSET). Past
# MAX_HASHED_KEYS the pickle is refused. Slots hold depth << 1 | hashy. What the allowlisted
# functions return (REDUCE) is never hashy: they return values hashed by identity or keyed
# hashes, and the ones that build sets count their members (see _HashCount).
MAX_HASHED_KEYS = 8192  # all colliding: about 33M comparisons, a fraction of a second
_K_NONE, _K_SECOND, _K_EVEN, _K_ALL = 0, 1, 2, 3
_LONG1 = 0x8A
_STACK_GLOBAL = 0x93


def _hash_tables() -> tuple[list[int], list[int]]:
    """(hashy, key role) of each opcode byte. LONG1 is hashy from 8 bytes of value (decided
    where its length byte is read)."""
    hashy_ops = {"FLOAT", "BINFLOAT", "INT", "LONG", "LONG4", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "FROZENSET"}
    roles = {"SETITEM": _K_SECOND, "SETITEMS": _K_EVEN, "DICT": _K_EVEN, "ADDITEMS": _K_ALL, "FROZENSET": _K_ALL}
    hashy, role = [0] * 256, [0] * 256
    for op in pickletools.opcodes:
        code = op.code.encode("latin-1")[0]
        hashy[code] = int(op.name in hashy_ops)
        role[code] = roles.get(op.name, _K_NONE)
    return hashy, role


_HASHY, _KEY_ROLE = _hash_tables()

# Rough bytes each opcode makes the C unpickler build and keep (CPython 3.11 object sizes; a
# reference on the stack or in a container is 8). Length-prefixed and text arguments add two per
# byte (a str may widen). A pickle is refused when the total exceeds PICKLE_MEMORY_RATIO times its
# length (and MIN_PICKLE_MEMORY): real checkpoints need about 12x (a 100k-tensor state_dict), while
# a flood of `}` would build 64x (8 MB of it took 2.7 GB and 46 s to open).
_OBJECT_COSTS = {
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
PICKLE_MEMORY_RATIO = 32
MIN_PICKLE_MEMORY = 16 << 20


def _cost_table() -> list[int]:
    table = [8] * 256
    for op in pickletools.opcodes:
        table[op.code.encode("latin-1")[0]] = _OBJECT_COSTS.get(op.name, 8)
    return table


_COSTS = _cost_table()
DAMAGED = "the file is damaged or not a checkpoint; re-download or re-save it"
CRAFTED = "damaged or deliberately crafted; do not load it with torch.load"
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")

# -- fast scan ------------------------------------------------------------------------------
# One possessive regex swallows runs of ordinary opcodes in C (fixed-size arguments, strings
# under 256 bytes, LONG_BINPUT below a bound), so Python only sees the rare rest. The object
# cost is then bounded from byte counts: every byte priced as if it were an opcode, plus a memo
# as large as the pickle, is never less than the exact walk's figure.
_MEMO_STEP = 1 << 16  # LONG_BINPUT bounds are whole multiples of this (few distinct regexes)


def _byte_class(codes: list[int]) -> bytes:
    return b"[" + b"".join(re.escape(bytes([c])) for c in sorted(codes)) + b"]"


def _uint_le_below(limit: int, width: int) -> bytes:
    """Regex for a little-endian unsigned integer of `width` bytes that is < limit (limit > 0)."""
    top = (limit - 1).to_bytes(width, "little")
    alternatives = []
    for k in range(width - 1, -1, -1):  # digit k smaller (last digit: at most), higher ones equal
        high = top[k] if k == 0 else top[k] - 1
        if high < 0:
            continue
        equal = b"".join(re.escape(bytes([top[j]])) for j in range(k + 1, width))
        alternatives.append(b"." * k + b"[\\x00-" + re.escape(bytes([high])) + b"]" + equal)
    return b"(?:" + b"|".join(alternatives) + b")"


@functools.lru_cache(maxsize=8)
def _fast_scanner(memo_steps: int) -> re.Pattern[bytes] | None:
    single, count1, count4, fixed = [], [], [], {}
    for op in pickletools.opcodes:
        code = op.code.encode("latin-1")[0]
        kind = _OPCODES[code]
        if op.name in ("STOP", "LONG_BINPUT", "PUT") or kind in (_TWO_LINES, _NEWLINE):
            continue
        if kind == 0:
            single.append(code)
        elif kind > 0:
            fixed.setdefault(kind, []).append(code)
        elif kind == _COUNT1:
            count1.append(code)
        elif kind in (_COUNT4U, _COUNT4S):
            count4.append(code)
    # The engine tries alternatives in order: most frequent in torch pickles first (memo puts,
    # then one-byte arguments, argument-less opcodes, strings). 1.8x faster than sorted order.
    parts = [b"r.." + _uint_le_below(memo_steps, 2)] if memo_steps else []
    parts.append(_byte_class(fixed.pop(1)) + b".")
    parts.append(_byte_class(single))
    parts.append(_byte_class(count4) + b"(?:" + b"|".join(re.escape(bytes([n])) + b"\\x00\\x00\\x00.{%d}" % n for n in range(256)) + b")")
    parts.extend(_byte_class(codes) + b".{%d}" % n for n, codes in sorted(fixed.items()))
    parts.append(_byte_class(count1) + b"(?:" + b"|".join(re.escape(bytes([n])) + b".{%d}" % n for n in range(256)) + b")")
    try:
        return re.compile(b"(?:" + b"|".join(parts) + b")*+", re.S)
    except re.error:  # possessive repeats need Python 3.11
        return None


def _cost_classes() -> tuple[bytes, bytes, list[int]]:
    """translate() table and deletions that keep only the bytes priced above the default 8."""
    extra = sorted({c - 8 for c in _COSTS if c > 8})
    table = bytearray(range(256))
    for code, cost in enumerate(_COSTS):
        if cost > 8:
            table[code] = extra.index(cost - 8)
    cheap = bytes(code for code, cost in enumerate(_COSTS) if cost <= 8)
    return bytes(table), cheap, extra


_COST_TABLE, _CHEAP_BYTES, _EXTRA_COSTS = _cost_classes()


def _cost_bound(pickle_bytes: bytes) -> int:
    priced = pickle_bytes.translate(_COST_TABLE, _CHEAP_BYTES)
    total = 8 * len(pickle_bytes)
    for index, extra in enumerate(_EXTRA_COSTS):
        total += extra * priced.count(index)
    return total + 8 * len(pickle_bytes)  # memo: at most one slot per byte (checked by the regex)


def _scan_fast(data: bytes | memoryview, start: int) -> int | None:
    """End of an ordinary pickle, or None: let the exact scan decide (and explain)."""
    end = len(data)
    if not 0 <= start < end:
        return None
    steps = (end - start) // _MEMO_STEP
    scanner = _fast_scanner(steps)
    if scanner is None:
        return None
    pos = start
    u32 = _U32.unpack_from
    try:
        while True:
            pos = scanner.match(data, pos).end()
            if pos >= end:
                return None
            k = _OPCODES[data[pos]]
            if k == _STOP:
                break
            if k == _TWO_LINES:
                first = data.find(b"\n", pos + 1, pos + 4097)
                second = data.find(b"\n", first + 1, first + 4097) if first >= 0 else -1
                if second < 0:
                    return None
                pos = second + 1
            elif k == _COUNT4U or k == _COUNT4S:
                n = u32(data, pos + 1)[0]
                if n >= 1 << 31 or pos + 5 + n > end:
                    return None
                pos += 5 + n
            else:
                return None
    except (IndexError, struct.error):
        return None
    length = pos + 1 - start
    if steps * _MEMO_STEP > length:  # memo indices were only checked against the whole buffer
        if start == 0 and end == length:
            return None
        inner = _scan_fast(bytes(data[start : pos + 1]), 0)
        return None if inner is None else start + inner
    budget = max(MIN_PICKLE_MEMORY, PICKLE_MEMORY_RATIO * length)
    if (max(_COSTS) + 16) * length > budget and _cost_bound(bytes(data[start : pos + 1])) > budget:
        return None
    if length > MAX_NESTING and _nesting_bound(bytes(data[start : pos + 1])) > MAX_NESTING:
        return None  # might nest too deep: the exact walk (or the C one) follows the depths
    if length > MAX_HASHED_KEYS and _hashy_bound(bytes(data[start : pos + 1])) > MAX_HASHED_KEYS:
        return None  # might put too many hashy keys in dicts: the exact walk counts them
    return pos + 1


def _hashy_opcodes() -> bytes:
    """Bytes of every opcode that can push a hashy slot: the hashy ones, LONG1, and the memo
    GETs and DUP that copy one. Each hashy key put into a dict or set was pushed by one."""
    copies = {code for code in range(256) if _NEST_MODE[code] in (_N_GET, _N_DUP)}
    return bytes(code for code in range(256) if _HASHY[code] or code == _LONG1 or code in copies)


_NOT_HASHY = bytes(set(range(256)) - set(_hashy_opcodes()))


def _hashy_bound(pickle_bytes: bytes) -> int:
    """An upper bound of the hashy keys and members (argument bytes count too)."""
    return len(pickle_bytes.translate(None, _NOT_HASHY))


def _nesting_opcodes() -> bytes:
    """Bytes of every opcode that can make an object deeper than what it was built from."""
    deeper = (_N_TO_MARK, _N_INTO_MARK, _N_INTO)
    return bytes(
        code for code in range(256)
        if _NEST_MODE[code] in deeper or (_NEST_MODE[code] == _N_PLAIN and _NEST_POPS[code] and _NEST_PUSHES[code])
    )  # fmt: skip


_NOT_NESTING = bytes(set(range(256)) - set(_nesting_opcodes()))


def _nesting_bound(pickle_bytes: bytes) -> int:
    """An upper bound of the depth: each level needs one nesting opcode (argument bytes that
    look like one are counted too, which only makes the bound larger)."""
    return len(pickle_bytes.translate(None, _NOT_NESTING))


NATIVE_SCAN_MIN_BYTES = 1 << 20  # below this the regex is quicker than importing ctypes


@functools.lru_cache(maxsize=1)
def native_scan() -> Callable[[bytes, int], int] | None:
    """picklescan.c's walk bound to this module's opcode and cost tables: (data, start) -> end,
    or -1 where scan_exact refuses. None when the library is not built or stale (the regex then)."""
    from ... import native

    lib = native.library()
    try:
        if lib is None:
            return None
        scan = lib.mscope_scan_pickle
    except AttributeError:
        return None
    import ctypes

    scan.argtypes = [ctypes.c_char_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_char_p,
                     ctypes.POINTER(ctypes.c_int32), ctypes.c_int64, ctypes.c_int64,
                     ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int64,
                     ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int64]  # fmt: skip
    scan.restype = ctypes.c_int64
    kinds = bytes(k & 0xFF for k in _OPCODES)  # int8 in C
    costs = (ctypes.c_int32 * 256)(*_COSTS)
    modes, pops, pushes = bytes(_NEST_MODE), bytes(_NEST_POPS), bytes(_NEST_PUSHES)
    hashy, roles = bytes(_HASHY), bytes(_KEY_ROLE)
    return lambda data, start: scan(data, len(data), start, kinds, costs, PICKLE_MEMORY_RATIO,
                                    MIN_PICKLE_MEMORY, modes, pops, pushes, MAX_NESTING,
                                    hashy, roles, MAX_HASHED_KEYS)  # fmt: skip


def _scan_native(data: bytes | memoryview, start: int, small: bool = False) -> int | None:
    """End of the pickle, -1 when refused, None when the C walk is unavailable or not worth it
    (`small`: worth it whatever the size, since the regex deferred)."""
    if type(data) is not bytes or (not small and len(data) - start < NATIVE_SCAN_MIN_BYTES):
        return None  # an mmap (legacy files) has no address ctypes can take without a copy
    scan = native_scan()
    return None if scan is None else scan(data, start)


def scan_pickle(data: bytes | memoryview, start: int = 0, source: str = "pickle") -> int:
    """Validate the pickle starting at `start` and return the offset just past its STOP.

    Raises UnsafePickleError for unknown opcodes, lengths past the end, memo indices larger than
    the pickle could legitimately need (the C unpickler sizes its memo array by the largest index;
    a real pickler numbers them from 0, one per PUT, so they stay below the pickle's length), a
    pickle with no STOP, or one whose objects would take more than PICKLE_MEMORY_RATIO times its
    length (a flood of empty containers). Depth is bounded later, where objects are walked.

    Large pickles are walked in C (picklescan.c, the same walk as scan_exact), others by the
    regex-driven fast scan; anything those cannot vouch for (an odd opcode, a memo index near
    the limit, a cost bound over budget) gets the exact opcode walk, which also words the error.
    """
    end = _scan_native(data, start)
    if end is None:
        end = _scan_fast(data, start)
        if end is None:
            end = _scan_native(data, start, small=True)
    if end is not None and end < 0:
        end = None  # refused: the exact walk says why
    return end if end is not None else scan_exact(data, start, source)


def scan_exact(data: bytes | memoryview, start: int, source: str) -> int:
    table = _OPCODES
    costs = _COSTS
    end = len(data)
    pos = start
    limit = end - start
    top = 0  # largest memo index; checked against the pickle's own length at STOP (the data may
    # run on far past it: a legacy file's storages, or junk after a plain pickle)
    cost = 0  # estimated bytes of objects the unpickler would build (see _OBJECT_COSTS)
    u32 = _U32.unpack_from
    modes, npops, npushes = _NEST_MODE, _NEST_POPS, _NEST_PUSHES
    depths: list[int] = []  # each stack slot: depth << 1 | hashy (MAX_NESTING, MAX_HASHED_KEYS); _MARK_DEPTH for a MARK
    memo: dict[int, int] = {}
    deepest = 0
    op = start  # where the opcode being read starts: the valid prefix ends there (see run_prefix)
    named = False  # a GLOBAL, INST or STACK_GLOBAL was read: without one, no prefix calls anything
    hashy, key_role = _HASHY, _KEY_ROLE
    hashed = 0  # hashy keys and members put into dicts and sets
    try:
        while pos < end:
            op = pos
            code = data[pos]
            k = table[code]
            cost += costs[code]
            mode = modes[code]
            if mode == _N_PLAIN and not npops[code]:  # the common case: push scalars/empties
                if npushes[code]:
                    depths.append(1 if hashy[code] or (code == _LONG1 and data[pos + 1] >= 8) else 0)
            elif mode == _N_PLAIN:
                if code == _STACK_GLOBAL:
                    named = True
                depth = 0
                for _ in range(npops[code]):
                    if depths and depths[-1] != _MARK_DEPTH:
                        depth = max(depth, (depths.pop() >> 1) + 1)
                if npushes[code]:
                    depths.extend([depth << 1 | hashy[code]] * npushes[code])
                    deepest = max(deepest, depth)
            elif mode == _N_MARK:
                depths.append(_MARK_DEPTH)
            elif mode == _N_INTO:
                if key_role[code] == _K_SECOND and len(depths) >= 2 and depths[-2] != _MARK_DEPTH:
                    hashed += depths[-2] & 1
                depth = 0
                for _ in range(npops[code]):
                    if depths and depths[-1] != _MARK_DEPTH:
                        depth = max(depth, (depths.pop() >> 1) + 1)
                if depths and depths[-1] != _MARK_DEPTH and depth > depths[-1] >> 1:
                    depths[-1] = depth << 1 | (depths[-1] & 1)
                    deepest = max(deepest, depth)
            elif mode == _N_GET or mode == _N_PUT:
                if code == 0x68 or code == 0x71:  # BINGET / BINPUT: one byte
                    index = data[pos + 1] if pos + 1 < end else -1
                elif code == 0x6A or code == 0x72:  # LONG_BINGET / LONG_BINPUT
                    index = u32(data, pos + 1)[0] if pos + 5 <= end else -1
                else:  # GET / PUT: a decimal line
                    nl = data.find(b"\n", pos + 1, pos + 4097)
                    text = bytes(data[pos + 1 : nl]) if nl > 0 else b""
                    index = int(text) if text.isdigit() and len(text) < 12 else -1
                if mode == _N_GET:  # an index never stored: as deep as anything, and hashy
                    depths.append(memo.get(index, deepest << 1 | 1))
                elif depths and depths[-1] != _MARK_DEPTH and index >= 0:
                    memo[index] = depths[-1]
            elif mode == _N_DUP:
                if depths:
                    depths.append(depths[-1])
            elif mode == _N_MEMOIZE:  # stores at the memo's size, as CPython's unpicklers do
                if depths and depths[-1] != _MARK_DEPTH:
                    memo[len(memo)] = depths[-1]
            else:  # to the mark: build one object of what is above it, or fill the one below it
                depth = 0
                role = key_role[code]
                flags = []  # hashy bit of each item, top first (for keys at even offsets)
                while depths:
                    top_depth = depths.pop()
                    if top_depth == _MARK_DEPTH:
                        break
                    depth = max(depth, (top_depth >> 1) + 1)
                    if role:
                        flags.append(top_depth & 1)
                if role == _K_ALL:
                    hashed += sum(flags)
                elif role == _K_EVEN:  # key, value, key, value... from the mark up
                    hashed += sum(flags[len(flags) - 1 :: -2])
                if mode == _N_TO_MARK:
                    depths.append(depth << 1 | hashy[code])
                elif mode == _N_INTO_MARK and depths and depths[-1] != _MARK_DEPTH and depth > depths[-1] >> 1:
                    depths[-1] = depth << 1 | (depths[-1] & 1)
                deepest = max(deepest, depth)
            if hashed > MAX_HASHED_KEYS:
                raise UnsafePickleError(
                    f"{source}: more than {MAX_HASHED_KEYS:,} dict keys or set members are numbers or tuples, "
                    f"whose hashes a file can make collide (hash flooding, at byte {pos:,})", hint=CRAFTED,
                )  # fmt: skip
            if deepest > MAX_NESTING:
                raise UnsafePickleError(
                    f"{source}: objects nest more than {MAX_NESTING:,} levels deep (at byte {pos:,})", hint=CRAFTED
                )
            pos += 1
            if k >= 0:
                pos += k
            elif k == _COUNT4U:
                n = u32(data, pos)[0]
                cost += 2 * n
                pos += 4 + n
            elif k == _TWO_LINES:
                named = True  # GLOBAL / INST: a prefix up to a failure may call something
                first = data.find(b"\n", pos, pos + 4096)
                second = data.find(b"\n", first + 1, first + 4097) if first >= 0 else -1
                if second < 0:
                    raise UnsafePickleError(f"{source}: malformed global name", hint=DAMAGED)
                pos = second + 1
            elif k == _COUNT1:
                n = data[pos]
                cost += 2 * n
                pos += 1 + n
            elif k == _LONG_BINPUT:
                index = u32(data, pos)[0]
                if index > limit:
                    raise UnsafePickleError(f"{source}: memo index out of range", hint=CRAFTED)
                if index > top:
                    top = index
                pos += 4
            elif k == _STOP:
                length = pos - start
                if top > length:
                    raise UnsafePickleError(f"{source}: memo index out of range", hint=CRAFTED)
                cost += 8 * top  # the memo table is sized by its largest index
                budget = max(MIN_PICKLE_MEMORY, PICKLE_MEMORY_RATIO * length)
                if cost > budget:
                    raise UnsafePickleError(
                        f"{source}: a {length:,}-byte pickle that would build about "
                        f"{cost >> 20:,} MiB of objects (at most {budget >> 20:,} MiB allowed)",
                        hint=CRAFTED,
                    )
                return pos
            elif k == _NEWLINE or k == _PUT:
                nl = data.find(b"\n", pos, pos + 4096)
                if nl < 0:
                    raise UnsafePickleError(f"{source}: unterminated text argument", hint=DAMAGED)
                if k == _PUT:
                    text = bytes(data[pos:nl])
                    if not text.isdigit() or int(text) > limit:
                        raise UnsafePickleError(f"{source}: memo index out of range", hint=CRAFTED)
                    top = max(top, int(text))
                cost += 2 * (nl - pos)
                pos = nl + 1
            elif k == _COUNT4S:
                n = _I32.unpack_from(data, pos)[0]
                if n < 0:
                    raise UnsafePickleError(f"{source}: negative length", hint=DAMAGED)
                cost += 2 * n
                pos += 4 + n
            elif k == _COUNT8:
                n = _U64.unpack_from(data, pos)[0]
                cost += 2 * n
                pos += 8 + n
            else:
                raise UnsafePickleError(
                    f"{source}: unknown pickle opcode 0x{data[pos - 1]:02x} at byte {pos - 1}",
                    hint=DAMAGED,
                )
    except (IndexError, struct.error):
        pass
    except UnsafePickleError as exc:
        exc.offset = op
        exc.names_globals = named  # type: ignore[attr-defined]
        raise
    exc = UnsafePickleError(f"{source}: pickle data is truncated", hint="the file is incomplete; re-download or re-save it")
    exc.offset = pos if pos == end else op
    exc.names_globals = named  # type: ignore[attr-defined]
    raise exc
