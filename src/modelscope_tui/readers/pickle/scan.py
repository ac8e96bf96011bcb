"""The opcode pre-scan: every pickle is walked once before anything is built from it.

`scan_pickle` checks every length and memo index against the bytes actually present (so no
number read from the file can make us allocate), bounds the objects the unpickler would build
(memory, nesting depth, hash-flooding keys), and finds STOP. `scan_exact` is the specification;
picklescan.c mirrors it in C for speed (tests hold the two equal), and both read their opcodes
from opcodes.py.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from ...errors import UnsafePickleError
from .opcodes import (
    ARG,
    ARG_COUNT,
    ARG_COUNT_SIGNED,
    ARG_LINE,
    ARG_TWO_LINES,
    COST,
    KEYS_ALL,
    KEYS_EVEN,
    KEYS_SECOND,
    LONG1,
    MALFORMED_GLOBAL,
    NEGATIVE,
    NEST_DUP,
    NEST_GET,
    NEST_INTO,
    NEST_INTO_MARK,
    NEST_MARK,
    NEST_MEMOIZE,
    NEST_PLAIN,
    NEST_PUT,
    NEST_TO_MARK,
    OPCODES,
    STACK_GLOBAL,
    STOP,
    TRUNCATED,
    UNTERMINATED,
    WIDTH,
    column,
    tokens,
)

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
_MARK_DEPTH = -1  # a MARK on the depth stack
_NEST = column("nest")
_PUSHES = column("pushes")
# Objects an opcode takes off the stack into the one it builds; APPEND, SETITEM and BUILD leave
# their target where it is (it only gets deeper).
_POPS = [0 if o is None else o.pops - (o.nest == NEST_INTO) for o in OPCODES]

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
# hashes, and the ones that build sets count their members (unpickler.hashy and _charge_hashy).
MAX_HASHED_KEYS = 8192  # all colliding: about 33M comparisons, a fraction of a second
_HASHY = column("hashy")  # LONG1 is hashy from 8 bytes of value (decided from its length)
_KEYS = column("keys")

# -- memory ---------------------------------------------------------------------------------------
# A pickle is refused when the objects it builds (opcodes.COST, plus two per argument byte and
# the memo table) exceed PICKLE_MEMORY_RATIO times its length (and MIN_PICKLE_MEMORY): real
# checkpoints need about 12x (a 100k-tensor state_dict), while a flood of `}` would build 64x
# (8 MB of it took 2.7 GB and 46 s to open).
PICKLE_MEMORY_RATIO = 32
MIN_PICKLE_MEMORY = 16 << 20

DAMAGED = "the file is damaged or not a checkpoint; re-download or re-save it"
CRAFTED = "damaged or deliberately crafted; do not load it with torch.load"
_ARGUMENT_ERRORS = {  # opcodes.tokens' reasons, as the error says them
    NEGATIVE: ("negative length", DAMAGED),
    UNTERMINATED: ("unterminated text argument", DAMAGED),
    MALFORMED_GLOBAL: ("malformed global name", DAMAGED),
}


@functools.lru_cache(maxsize=1)
def native_scan() -> Callable[[bytes, int], int] | None:
    """picklescan.c's walk bound to the columns of opcodes.OPCODES and this module's limits:
    (data, start) -> end, or -1 where scan_exact refuses. None when the library is not built or
    stale (scan_exact then)."""
    from ... import native

    lib = native.library()
    try:
        if lib is None:
            return None
        scan = lib.mscope_scan_pickle
    except AttributeError:
        return None
    import ctypes

    scan.argtypes = [ctypes.c_char_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_char_p, ctypes.c_char_p,
                     ctypes.POINTER(ctypes.c_int32), ctypes.c_int64, ctypes.c_int64,
                     ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int64,
                     ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int64]  # fmt: skip
    scan.restype = ctypes.c_int64
    kinds, widths = bytes(ARG), bytes(WIDTH)
    costs = (ctypes.c_int32 * 256)(*COST)
    modes, pops, pushes = bytes(_NEST), bytes(_POPS), bytes(_PUSHES)
    hashy, keys = bytes(_HASHY), bytes(_KEYS)
    return lambda data, start: scan(data, len(data), start, kinds, widths, costs, PICKLE_MEMORY_RATIO,
                                    MIN_PICKLE_MEMORY, modes, pops, pushes, MAX_NESTING,
                                    hashy, keys, MAX_HASHED_KEYS)  # fmt: skip


def scan_pickle(data: bytes | memoryview, start: int = 0, source: str = "pickle") -> int:
    """Validate the pickle starting at `start` and return the offset just past its STOP.

    Raises UnsafePickleError for unknown opcodes, lengths past the end, memo indices larger than
    the pickle could legitimately need (the C unpickler sizes its memo array by the largest index;
    a real pickler numbers them from 0, one per PUT, so they stay below the pickle's length), a
    pickle with no STOP, one whose objects would take more than PICKLE_MEMORY_RATIO times its
    length (a flood of empty containers), nest deeper than MAX_NESTING, or put more than
    MAX_HASHED_KEYS keys whose hashes the file chooses into dicts and sets.

    The walk runs in C (picklescan.c) when the library is built and the data is bytes (an mmap
    has no address ctypes can take without a copy); otherwise, and to word a refusal, in Python
    (scan_exact, the same walk).
    """
    if type(data) is bytes:
        scan = native_scan()
        if scan is not None:
            end = scan(data, start)
            if end >= 0:
                return end
    return scan_exact(data, start, source)  # also when C refused: it says why


def scan_exact(data: bytes | memoryview, start: int, source: str) -> int:
    """The specification of the pre-scan (see scan_pickle): each opcode's stack effect on the
    depth and hash bookkeeping first, then its argument, whose reading may refuse it."""
    costs, kinds = COST, ARG
    modes, npops, npushes = _NEST, _POPS, _PUSHES
    hashy, key_role = _HASHY, _KEYS
    end = len(data)
    pos = start
    limit = end - start
    top = 0  # largest memo index; checked against the pickle's own length at STOP (the data may
    # run on far past it: a legacy file's storages, or junk after a plain pickle)
    cost = 0  # estimated bytes of objects the unpickler would build (see opcodes.COST)
    depths: list[int] = []  # each stack slot: depth << 1 | hashy (MAX_NESTING, MAX_HASHED_KEYS); _MARK_DEPTH for a MARK
    memo: dict[int, int] = {}
    deepest = 0
    op = start  # where the opcode being read starts: the valid prefix ends there (see run_prefix)
    named = False  # a GLOBAL, INST or STACK_GLOBAL was read: without one, no prefix calls anything
    hashed = 0  # hashy keys and members put into dicts and sets
    try:
        for code, op, arg, nxt in tokens(data, start):
            cost += costs[code]
            mode = modes[code]
            if mode == NEST_PLAIN and not npops[code]:  # the common case: push scalars/empties
                if npushes[code]:
                    depths.append(1 if hashy[code] or (code == LONG1 and nxt > 0 and nxt - arg >= 8) else 0)  # type: ignore[operator]
            elif mode == NEST_PLAIN:
                if code == STACK_GLOBAL:
                    named = True
                depth = 0
                for _ in range(npops[code]):
                    if depths and depths[-1] != _MARK_DEPTH:
                        depth = max(depth, (depths.pop() >> 1) + 1)
                if npushes[code]:
                    depths.extend([depth << 1 | hashy[code]] * npushes[code])
                    deepest = max(deepest, depth)
            elif mode == NEST_MARK:
                depths.append(_MARK_DEPTH)
            elif mode == NEST_INTO:
                if key_role[code] == KEYS_SECOND and len(depths) >= 2 and depths[-2] != _MARK_DEPTH:
                    hashed += depths[-2] & 1
                depth = 0
                for _ in range(npops[code]):
                    if depths and depths[-1] != _MARK_DEPTH:
                        depth = max(depth, (depths.pop() >> 1) + 1)
                if depths and depths[-1] != _MARK_DEPTH and depth > depths[-1] >> 1:
                    depths[-1] = depth << 1 | (depths[-1] & 1)
                    deepest = max(deepest, depth)
            elif mode == NEST_GET or mode == NEST_PUT:
                index = _memo_index(data, kinds[code], arg, nxt)
                if mode == NEST_GET:  # an index never stored: as deep as anything, and hashy
                    depths.append(memo.get(index, deepest << 1 | 1))
                elif depths and depths[-1] != _MARK_DEPTH and index >= 0:
                    memo[index] = depths[-1]
            elif mode == NEST_DUP:
                if depths:
                    depths.append(depths[-1])
            elif mode == NEST_MEMOIZE:  # stores at the memo's size, as CPython's unpicklers do
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
                if role == KEYS_ALL:
                    hashed += sum(flags)
                elif role == KEYS_EVEN:  # key, value, key, value... from the mark up
                    hashed += sum(flags[len(flags) - 1 :: -2])
                if mode == NEST_TO_MARK:
                    depths.append(depth << 1 | hashy[code])
                elif mode == NEST_INTO_MARK and depths and depths[-1] != _MARK_DEPTH and depth > depths[-1] >> 1:
                    depths[-1] = depth << 1 | (depths[-1] & 1)
                deepest = max(deepest, depth)
            if hashed > MAX_HASHED_KEYS:
                raise UnsafePickleError(
                    f"{source}: more than {MAX_HASHED_KEYS:,} dict keys or set members are numbers or tuples, "
                    f"whose hashes a file can make collide (hash flooding, at byte {op:,})", hint=CRAFTED,
                )  # fmt: skip
            if deepest > MAX_NESTING:
                raise UnsafePickleError(
                    f"{source}: objects nest more than {MAX_NESTING:,} levels deep (at byte {op:,})", hint=CRAFTED
                )
            kind = kinds[code]
            if kind == ARG_TWO_LINES:
                named = True  # GLOBAL / INST: a prefix up to a failure may call something
            if nxt < 0:  # the argument is malformed (opcodes.tokens says how)
                if arg == TRUNCATED:
                    break
                message, hint = _ARGUMENT_ERRORS.get(arg, (None, DAMAGED))  # type: ignore[call-overload]
                if message is None:
                    message = f"unknown pickle opcode 0x{code:02x} at byte {op}"
                raise UnsafePickleError(f"{source}: {message}", hint=hint)
            pos = nxt
            if kind == ARG_COUNT or kind == ARG_COUNT_SIGNED:
                cost += 2 * (nxt - arg)
            elif kind == ARG_LINE:
                cost += 2 * (nxt - 1 - arg)
            if mode == NEST_PUT and kind == ARG_LINE:  # PUT: a decimal line
                text = bytes(data[arg : nxt - 1])  # type: ignore[misc]
                if not text.isdigit() or int(text) > limit:
                    raise UnsafePickleError(f"{source}: memo index out of range", hint=CRAFTED)
                top = max(top, int(text))
            elif mode == NEST_PUT and WIDTH[code] == 4:  # LONG_BINPUT (BINPUT's byte stays under 256)
                if arg > limit:  # type: ignore[operator]
                    raise UnsafePickleError(f"{source}: memo index out of range", hint=CRAFTED)
                top = max(top, arg)  # type: ignore[call-overload]
            elif code == STOP:
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
    except UnsafePickleError as exc:
        exc.offset = op
        exc.names_globals = named  # type: ignore[attr-defined]
        raise
    exc = UnsafePickleError(f"{source}: pickle data is truncated", hint="the file is incomplete; re-download or re-save it")
    exc.offset = pos if pos == end else op
    exc.names_globals = named  # type: ignore[attr-defined]
    raise exc


def _memo_index(data: bytes | memoryview, kind: int, arg: object, nxt: int) -> int:
    """The memo index a GET or PUT names: its fixed argument, or the digits of its text line
    (-1 when it names none: a malformed argument, or text that is not a short decimal)."""
    if nxt < 0:
        return -1
    if kind != ARG_LINE:
        return arg  # type: ignore[return-value]
    text = bytes(data[arg : nxt - 1])  # type: ignore[misc]
    return int(text) if text.isdigit() and len(text) < 12 else -1
