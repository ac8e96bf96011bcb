"""The pickle pre-scan: the compiled walk (picklescan.c) must give the exact walk's answer (the
specification, scan.scan_exact) on every input, and both read opcodes through opcodes.tokens.

A disagreement is a hole: what the exact scan refuses (crafted memo indices, lengths, object
floods, deep nests, hash floods) is what keeps them away from the C unpickler.
"""

from __future__ import annotations

import pickle
import pickletools
import random
import struct
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelscope_tui.errors import UnsafePickleError
from modelscope_tui.readers.pickle import opcodes as O
from modelscope_tui.readers.pickle import scan as S
from modelscope_tui.readers.pickle import unpickler as U
from modelscope_tui.readers.ziparchive import ZipArchive

sys.path.insert(0, str(Path(__file__).resolve().parent / "hostile"))
from grammar import random_pickle  # noqa: E402

MEMO_STEP = 1 << 16  # LONG_BINPUT indices past two bytes


def exact(data: bytes, start: int = 0) -> int | None:
    try:
        return S.scan_exact(data, start, "t")
    except UnsafePickleError:
        return None


def native(data: bytes, start: int = 0) -> int | None:
    """picklescan.c's walk (scan_pickle's first choice for bytes)."""
    scan = S.native_scan()
    assert scan is not None, "_native.so is not built: run pip install -e ."
    end = scan(data, start)
    return None if end < 0 else end


def agrees(data: bytes, start: int = 0) -> None:
    """The C walk must give the exact answer: the same end, or a refusal."""
    want = exact(data, start)
    assert native(data, start) == want, (native(data, start), want)


def torch_pickle(tmp_path, obj) -> bytes:
    path = tmp_path / "x.pt"
    torch.save(obj, path)
    with ZipArchive(path) as archive:
        name = next(n for n in archive.entries if n.endswith("/data.pkl"))
        return archive.read(name, 1 << 30)


@pytest.fixture(scope="module")
def big_state_dict_pickle(tmp_path_factory) -> bytes:
    """Over 65,536 memo entries (LONG_BINPUT past two bytes), and over MAX_NESTING nesting opcodes."""
    sd = OrderedDict((f"layers.{i}.block.weight", torch.zeros(2)) for i in range(12_000))
    sd["meta"] = {"note": "x" * 300, "lr": 1e-3, "big": 1 << 70, "flags": [True, None]}
    return torch_pickle(tmp_path_factory.mktemp("big"), sd)


def test_large_pickles_scan_the_same_in_c_and_python(big_state_dict_pickle):
    data = big_state_dict_pickle
    assert len(data) > MEMO_STEP
    assert S.scan_pickle(data, 0, "t") == len(data) == S.scan_exact(data, 0, "t") == native(data)


def test_pickles_are_scanned_in_c(big_state_dict_pickle, monkeypatch):
    data = big_state_dict_pickle + b"\x00" * (1 << 20)  # trailing bytes, as in legacy files
    monkeypatch.setattr(S, "scan_exact", lambda *a: pytest.fail("the Python walk ran"))
    assert S.scan_pickle(data, 0, "t") == len(big_state_dict_pickle)
    small = pickle.dumps({"a": [1, 2]}, protocol=2)  # small ones too: no size threshold
    assert S.scan_pickle(small, 0, "t") == len(small)
    # an mmap (or any buffer but bytes) cannot go to C without a copy: those take the exact walk
    monkeypatch.undo()
    assert S.scan_pickle(bytearray(data), 0, "t") == len(big_state_dict_pickle)
    # without the compiled library (no compiler at install) the exact walk answers the same
    monkeypatch.setattr(S, "native_scan", lambda: None)
    assert S.scan_pickle(data, 0, "t") == len(big_state_dict_pickle)


def test_trailing_bytes_do_not_widen_the_memo_bound(big_state_dict_pickle):
    # A legacy file: storages follow the pickle, so the buffer is far longer than the pickle.
    data = b"junk" + big_state_dict_pickle + bytes(5 * MEMO_STEP)
    assert exact(data, 4) == 4 + len(big_state_dict_pickle) == native(data, 4)


def test_memo_index_just_past_the_pickle_is_refused(big_state_dict_pickle):
    data = big_state_dict_pickle
    # LONG_BINPUT whose index exceeds the pickle's own length, hidden before STOP.
    crafted = data[:-1] + b"N" + b"r" + struct.pack("<I", len(data) + 100) + b"0."
    assert exact(crafted) is None
    assert native(crafted) is None
    with pytest.raises(UnsafePickleError, match="memo index"):
        S.scan_pickle(crafted, 0, "t")
    # ...even when the buffer runs on long enough to make that index look plausible.
    padded = crafted + bytes(4 * MEMO_STEP)
    assert exact(padded) is None
    assert native(padded) is None
    with pytest.raises(UnsafePickleError, match="memo index"):
        S.scan_pickle(padded, 0, "t")


def test_binput_past_a_tiny_pickle_is_accepted_by_both():
    """BINPUT's one-byte index cannot size the memo past 256 entries, so the spec does not bound
    it; the C walk refused it in a pickle shorter than the index (found moving to one tokenizer)."""
    for data in (b"Nq\xff.", b"\x80\x02Nq\xff.", b"Nq\x05h\x05."):
        assert exact(data) == len(data) == native(data)
    for data in (b"Nr\xff\x00\x00\x00.", b"Np255\n."):  # LONG_BINPUT and PUT are bounded
        assert exact(data) is None is native(data)


def test_object_flood_is_refused_by_both_scans():
    flood = b"\x80\x02" + b"}" * 1_200_000 + b"."  # EMPTY_DICT: 64 bytes of objects per byte
    assert exact(flood) is None
    assert native(flood) is None
    with pytest.raises(UnsafePickleError, match="MiB of objects"):
        S.scan_pickle(flood, 0, "t")


def test_truncated_string_is_refused():
    data = pickle.dumps(["a" * 1000, "b" * 20], protocol=2)
    for cut in (len(data) - 1, len(data) - 30, len(data) // 2):
        assert exact(data[:cut]) is None
        assert native(data[:cut]) is None


@settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_c_scan_never_disagrees_with_exact(big_state_dict_pickle, data):
    base = data.draw(
        st.sampled_from(
            [
                big_state_dict_pickle,
                pickle.dumps({"a": [1, 2.5, "x" * 300, b"y" * 70_000, (None, True)]}, protocol=2),
                pickle.dumps([{"k": i} for i in range(3000)], protocol=4),
                pickle.dumps({"t": "z" * 10}, protocol=0),
                pickle.dumps([[i, f"s{i}"] for i in range(400)], protocol=0),  # PUT / GET text memo
                pickle.dumps({"b": bytearray(300), "n": 1 << 100, "f": 0.5}, protocol=5),  # 8-byte lengths
            ]
        )
    )
    buf = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(buf) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert", "memo"]))
        if action == "flip":
            buf[at] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del buf[at:]
            if not buf:
                buf = bytearray(b".")
        elif action == "insert":
            buf[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            index = data.draw(st.sampled_from([len(buf), len(buf) + 1, 1 << 20, 1 << 31, MEMO_STEP * 3]))
            op = data.draw(st.sampled_from([b"r", b"q", b"j", b"h"]))  # LONG_BINPUT, BINPUT, their GETs
            buf[at:at] = op + (struct.pack("<I", index & 0xFFFFFFFF) if op in b"rj" else bytes([index & 0xFF]))
    agrees(bytes(buf))
    agrees(bytes(buf), data.draw(st.integers(0, 3)))  # start inside the data too


@settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=64), st.integers(0, 4))
def test_c_scan_agrees_with_exact_on_random_bytes(blob, start):
    agrees(blob + b".", min(start, len(blob)))
    agrees(b"\x80\x02" + blob, min(start, len(blob)))


def test_c_scan_agrees_with_exact_on_grammar_pickles():
    """The grammar fuzzer's shapes (deep nests, memo tricks, BUILD, cut endings: tests/hostile/
    grammar.py), 600 of them: cheap, and they reach corners mutation rarely does."""
    refused = 0
    for seed in range(600):
        data = random_pickle(random.Random(seed))
        agrees(data)
        refused += exact(data) is None
    assert 0 < refused < 600  # both outcomes were exercised


@pytest.mark.parametrize("protocol", range(6))
def test_tokens_read_what_pickletools_reads(protocol):
    """opcodes.tokens against the standard library's own decoder, on every protocol."""
    value = {
        "s": "x" * 300, "b": b"y" * 70, "ba": bytearray(3), "i": [0, 255, 65535, -1, 1 << 40, 1 << 70, -(1 << 90)],
        "f": 0.5, "t": (None, True, False), "n": OrderedDict(a=1), "set": {1, 2}, "fs": frozenset({3}),
    }  # fmt: skip
    data = pickle.dumps(value, protocol=protocol)
    ours = list(O.tokens(data))
    theirs = list(pickletools.genops(data))
    assert [(code, at) for code, at, _, _ in ours] == [(op.code.encode("latin-1")[0], pos) for op, _, pos in theirs]
    assert ours[-1][3] == len(data)
    for (code, at, arg, nxt), (op, value_, _) in zip(ours, theirs):
        kind = O.ARG[code]
        if kind == O.ARG_FIXED:
            assert arg == value_, op.name
        elif kind in (O.ARG_COUNT, O.ARG_COUNT_SIGNED) and op.name not in ("LONG1", "LONG4"):
            raw = data[arg:nxt]
            assert raw == (value_.encode("utf-8", "surrogatepass") if isinstance(value_, str) else value_), op.name
        elif kind == O.ARG_TWO_LINES:
            assert f"{data[at + 1 : arg].decode()} {data[arg + 1 : nxt - 1].decode()}" == value_


def test_tokens_stop_at_a_malformed_argument():
    cases = {
        b"X\x05\x00\x00\x00abc": O.TRUNCATED,  # BINUNICODE past the end
        b"J\x01\x02": O.TRUNCATED,  # BININT past the end
        b"T\xff\xff\xff\xffab": O.NEGATIVE,  # BINSTRING with a negative length
        b"I" + b"1" * 5000 + b"\n.": O.UNTERMINATED,  # no newline within MAX_LINE
        b"cos\nsystem": O.MALFORMED_GLOBAL,
        b"\xff": O.UNKNOWN,
    }
    for data, reason in cases.items():
        *_, last = O.tokens(data)
        assert last[2:] == (reason, -1), data[:20]


def test_unpickler_reads_the_pickle_as_one_buffer(tmp_path, monkeypatch):
    """Given a file without peek(), the C unpickler calls read() once per opcode and argument;
    _WholeInput.peek hands it the whole pickle, so a 2,000-tensor state_dict takes a few reads."""
    sd = OrderedDict((f"layers.{i}.weight", torch.zeros(2, 3)) for i in range(2000))
    data = torch_pickle(tmp_path, sd)
    calls = []

    class CountingInput(U._WholeInput):
        def read(self, *args):
            calls.append(args)
            return super().read(*args)

    monkeypatch.setattr(U, "_WholeInput", CountingInput)
    root, _, end = U.safe_load(data, source="t", persistent_load=lambda pid: None)
    assert end == len(data)
    assert list(root) == list(sd)
    assert all(ref.shape == (2, 3) and ref.stride == (3, 1) for ref in root.values())
    assert 1 <= len(calls) <= 2, len(calls)  # at least the skip past what was consumed
