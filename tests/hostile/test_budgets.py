"""Small files that cost huge time or memory (issue #12, section 2): nesting depth and views.

No timed asserts: depth is checked by what the scans decide (exact and C must agree), and
the view budget by the bytes the diff says it read.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from craft import (  # noqa: E402
    EMPTY_DICT,
    EMPTY_LIST,
    EMPTY_TUPLE,
    MARK,
    NONE,
    PROTO2,
    SETITEM,
    STOP,
    TUPLE,
    TUPLE1,
    glob,
    integer,
    native_end,
    state_pickle,
    storage,
    tensor,
    torch_zip,
)  # fmt: skip

from modelscope_tui.diff.stream import diff_checkpoints  # noqa: E402
from modelscope_tui.errors import MscopeError, UnsafePickleError  # noqa: E402
from modelscope_tui.readers import MIN_VIEW_BUDGET, open_checkpoint  # noqa: E402
from modelscope_tui.readers.pickle import scan as S  # noqa: E402

N = 200_000
FROZENSET, ADDITEMS, EMPTY_SET, APPEND, BUILD, REDUCE, BINPUT, BINGET = b"\x91", b"\x90", b"\x8f", b"a", b"b", b"R", b"q", b"h"

DEEP = {
    # a tuple key nested N deep: CPython's tuple hash recursed in C until SIGSEGV
    "tuple1 key": PROTO2 + EMPTY_DICT + EMPTY_TUPLE + TUPLE1 * N + NONE + SETITEM + STOP,
    "mark tuple key": PROTO2 + EMPTY_DICT + MARK * N + TUPLE * N + NONE + SETITEM + STOP,
    "frozenset": PROTO2 + MARK * N + FROZENSET * N + STOP,
    "set items": PROTO2 + (EMPTY_SET + MARK) * 2 + EMPTY_TUPLE + TUPLE1 * N + ADDITEMS + ADDITEMS + STOP,
    "lists": PROTO2 + EMPTY_LIST * (N + 1) + APPEND * N + STOP,
    "dict values": PROTO2 + (EMPTY_DICT + integer(1)) * N + EMPTY_DICT + SETITEM * N + STOP,
    "reduce chain": PROTO2 + glob("torch", "Size") + EMPTY_TUPLE + TUPLE1 * N + TUPLE1 + REDUCE + STOP,
    "build chain": PROTO2 + EMPTY_LIST * (N + 1) + BUILD * N + STOP,
    # the memo hides nothing: a GET is as deep as what was PUT
    "memo": PROTO2 + EMPTY_TUPLE + (TUPLE1 + BINPUT + b"\x00" + b"0" + BINGET + b"\x00") * N + STOP,
}


@pytest.mark.parametrize("name", DEEP)
def test_deep_nesting_is_refused_by_every_scan(name, monkeypatch):
    data = DEEP[name]
    with pytest.raises(UnsafePickleError, match="nest more than"):
        S.scan_exact(data, 0, "t")
    assert native_end(data) is None
    with pytest.raises(UnsafePickleError):
        S.scan_pickle(data, 0, "t")
    monkeypatch.setattr(S, "native_scan", lambda: None)  # no compiled library: the same refusal
    with pytest.raises(UnsafePickleError, match="nest more than"):
        S.scan_pickle(data, 0, "t")


@pytest.mark.parametrize("depth", [S.MAX_NESTING - 2, S.MAX_NESTING + 1])
def test_the_bound_is_the_same_in_c_and_python(depth):
    data = PROTO2 + EMPTY_DICT + EMPTY_TUPLE + TUPLE1 * depth + NONE + SETITEM + STOP
    try:
        want = S.scan_exact(data, 0, "t")
    except UnsafePickleError:
        want = None
    assert (want is None) == (depth + 1 > S.MAX_NESTING)
    assert native_end(data) == want


@pytest.mark.parametrize("name", ["tuple1 key", "mark tuple key", "memo"])
def test_deep_key_file_gives_one_clear_error(tmp_path, name):
    path = torch_zip(tmp_path / "deep.pt", DEEP[name], {})
    with pytest.raises(MscopeError, match="nest"):
        open_checkpoint(path)


def _stride0_views(tmp_path: Path, count: int) -> Path:
    """`count` stride-0 views of 2**28 fp16 values (512 MiB each, under the per-tensor limit)
    over one 4 KB storage, and one honest tensor."""
    items = {f"v{i}": tensor(storage("0", 2048, "HalfStorage"), 0, (1 << 28,), (0,)) for i in range(count)}
    items["honest"] = tensor(storage("1", 2048, "HalfStorage"), 0, (2048,), (1,))
    return torch_zip(tmp_path / "views.pt", state_pickle(items), {"0": bytes(4096), "1": bytes(4096)})


@pytest.mark.parametrize("count", [1, 120])
def test_views_share_one_budget(tmp_path, count):
    path = _stride0_views(tmp_path, count)
    ckpt = open_checkpoint(path, strict=False)
    assert len(ckpt.over_budget) == count  # each alone is over 256 MiB of repeated bytes
    assert any("budget" in w for w in ckpt.warnings)
    report = diff_checkpoints(ckpt, open_checkpoint(path, strict=False))
    assert report.bytes_read <= 2 * MIN_VIEW_BUDGET
    statuses = {d.a_name: d.status for d in report.tensors}
    assert statuses["honest"] == "identical"
    assert sum(s == "unreadable" for s in statuses.values()) == count


def test_views_within_budget_are_read(tmp_path):
    """Overlapping views a few times the storage: well inside the budget, all read."""
    items = {f"o{i}": tensor(storage("0", 2048, "HalfStorage"), i, (1024,), (1,)) for i in range(64)}
    path = torch_zip(tmp_path / "o.pt", state_pickle(items), {"0": bytes(4096)})
    ckpt = open_checkpoint(path)
    assert not ckpt.over_budget
    report = diff_checkpoints(ckpt, open_checkpoint(path))
    assert {d.status for d in report.tensors} == {"identical"}
