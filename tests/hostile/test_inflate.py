"""Deflated members (issue #12, section 2): what a file's members inflate to is capped, against
what the stream produces, not what the directory (or a zip64 field) declares; `--crc` streams.

torch.save stores every member; each file here is built by struct (craft.zip_lying), so the
directory can lie about sizes. No timed asserts: tracemalloc peaks and bytes inflated.
"""

from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from craft import (  # noqa: E402
    EMPTY_DICT,
    EMPTY_TUPLE,
    PROTO2,
    REDUCE,
    STOP,
    big_pickle,
    glob,
    state_pickle,
    storage,
    tensor,
    zip_lying,
)  # fmt: skip

from modelscope_tui.audit.integrity import check_crc  # noqa: E402
from modelscope_tui.errors import CorruptCheckpointError, MscopeError  # noqa: E402
from modelscope_tui.readers import open_checkpoint  # noqa: E402
from modelscope_tui.readers.ziparchive import (  # noqa: E402
    INFLATE_CHUNK,
    MIN_INFLATE_BUDGET,
    InflateBudgetError,
    ZipArchive,
)

D8 = {"method": 8}
DATA = bytes(16)
GOOD_PKL = state_pickle({"w": tensor(storage("0", 4), 0, (4,), (1,))})
BUILD = b"b"


def _torch(path: Path, pkl: bytes, opts: dict, extra: list | None = None) -> Path:
    members = [("archive/data.pkl", pkl, opts), ("archive/version", b"3\n", {}), ("archive/data/0", DATA, {})]
    path.write_bytes(zip_lying(members + (extra or [])))
    return path


def _peak(fn):
    tracemalloc.start()
    try:
        try:
            fn()
        except MscopeError as exc:
            result = exc
        else:
            result = None
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


BIG = 4 * MIN_INFLATE_BUDGET  # 32 MiB of pickle, deflated to ~32 KB
# Each spelling of a deflated data.pkl that would inflate past the file's budget.
OVER_BUDGET = {
    "honest size": (big_pickle(BIG), D8),
    "zip64 honest size": (big_pickle(BIG), {**D8, "zip64": True}),
    # the directory claims 1 KB (under the budget): the stream must stop at 1 KB
    "declares 1 KB": (big_pickle(BIG), {**D8, "declared": 1024}),
    "zip64 declares 1 KB": (big_pickle(BIG), {**D8, "zip64": True, "declared": 1024}),
    # the directory claims 2**40 (zip64): refused before anything is inflated
    "zip64 declares 1 TB": (big_pickle(BIG), {**D8, "zip64": True, "declared": 1 << 40}),
    # just under the budget by its header, far over it by its stream
    "declares budget - 1": (big_pickle(BIG), {**D8, "declared": MIN_INFLATE_BUDGET - 1}),
}


@pytest.mark.parametrize("name", OVER_BUDGET)
def test_deflated_pickle_past_the_budget_is_one_clear_error(tmp_path, name):
    pkl, opts = OVER_BUDGET[name]
    path = _torch(tmp_path / "d.pt", pkl, opts)
    assert path.stat().st_size < 1 << 20
    error, peak = _peak(lambda: open_checkpoint(path))
    assert isinstance(error, CorruptCheckpointError), error
    assert "data.pkl" in error.message
    assert any(word in error.message for word in ("inflate", "declared", "more than"))
    # never more than the declared size (or the budget) plus one chunk of output in memory, and
    # the payload search of a file we refuse: the first MAX_INFLATED_BYTES of each member, once
    # as read and once as the prefix run through the unpickler (readers/payloads.py)
    from modelscope_tui.readers.payloads import MAX_INFLATED_BYTES

    reader = min(opts.get("declared", BIG), MIN_INFLATE_BUDGET) + 3 * INFLATE_CHUNK
    assert peak < reader + 2 * MAX_INFLATED_BYTES


def test_stream_is_cut_at_the_declared_size(tmp_path):
    """Inflated bytes are counted as the stream produces them: a lying header costs one chunk."""
    path = tmp_path / "z.zip"
    path.write_bytes(zip_lying([("m", bytes(BIG), {**D8, "declared": 4096})]))
    with ZipArchive(path) as archive:
        with pytest.raises(CorruptCheckpointError, match="declared"):
            archive.read("m", 1 << 30)
        assert archive.inflated <= 4096 + INFLATE_CHUNK


def test_budget_is_shared_by_all_reads_of_one_file(tmp_path):
    """Three members each under the budget: together they are not."""
    part = MIN_INFLATE_BUDGET // 2 + 1
    path = tmp_path / "z.zip"
    path.write_bytes(zip_lying([(f"m{i}", bytes(part), D8) for i in range(3)]))
    with ZipArchive(path) as archive:
        archive.read("m0", 1 << 30)
        with pytest.raises(InflateBudgetError, match="inflate to"):
            archive.read("m1", 1 << 30)
        assert archive.inflated <= archive.inflate_budget


def test_small_deflated_pickle_is_read_and_reported(tmp_path):
    path = _torch(tmp_path / "ok.pt", GOOD_PKL, D8)
    ckpt = open_checkpoint(path)
    assert [t.name for t in ckpt.tensors] == ["w"]
    assert ckpt.metadata["inflated_members"] == {"names": ["archive/data.pkl"], "bytes": len(GOOD_PKL)}


def _torchscript(path: Path, code: list[tuple[str, bytes, dict]]) -> Path:
    module = PROTO2 + glob("__torch__", "M") + EMPTY_TUPLE + REDUCE + EMPTY_DICT + BUILD + STOP
    members = [
        ("m/data.pkl", module, {}),
        ("m/constants.pkl", PROTO2 + EMPTY_TUPLE + STOP, {}),
        ("m/version", b"3\n", {}),
        *code,
    ]
    path.write_bytes(zip_lying(members))
    return path


@pytest.mark.parametrize("spelling", ["honest", "lying", "zip64"])
def test_torchscript_code_members_share_the_budget(tmp_path, spelling):
    """60 deflated code/*.py of 6 MB each (half a GB, 36 s before): a few are read, the rest
    are named as skipped, and the file still opens."""
    opts = {"honest": D8, "lying": {**D8, "declared": 4096}, "zip64": {**D8, "zip64": True}}[spelling]
    source = b"class M(Module):\n  __parameters__ = []\n" + b"#" * (6 << 20)
    code = [(f"m/code/__torch__/f{i}.py", source, opts) for i in range(60)]
    path = _torchscript(tmp_path / "ts.pt", code)
    assert path.stat().st_size < 2 << 20
    result = {}

    def run():
        result["ckpt"] = open_checkpoint(path, strict=False)

    error, peak = _peak(run)
    if spelling == "lying":  # a member whose stream outruns its header is corrupt
        assert error is not None and "declared" in error.message
    else:
        assert error is None
        ckpt = result["ckpt"]
        assert any("code file(s) not read" in w for w in ckpt.warnings)
    assert peak < MIN_INFLATE_BUDGET + 4 * INFLATE_CHUNK + (8 << 20)


# -- audit --crc ----------------------------------------------------------------------------
def test_crc_streams_a_large_deflated_member(tmp_path):
    """64 MiB of zeros, deflated: checked in bounded memory, right and wrong CRC alike."""
    data = bytes(64 << 20)
    path = tmp_path / "z.zip"
    path.write_bytes(zip_lying([("good", data, D8), ("bad", data, {**D8, "crc": 1234})]))
    with ZipArchive(path) as archive:
        tracemalloc.start()
        try:
            assert archive.check_crc("good") is True
            assert archive.check_crc("bad") is False
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 4 * INFLATE_CHUNK


@pytest.mark.parametrize(
    "opts",
    [{**D8, "declared": 1024}, {**D8, "zip64": True, "declared": 1024}, {**D8, "declared": (64 << 20) + 1}],
    ids=["short", "zip64-short", "long"],
)
def test_crc_of_a_lying_member_is_a_finding(tmp_path, opts):
    path = _torch(tmp_path / "lie.pt", GOOD_PKL, {}, [("archive/extra.bin", bytes(64 << 20), opts)])
    ckpt = open_checkpoint(path, strict=False)
    tracemalloc.start()
    try:
        found, info = check_crc(ckpt)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [f.code for f in found] == ["crc-mismatch"]
    assert "extra.bin" in found[0].message
    assert info["crc_members"] == 4
    assert peak < 4 * INFLATE_CHUNK


def test_crc_inflates_no_more_than_its_budget(tmp_path, monkeypatch):
    """What --crc inflates per file is bounded too; members past it are named, not checked."""
    import modelscope_tui.audit.integrity as integrity

    monkeypatch.setattr(integrity, "CRC_INFLATE_BUDGET", 3 << 20)
    monkeypatch.setattr(integrity, "CRC_INFLATE_RATIO", 1)
    members = [(f"archive/x{i}", bytes(2 << 20), D8) for i in range(4)]
    path = _torch(tmp_path / "many.pt", GOOD_PKL, {}, members)
    found, info = check_crc(open_checkpoint(path, strict=False))
    skipped = [f for f in found if "not CRC-checked" in f.message]
    assert len(skipped) == 3 and not [f for f in found if f.code == "crc-mismatch"]
    assert info["crc_checked"] == 4  # three stored members and one deflated
