"""Resource limits, measured: instant refusals, bounded memory, capped reads; and payload reports.

Opening never allocates in proportion to a number read from the file before checking it against
the file; pickles are parsed with limits on depth, memo size, distinct globals and the memory their
objects would take; every member read and every inflation is capped.
"""

from __future__ import annotations

import json
import posix
import struct
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import pytest
from test_bad_input import GB, FakeStorage, FakeTensor, crafted_tensor_file, crafted_zip
from test_bad_input import torch_like_pickle as torch_pickle
from test_payloads import Reduce
from test_safetensors_sharded import f32, write_raw

from conftest import small_state_dict
from modelscope_tui.cli import main as cli_main
from modelscope_tui.errors import CorruptCheckpointError, MscopeError, UnsafePickleError
from modelscope_tui.readers import open_checkpoint
from modelscope_tui.readers.pickle.scan import PICKLE_MEMORY_RATIO
from modelscope_tui.readers.pickle.unpickler import render_call, safe_load
from modelscope_tui.readers.ziparchive import ZipArchive


def refused_fast(
    path: Path, error=MscopeError, seconds: float = 1, peak: int | None = 16 << 20
) -> str:
    """Refused within `seconds`, allocating less than `peak` bytes on the way (tracemalloc slows
    pure-Python loops a lot: pass peak=None where the scan is long and allocation-free)."""
    if peak is not None:
        tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(error) as info:
            open_checkpoint(path)
        seen = tracemalloc.get_traced_memory()[1] if peak is not None else 0
    finally:
        if peak is not None:
            tracemalloc.stop()
    elapsed = time.monotonic() - start
    assert elapsed < seconds, f"took {elapsed:.2f} s"
    assert peak is None or seen < peak, f"allocated {seen:,} bytes"
    return str(info.value)


# ----------------------------------------------------------------------------------------------
# 100 GB declared in a file of about 1 KB: an error, instantly
# ----------------------------------------------------------------------------------------------
def test_100gb_storage_in_1kb_zip(tmp_path):
    path = crafted_tensor_file(tmp_path / "big.pt", shape=(25 * GB,), stride=(1,), numel=25 * GB)
    assert path.stat().st_size < 1024
    assert "107,374,182,400" in refused_fast(path, CorruptCheckpointError)


def test_100gb_broadcast_view_in_1kb_zip(tmp_path):
    """A stride-0 view stays inside its 24-byte storage, so bounds checks pass; its size does not."""
    path = crafted_tensor_file(tmp_path / "view.pt", shape=(25 * GB,), stride=(0,))
    assert path.stat().st_size < 1024
    assert "repeating the 24 bytes" in refused_fast(path, CorruptCheckpointError)


def test_small_broadcast_views_still_open(tmp_path):
    """torch.save keeps expanded views as they are: a modest one is a real checkpoint."""
    import torch

    path = tmp_path / "expanded.pt"
    torch.save({"bias": torch.ones(1).expand(4096)}, path)
    (record,) = open_checkpoint(path).tensors
    assert record.shape == (4096,) and record.stride == (0,)


def test_100gb_in_1kb_safetensors(tmp_path):
    path = write_raw(tmp_path / "big.safetensors", {"w": f32([25 * GB], 0, 100 * GB)}, bytes(64))
    assert path.stat().st_size < 1024
    refused_fast(path, CorruptCheckpointError)


def test_100gb_in_1kb_legacy(tmp_path):
    from test_bad_input import legacy_header

    obj = torch_pickle({"w": FakeTensor(FakeStorage("0", 25 * GB), 0, (25 * GB,), (1,))})
    keys = b"\x80\x02]q\x00X\x01\x00\x00\x000q\x01a."
    path = tmp_path / "legacy.pt"
    path.write_bytes(legacy_header() + obj + keys + struct.pack("<q", 25 * GB) + bytes(16))
    assert path.stat().st_size < 1024
    refused_fast(path, CorruptCheckpointError)


# ----------------------------------------------------------------------------------------------
# Pickles: depth, memo, globals, objects
# ----------------------------------------------------------------------------------------------
def test_memo_index_checked_against_the_pickle(tmp_path):
    path = crafted_zip(tmp_path / "memo.pt", b"\x80\x02]r\xff\xff\xff\x7f.")
    assert "memo index" in refused_fast(path, UnsafePickleError)


def test_object_flood_refused_before_building(tmp_path):
    """2 MB of EMPTY_DICT would build 128 MB of dicts (8 MB of them: 2.7 GB, 46 s)."""
    path = crafted_zip(tmp_path / "flood.pt", b"\x80\x02(" + b"}" * (2 << 20) + b"l.")
    assert "MiB of objects" in refused_fast(path, UnsafePickleError, seconds=3, peak=None)


@pytest.mark.parametrize("op", [b"]", b"\x8f", b"}N"], ids=["lists", "sets", "dict-none"])
def test_other_floods(tmp_path, op):
    """Floods of containers cost far more memory per byte than any real checkpoint (~12x)."""
    path = tmp_path / "flood.pkl"
    path.write_bytes(b"\x80\x04(" + op * (1 << 20) + b"l.")
    assert "MiB of objects" in refused_fast(path, UnsafePickleError, seconds=3, peak=None)


def test_real_state_dicts_are_far_below_the_object_budget():
    """A 20,000-tensor state_dict pickle (what torch.save writes) passes with room to spare."""
    state = {
        f"layers.{i}.weight": FakeTensor(FakeStorage(str(i), 6), 0, (2, 3), (3, 1))
        for i in range(20_000)
    }
    data = torch_pickle(state)
    loaded, _, _ = safe_load(data, source="big", persistent_load=lambda pid: None)
    assert len(loaded) == 20_000
    # and the budget is what admits it: a third of the ratio would refuse it
    from modelscope_tui.readers.pickle import scan

    saved = scan.PICKLE_MEMORY_RATIO, scan.MIN_PICKLE_MEMORY
    try:
        scan.PICKLE_MEMORY_RATIO, scan.MIN_PICKLE_MEMORY = PICKLE_MEMORY_RATIO // 4, 0
        with pytest.raises(UnsafePickleError):
            safe_load(data, source="big", persistent_load=lambda pid: None)
    finally:
        scan.PICKLE_MEMORY_RATIO, scan.MIN_PICKLE_MEMORY = saved


def test_deep_nesting_never_recurses_out(tmp_path):
    path = tmp_path / "deep.pkl"
    path.write_bytes(b"\x80\x02" + b"]" * 200_000 + b"a" * 199_999 + b".")
    start = time.monotonic()
    try:
        open_checkpoint(path)
    except MscopeError as exc:
        assert "\n" not in str(exc)
    assert time.monotonic() - start < 5


# ----------------------------------------------------------------------------------------------
# Reads and inflation are capped
# ----------------------------------------------------------------------------------------------
def test_member_read_capped_by_declared_size(tmp_path):
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big", bytes(1 << 20))
    with ZipArchive(path) as archive, pytest.raises(CorruptCheckpointError, match="more than"):
        archive.read("big", limit=1 << 16)


def test_inflation_stops_at_the_declared_size(tmp_path):
    """A member that declares 1 KB and inflates to 64 MB: at most 1 KB + 1 byte is inflated."""
    raw = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = raw.compress(bytes(64 << 20)) + raw.flush()
    name = b"bomb"
    local = struct.pack(
        "<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0, 0, len(body), 1024, len(name), 0
    )
    central = struct.pack(
        "<4s6H3L5H2L",
        b"PK\x01\x02",
        20,
        20,
        0,
        8,
        0,
        0,
        0,
        len(body),
        1024,
        len(name),
        0,
        0,
        0,
        0,
        0,
        0,
    )
    cd_offset = len(local) + len(name) + len(body)
    eocd = struct.pack(
        "<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central) + len(name), cd_offset, 0
    )
    path = tmp_path / "bomb.zip"
    path.write_bytes(local + name + body + central + name + eocd)
    tracemalloc.start()
    try:
        with ZipArchive(path) as archive, pytest.raises(CorruptCheckpointError, match="declared"):
            archive.read("bomb", limit=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20  # the compressed 64 KB, not the 64 MB


@pytest.mark.parametrize(
    ("name", "size"),
    [("model.safetensors.index.json", 65 << 20), (".metadata", (2 << 30) + 1)],
    ids=["shard-index", "dcp-metadata"],
)
def test_side_files_capped_before_reading(tmp_path, name, size):
    """Sparse files far over the caps are refused without reading them."""
    directory = tmp_path / "ckpt"
    directory.mkdir()
    path = directory / name
    with open(path, "wb") as fh:
        fh.write(b"{" if name.endswith(".json") else b"\x80\x04")
        fh.truncate(size)
    refused_fast(path if name.endswith(".json") else directory, CorruptCheckpointError)


def test_safetensors_header_capped(tmp_path):
    path = write_raw(tmp_path / "h.safetensors", b'{"a": 1}', length=(100 << 20) + 1)
    assert "impossible" in refused_fast(path, CorruptCheckpointError)


# ----------------------------------------------------------------------------------------------
# Reporting: what the payload would have done, argument shown, truncated to one line
# ----------------------------------------------------------------------------------------------
def test_render_call_truncates_long_arguments():
    text = render_call("os.system", ("touch /tmp/" + "a" * 10_000,))
    assert text.startswith("os.system('touch /tmp/aaa") and text.endswith("...)")
    assert len(text) <= 160 and "\n" not in text


def test_reports_say_what_the_payload_would_do(tmp_path, capsys):
    import torch

    marker = tmp_path / ("MARKER-" + "x" * 200) / ("y" * 200)  # a long argument
    path = tmp_path / "evil.pt"
    torch.save(
        {"model": small_state_dict(), "hook": Reduce(posix.system, f"touch {marker}\nrm -rf ~")},
        path,
    )
    assert cli_main(["summary", str(path)]) == 0
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if "would call" in x]
    assert "would call posix.system('touch " in line and len(line) < 200
    assert cli_main(["summary", "--json", str(path)]) == 0
    (ref,) = [
        g for g in json.loads(capsys.readouterr().out)["globals"] if g["safety"] == "dangerous"
    ]
    (call,) = ref["calls"]
    assert call.startswith("posix.system('touch ") and call.endswith("...)") and len(call) <= 160
    assert "\n" not in call
    if cli_main(["audit", "--json", str(path)]) in (0, 1):
        doc = json.loads(capsys.readouterr().out)
        (finding,) = [f for f in doc["findings"] if f["code"] == "dangerous-global"]
        assert "would call posix.system('touch " in finding["message"]
    assert not marker.exists()


def test_payload_in_a_refused_file_is_still_described(tmp_path):
    """When the file cannot be opened because of the payload, the error line says the call."""
    import pickle

    magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
    payload = pickle.dumps(Reduce(posix.system, "touch /tmp/x"), protocol=2)
    sys_info = pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2)
    path = tmp_path / "legacy.pt"
    path.write_bytes(magic + payload + sys_info + torch_pickle({}) + b"\x80\x02].")
    line = refused_fast(path, CorruptCheckpointError)
    assert "would call posix.system('touch /tmp/x')" in line
