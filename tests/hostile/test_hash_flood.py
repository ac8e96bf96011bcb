"""Hash flooding (issue #12, section 2): dict keys and set members whose hashes all collide.

Python ints hash to themselves mod 2**61-1, so k * (2**61-1) all hash to 0; floats, tuples and
frozensets hash from their items. 100k such keys took 83 s. Every spelling below is built
opcode by opcode and must be refused by the scans (exact and C agree) or by the
unpickler's set builders, before any table is built. No timed asserts: the refusal happens in
the scan, which never hashes anything.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from craft import (  # noqa: E402
    EMPTY_DICT,
    EMPTY_LIST,
    MARK,
    NONE,
    PROTO2,
    REDUCE,
    SETITEM,
    SETITEMS,
    STOP,
    TUPLE,
    TUPLE1,
    TUPLE2,
    TUPLE3,
    glob,
    integer,
    native_end,
    state_pickle,
    storage,
    tensor,
    torch_zip,
)  # fmt: skip

from modelscope_tui.errors import MscopeError, UnsafePickleError  # noqa: E402
from modelscope_tui.readers import open_checkpoint  # noqa: E402
from modelscope_tui.readers.pickle import scan as S  # noqa: E402
from modelscope_tui.readers.pickle import unpickler as U  # noqa: E402

N = 20_000  # well past MAX_HASHED_KEYS; each spelling's keys all hash alike
P = (1 << 61) - 1
FROZENSET, ADDITEMS, EMPTY_SET, DICT, APPENDS, BINGET, BINPUT = b"\x91", b"\x90", b"\x8f", b"d", b"e", b"h", b"q"
LONG_BINPUT, LONG_BINGET, DUP = b"r", b"j", b"2"


def binfloat(value: float) -> bytes:
    return b"G" + struct.pack(">d", value)


def _colliding_ints() -> list[bytes]:
    return [integer(k * P) for k in range(1, N + 1)]  # all hash to 0


def _colliding_floats() -> list[bytes]:
    # hash(m * 2**e) depends on e only mod 61: 2.0**(61*j) all hash to 1 (16 distinct values,
    # repeated: a float key counts whatever its value, the scans cannot see values)
    return [binfloat(2.0 ** (61 * (i % 16))) for i in range(N)]


def _pairs(keys: list[bytes], value: bytes = NONE) -> bytes:
    return b"".join(k + value for k in keys)


INT_KEYS = _colliding_ints()
SPELLINGS = {
    # dict keys, every way a pickle fills a dict
    "setitems ints": PROTO2 + EMPTY_DICT + MARK + _pairs(INT_KEYS) + SETITEMS + STOP,
    "setitem ints": PROTO2 + EMPTY_DICT + b"".join(k + NONE + SETITEM for k in INT_KEYS) + STOP,
    "dict opcode ints": PROTO2 + MARK + _pairs(INT_KEYS) + DICT + STOP,
    "long text ints": PROTO2 + EMPTY_DICT + MARK + _pairs([b"L%dL\n" % (k * P) for k in range(1, N + 1)]) + SETITEMS + STOP,
    "floats": PROTO2 + EMPTY_DICT + MARK + _pairs(_colliding_floats()) + SETITEMS + STOP,
    "tuple1 of ints": PROTO2 + EMPTY_DICT + MARK + _pairs([k + TUPLE1 for k in INT_KEYS]) + SETITEMS + STOP,
    "tuple2 of ints": PROTO2 + EMPTY_DICT + MARK + _pairs([integer(0) + k + TUPLE2 for k in INT_KEYS]) + SETITEMS + STOP,
    "tuple3": PROTO2 + EMPTY_DICT + MARK + _pairs([NONE + NONE + k + TUPLE3 for k in INT_KEYS]) + SETITEMS + STOP,
    "mark tuple": PROTO2 + EMPTY_DICT + MARK + _pairs([MARK + k + TUPLE for k in INT_KEYS]) + SETITEMS + STOP,
    "frozenset keys": PROTO2 + EMPTY_DICT + MARK + _pairs([MARK + k + FROZENSET for k in INT_KEYS]) + SETITEMS + STOP,
    # set members
    "additems": PROTO2 + EMPTY_SET + MARK + b"".join(INT_KEYS) + ADDITEMS + STOP,
    "frozenset members": PROTO2 + MARK + b"".join(INT_KEYS) + FROZENSET + STOP,
    # the memo hides nothing: keys PUT once and fetched as GETs keep their hashiness
    "memo gets": (
        PROTO2 + EMPTY_LIST + MARK
        + b"".join(k + LONG_BINPUT + struct.pack("<I", i) for i, k in enumerate(INT_KEYS))
        + APPENDS + EMPTY_DICT + MARK
        + b"".join(LONG_BINGET + struct.pack("<I", i) + NONE for i in range(N))
        + SETITEMS + TUPLE2 + STOP
    ),  # fmt: skip
    "dup": PROTO2 + EMPTY_DICT + MARK + b"".join(k + DUP + b"0" + NONE for k in INT_KEYS) + SETITEMS + STOP,
}


@pytest.mark.parametrize("name", SPELLINGS)
def test_colliding_keys_are_refused_by_every_scan(name, monkeypatch):
    data = SPELLINGS[name]
    with pytest.raises(UnsafePickleError, match="hash flooding"):
        S.scan_exact(data, 0, "t")
    assert native_end(data) is None
    with pytest.raises(UnsafePickleError, match="hash flooding"):
        U.safe_load(data, source="t")
    monkeypatch.setattr(S, "native_scan", lambda: None)  # no compiled library: the same refusal
    with pytest.raises(UnsafePickleError, match="hash flooding"):
        U.safe_load(data, source="t")


@pytest.mark.parametrize("count", [S.MAX_HASHED_KEYS, S.MAX_HASHED_KEYS + 1])
def test_the_bound_is_the_same_in_c_and_python(count):
    data = PROTO2 + EMPTY_DICT + MARK + _pairs(INT_KEYS[:count]) + SETITEMS + STOP
    try:
        want = S.scan_exact(data, 0, "t")
    except UnsafePickleError:
        want = None
    assert (want is None) == (count > S.MAX_HASHED_KEYS)
    assert native_end(data) == want


@pytest.mark.parametrize(
    "keys",
    [
        [integer(i) for i in range(N)],  # optimizer state: {0: ..., 1: ...}
        [integer((1 << 55) - 1 - i) for i in range(N)],  # ints below 2**55 hash apart
        [b"X" + struct.pack("<I", 6) + b"k%05d" % i for i in range(N)],  # str: keyed hash
    ],
    ids=["small ints", "55-bit ints", "strings"],
)
def test_keys_with_hashes_the_file_cannot_choose_are_not_counted(keys):
    data = PROTO2 + EMPTY_DICT + MARK + _pairs(keys) + SETITEMS + STOP
    assert S.scan_exact(data, 0, "t") == len(data) == native_end(data)
    obj, _, _ = U.safe_load(data, source="t")
    assert len(obj) == N


def test_values_are_not_keys():
    """Floats and tuples as dict values (hyper-parameters, shapes) cost nothing."""
    data = PROTO2 + EMPTY_DICT + MARK + b"".join(integer(i) + binfloat(1.0) + TUPLE1 for i in range(N)) + SETITEMS + STOP
    assert S.scan_exact(data, 0, "t") == len(data) == native_end(data)


# -- the allowlisted set builders (REDUCE), which the scans see as calls --------------------
def _list(items: list[bytes]) -> bytes:
    return EMPTY_LIST + MARK + b"".join(items) + APPENDS


@pytest.mark.parametrize("fn", ["set", "frozenset"])
def test_set_builders_charge_their_members(fn):
    data = PROTO2 + glob("builtins", fn) + _list(INT_KEYS) + TUPLE1 + REDUCE + STOP
    with pytest.raises(UnsafePickleError, match="hash flooding"):
        U.safe_load(data, source="t")


def test_many_small_set_builders_share_one_budget():
    """100 sets of 100 colliding members: each alone is small, together past the bound."""
    one = glob("builtins", "set") + _list(INT_KEYS[:100]) + TUPLE1 + REDUCE
    data = PROTO2 + EMPTY_LIST + MARK + one * 100 + APPENDS + STOP
    with pytest.raises(UnsafePickleError, match="hash flooding"):
        U.safe_load(data, source="t")


@pytest.mark.parametrize(
    "build",
    [
        lambda k: glob("builtins", "frozenset") + _list([k, integer(1)]) + TUPLE1 + REDUCE,
        lambda k: glob("torch", "Size") + MARK + integer(0) + k + TUPLE + TUPLE1 + REDUCE,
        lambda k: glob("builtins", "complex") + binfloat(1.0) + binfloat(0.5) + TUPLE2 + REDUCE,
    ],
    ids=["frozenset", "torch.Size", "complex"],
)
def test_reduce_results_used_as_keys_hash_by_identity(build):
    """What an allowlisted call returns is not hashy for the scans: it must hash by identity."""
    data = PROTO2 + EMPTY_DICT + MARK + _pairs([build(k) for k in INT_KEYS[:2000]]) + SETITEMS + STOP
    obj, _, _ = U.safe_load(data, source="t")
    hashes = {hash(k) for k in obj}
    assert len(hashes) == len(obj) == 2000


def test_passthrough_charges_what_it_hands_back():
    """restore_type_tag returns its argument: a tuple from it is charged like a set member."""
    tag = glob("torch.jit._pickle", "restore_type_tag")
    keys = [tag + MARK + k + TUPLE1 + b"X\x01\x00\x00\x00t" + TUPLE + REDUCE for k in INT_KEYS]
    data = PROTO2 + EMPTY_LIST + MARK + b"".join(keys) + APPENDS + STOP
    with pytest.raises(UnsafePickleError, match="hash flooding"):
        U.safe_load(data, source="t")


# -- after the pickle: records grouped by shape ---------------------------------------------
def _colliding_shapes(count: int) -> list[tuple[int, int, int]]:
    """3-dim shapes (0, a, b) whose tuple hashes all collide (numel 0: every check passes)."""
    target = hash((0, 1, 2))
    out = []
    a = 3
    while len(out) < count:
        b = _solve_last((0, a), target)
        if b is not None:
            out.append((0, a, b))
        a += 1
    return out


_XXPRIME_1, _XXPRIME_2, _XXPRIME_5 = 11400714785074694791, 14029467366897019727, 2870177450012600261
_M64 = (1 << 64) - 1


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M64


def _solve_last(prefix: tuple[int, int], target: int) -> int | None:
    """The int b with hash(prefix + (b,)) == target, when one below 2**61-1 exists
    (CPython 3.8+ tuple hash: xxHash's round per item, then the length folded in)."""
    acc = _XXPRIME_5
    for item in prefix:
        acc = (_rotl((acc + (hash(item) & _M64) * _XXPRIME_2) & _M64, 31) * _XXPRIME_1) & _M64
    want = ((target & _M64) - (3 ^ (_XXPRIME_5 ^ 3527539))) & _M64
    inv1, inv2 = pow(_XXPRIME_1, -1, 1 << 64), pow(_XXPRIME_2, -1, 1 << 64)
    before = _rotl((want * inv1) & _M64, 33)  # undo the rotate by 31
    lane = ((before - acc) * inv2) & _M64
    return lane if lane < P - 1 else None


def test_shape_collisions_are_real():
    shapes = _colliding_shapes(50)
    assert len({hash(s) for s in shapes}) == 1 and len(set(shapes)) == 50


def test_views_with_colliding_shapes_link_in_linear_work(tmp_path):
    """4,000 empty views of one storage whose shapes collide: link_shared_storages groups them
    by view without hashing a shape tuple (each dict lookup costs one comparison)."""
    shapes = _colliding_shapes(4000)
    items = {f"v{i}": tensor(storage("0", 4), 0, s, (0, 0, 0)) for i, s in enumerate(shapes)}
    path = torch_zip(tmp_path / "shapes.pt", state_pickle(items), {"0": bytes(16)})
    compared = 0
    original = tuple.__eq__

    class Counting(tuple):
        __slots__ = ()

        def __eq__(self, other):
            nonlocal compared
            compared += 1
            return original(self, other)

        __hash__ = tuple.__hash__

    ckpt = open_checkpoint(path, strict=False)
    for t in ckpt.tensors:
        t.shape = Counting(t.shape)
    ckpt.link_shared_storages()
    assert compared < 10 * len(shapes)
    assert sum(t.alias_of is not None for t in ckpt.tensors) == 0


def test_colliding_key_file_gives_one_clear_error(tmp_path):
    path = torch_zip(tmp_path / "flood.pt", SPELLINGS["setitems ints"], {})
    with pytest.raises(MscopeError, match="hash flooding"):
        open_checkpoint(path)


def test_block_numbers_in_names_are_not_int_keys(tmp_path):
    """`layers.<k * (2**61-1)>.weight`: numbers from names become set and dict keys (the norm
    profile, block groups, "last N blocks"); past 15 digits they are not block numbers."""
    from modelscope_tui.audit.runner import audit_path
    from modelscope_tui.checkpoint import block_index
    from modelscope_tui.training.session import Session

    assert block_index("12") == 12 and block_index(str(P)) is None and block_index("\u0661") is None
    names = {f"layers.{k * P}.weight": tensor(storage("0", 4), 0, (4,), (1,)) for k in range(1, 3000)}
    names.update({f"layers.{i}.weight": tensor(storage("0", 4), 0, (4,), (1,)) for i in range(3)})
    path = torch_zip(tmp_path / "blocks.pt", state_pickle(names), {"0": struct.pack("<4f", 1, 2, 3, 4)})
    report = audit_path(path, stats=True)
    assert report is not None
    groups = Session(open_checkpoint(path)).block_groups()
    assert [g.indices for g in groups if g.prefix == "layers"] == [[0, 1, 2]]
