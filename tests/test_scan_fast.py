"""The regex fast scan must agree with the exact opcode walk: same end offset, or defer (None).

It may never accept what the exact scan refuses, since that is what keeps crafted memo indices,
lengths and object floods away from the C unpickler.
"""

from __future__ import annotations

import pickle
import struct
from collections import OrderedDict

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelscope_tui.errors import UnsafePickleError
from modelscope_tui.readers.pickle import scan as S
from modelscope_tui.readers.pickle import unpickler as U
from modelscope_tui.readers.ziparchive import ZipArchive


def exact(data: bytes, start: int = 0) -> int | None:
    try:
        return S.scan_exact(data, start, "t")
    except UnsafePickleError:
        return None


def native(data: bytes, start: int = 0) -> int | None:
    """picklescan.c's walk, whatever the size (scan_pickle only uses it on large pickles)."""
    scan = S.native_scan()
    assert scan is not None, "_native.so is not built: run pip install -e ."
    end = scan(data, start)
    return None if end < 0 else end


def agrees(data: bytes, start: int = 0) -> None:
    """The regex may defer (None) but never differ; the C walk must give the exact answer."""
    fast = S._scan_fast(data, start)
    want = exact(data, start)
    assert fast is None or fast == want, (fast, want)
    assert native(data, start) == want, (native(data, start), want)


def torch_pickle(tmp_path, obj) -> bytes:
    path = tmp_path / "x.pt"
    torch.save(obj, path)
    with ZipArchive(path) as archive:
        name = next(n for n in archive.entries if n.endswith("/data.pkl"))
        return archive.read(name, 1 << 30)


@pytest.fixture(scope="module")
def big_state_dict_pickle(tmp_path_factory) -> bytes:
    """Over 65,536 memo entries, so LONG_BINPUT is checked by the regex bound."""
    sd = OrderedDict((f"layers.{i}.block.weight", torch.zeros(2)) for i in range(12_000))
    sd["meta"] = {"note": "x" * 300, "lr": 1e-3, "big": 1 << 70, "flags": [True, None]}
    return torch_pickle(tmp_path_factory.mktemp("big"), sd)


def test_fast_scan_takes_ordinary_large_pickles(big_state_dict_pickle, monkeypatch):
    data = big_state_dict_pickle
    assert len(data) > S._MEMO_STEP
    # The regex cannot follow depths: past MAX_NESTING nesting opcodes it defers (to C or the
    # exact walk, which follow them); with the bound out of the way it takes the whole pickle.
    assert S._scan_fast(data, 0) is None
    assert S.scan_pickle(data, 0, "t") == len(data) == S.scan_exact(data, 0, "t") == native(data)
    monkeypatch.setattr(S, "MAX_NESTING", 1 << 40)
    monkeypatch.setattr(S, "MAX_HASHED_KEYS", 1 << 40)  # its other bound (MAX_HASHED_KEYS), likewise
    assert S._scan_fast(data, 0) == len(data) == S.scan_exact(data, 0, "t")


def test_large_pickles_are_scanned_in_c(big_state_dict_pickle, monkeypatch):
    data = big_state_dict_pickle + b"\x00" * S.NATIVE_SCAN_MIN_BYTES  # trailing bytes, as in legacy files
    monkeypatch.setattr(S, "_scan_fast", lambda *a: pytest.fail("the regex ran"))
    assert S.scan_pickle(data, 0, "t") == len(big_state_dict_pickle)
    # an mmap (or any buffer but bytes) cannot go to C without a copy: those take the regex
    monkeypatch.undo()
    assert S._scan_native(bytearray(data), 0) is None
    assert S.scan_pickle(bytearray(data), 0, "t") == len(big_state_dict_pickle)
    # without the compiled library (no compiler at install) the regex scan answers the same
    monkeypatch.setattr(S, "native_scan", lambda: None)
    assert S.scan_pickle(data, 0, "t") == len(big_state_dict_pickle)


def test_fast_scan_with_trailing_bytes_checks_memo_against_the_pickle(big_state_dict_pickle, monkeypatch):
    # A legacy file: storages follow the pickle, so the buffer is far longer than the pickle.
    monkeypatch.setattr(S, "MAX_NESTING", 1 << 40)  # the regex's memo rule, not its depth bound
    monkeypatch.setattr(S, "MAX_HASHED_KEYS", 1 << 40)  # nor its hashed-keys bound
    data = b"junk" + big_state_dict_pickle + bytes(5 * S._MEMO_STEP)
    assert S._scan_fast(data, 4) == 4 + len(big_state_dict_pickle) == native(data, 4)


def test_memo_index_just_past_the_pickle_is_refused(big_state_dict_pickle):
    data = big_state_dict_pickle
    # LONG_BINPUT whose index exceeds the pickle's own length, hidden before STOP.
    crafted = data[:-1] + b"N" + b"r" + struct.pack("<I", len(data) + 100) + b"0."
    assert S._scan_fast(crafted, 0) is None
    assert native(crafted) is None
    with pytest.raises(UnsafePickleError, match="memo index"):
        S.scan_pickle(crafted, 0, "t")
    # ...even when the buffer runs on long enough to make that index look plausible.
    padded = crafted + bytes(4 * S._MEMO_STEP)
    assert S._scan_fast(padded, 0) is None
    assert native(padded) is None
    with pytest.raises(UnsafePickleError, match="memo index"):
        S.scan_pickle(padded, 0, "t")


def test_object_flood_goes_to_the_exact_scan():
    flood = b"\x80\x02" + b"}" * 1_200_000 + b"."  # EMPTY_DICT: 64 bytes of objects per byte
    assert S._scan_fast(flood, 0) is None
    assert native(flood) is None
    with pytest.raises(UnsafePickleError, match="MiB of objects"):
        S.scan_pickle(flood, 0, "t")


def test_truncated_string_defers():
    data = pickle.dumps(["a" * 1000, "b" * 20], protocol=2)
    for cut in (len(data) - 1, len(data) - 30, len(data) // 2):
        assert S._scan_fast(data[:cut], 0) is None
        assert native(data[:cut]) is None


@settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_fast_and_c_scans_never_disagree_with_exact(big_state_dict_pickle, data):
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
            index = data.draw(st.sampled_from([len(buf), len(buf) + 1, 1 << 20, 1 << 31, S._MEMO_STEP * 3]))
            buf[at:at] = b"r" + struct.pack("<I", index & 0xFFFFFFFF)
    agrees(bytes(buf))
    agrees(bytes(buf), data.draw(st.integers(0, 3)))  # start inside the data too


@settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=64), st.integers(0, 4))
def test_c_scan_agrees_with_exact_on_random_bytes(blob, start):
    agrees(blob + b".", min(start, len(blob)))
    agrees(b"\x80\x02" + blob, min(start, len(blob)))


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
