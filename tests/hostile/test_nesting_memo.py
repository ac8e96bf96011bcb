"""Nesting depth through the memo: MEMOIZE stores at the memo's size (as CPython does), so a GET
is exactly as deep as what was stored there. The first depth rule took the deepest object ever
memoized for every GET, and real protocol-4 files (torch.save of many small containers) were
refused as "nest more than 1,000 levels"."""

from __future__ import annotations

import pickle
import struct
import sys
from pathlib import Path

import pytest
import torch

from modelscope_tui.readers import open_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from craft import exact_end, native_end  # noqa: E402

from modelscope_tui.readers.pickle import scan as S

PROTO4 = b"\x80\x04"
EMPTY_TUPLE, TUPLE1, MEMOIZE, BINGET, LONG_BINGET, STOP = b")", b"\x85", b"\x94", b"h", b"j", b"."


def get(index: int) -> bytes:
    return BINGET + bytes([index]) if index < 256 else LONG_BINGET + struct.pack("<I", index)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_many_memoized_containers_are_not_deep(tmp_path, protocol):
    """Each value is shallow, but there are thousands of them, each memoized."""
    state = {f"layer{i}": {"w": torch.zeros(2), "cfg": (i, [i, (i,)], {"k": (i, i)})} for i in range(3000)}
    path = tmp_path / "many.pt"
    torch.save(state, path, pickle_protocol=protocol)
    ckpt = open_checkpoint(path)
    assert len(ckpt.tensors) == 3000
    data = pickle.dumps(state, protocol=protocol)
    assert exact_end(data) == native_end(data) == len(data)


def shallow_memo_chain(n: int) -> bytes:
    """n separate one-deep tuples, each memoized then fetched once: depth 1 at most."""
    body = b"".join(EMPTY_TUPLE + TUPLE1 + MEMOIZE + get(i) + b"0" for i in range(n))  # "0" = POP
    return PROTO4 + body + b"N" + STOP


def deep_memo_chain(n: int) -> bytes:
    """Each tuple wraps the previous one, reached only through MEMOIZE + GET."""
    out = PROTO4 + EMPTY_TUPLE + MEMOIZE
    for i in range(n):
        out += b"0" + get(i) + TUPLE1 + MEMOIZE  # drop the top, fetch it back, wrap it
    return out + STOP


def deep_memo_chain_dup(n: int) -> bytes:
    out = PROTO4 + EMPTY_TUPLE
    for _ in range(n):
        out += b"2" + b"0" + TUPLE1 + MEMOIZE  # DUP, POP: the memo is not needed to go deep
    return out + STOP


@pytest.mark.parametrize("n", [10, 5000])
def test_shallow_memo_traffic_is_accepted_by_both_scans(n):
    data = shallow_memo_chain(n)
    assert exact_end(data) == native_end(data) == len(data)


@pytest.mark.parametrize("build", [deep_memo_chain, deep_memo_chain_dup])
def test_depth_carried_through_memoize_is_refused_by_both_scans(build):
    ok = build(S.MAX_NESTING - 5)
    assert exact_end(ok) == native_end(ok) == len(ok)
    deep = build(S.MAX_NESTING + 5)
    assert exact_end(deep) is None and native_end(deep) is None
