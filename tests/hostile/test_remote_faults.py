"""A server that misbehaves, and indexes that point elsewhere: one line each, exit 2, no
traceback, no hang (MSCOPE_TIMEOUT bounds every request), against a real server (tests/rangeserver)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from rangeserver import RangeServer  # noqa: E402
from remotehelp import run_main, same_json  # noqa: E402

SAMPLES = TESTS.parent / "sample_models"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("MSCOPE_TIMEOUT", "2")


@pytest.fixture
def server():
    srv = RangeServer(SAMPLES)
    yield srv
    srv.close()


def one_line(code: int, out: str, err: str) -> str:
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mscope: error: "), err
    assert "Traceback" not in err
    return lines[0]


# transformer_tied.pt is 97 KB: the first 64 KiB range succeeds, the tail range meets the fault
@pytest.mark.parametrize(
    "fault, says",
    [
        ("no-range", "does not support range requests"),
        ("truncate", "cut short"),
        ("wrong-range", "wrong Content-Range"),
        ("long-length", "no answer within"),
        ("etag-change", "changed while being read"),
        ("redirect-away", "redirects to another host"),
    ],
)
def test_fault_is_one_line(server, fault, says):
    server.fault = fault
    line = one_line(*run_main("summary", f"{server.url}/transformer_tied.pt"))
    assert says in line
    assert f"{server.url}/transformer_tied.pt" in line


def test_values_fault_is_one_line(tmp_path):
    """The metadata reads fine; the server starts cutting bodies short while values are read."""
    torch.save({"w": torch.arange(1 << 18, dtype=torch.float32)}, tmp_path / "m.pt")
    srv = RangeServer(tmp_path)
    try:
        code, out, err = run_main("summary", "--no-cache", f"{srv.url}/m.pt")
        assert code == 0, err
        srv.fault, srv.fault_after = "truncate", srv.requests  # metadata again, then values fail
        srv.reset()
        code, out, err = run_main("audit", "--stats", "--no-cache", f"{srv.url}/m.pt")
    finally:
        srv.close()
    assert code != 0 and "cut short" in out + err and "Traceback" not in out + err
    assert srv.requests > srv.fault_after  # the metadata was read; a value range failed


def test_unreachable_host_is_one_line():
    line = one_line(*run_main("summary", "http://127.0.0.1:9/model.safetensors"))
    assert "refused" in line or "no answer" in line


def test_unknown_scheme_is_not_a_local_path():
    line = one_line(*run_main("summary", "ftp://host/x.pt"))
    assert "ftp://host/x.pt" in line


@pytest.mark.parametrize(
    "shard",
    ["../../etc/passwd", "/etc/passwd", "http://127.0.0.2:9/evil.safetensors", "s3://other-bucket/x.safetensors",
     "sub/../../x.safetensors", "C:\\x.safetensors", "x.safetensors?redirect=http://evil"],
)
def test_index_cannot_point_outside_its_folder(tmp_path, shard):
    save_file({"w": torch.ones(2)}, str(tmp_path / "ok.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    srv = RangeServer(tmp_path)
    try:
        line = one_line(*run_main("summary", f"{srv.url}/model.safetensors.index.json"))
        # nothing but the index and its config.json (read beside it for quantization_config)
        assert srv.log and all(path in ("model.safetensors.index.json", "config.json") for path, _ in srv.log)
    finally:
        srv.close()
    assert "shard" in line and "not allowed" in line or "characters" in line


def test_pickle_too_large_to_fetch_whole(tmp_path, monkeypatch):
    import modelscope_tui.readers.remote as remote

    monkeypatch.setattr(remote, "MAX_REMOTE_PICKLE", 1024)
    srv = RangeServer(SAMPLES)
    try:
        line = one_line(*run_main("summary", f"{srv.url}/legacy_cnn.pt"))
    finally:
        srv.close()
    assert "must be read whole" in line and "download it" in line


def test_missing_shard_is_one_line(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "one.safetensors"))
    index = {"weight_map": {"a": "one.safetensors", "b": "two.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    srv = RangeServer(tmp_path)
    try:
        line = one_line(*run_main("summary", f"{srv.url}/model.safetensors.index.json"))
    finally:
        srv.close()
    assert "shard 'two.safetensors'" in line and "missing" in line


def test_download_opt_in_for_a_server_without_ranges(tmp_path, monkeypatch):
    """`--download`: the no-range server's whole file, fetched once into the cache folder, gives
    the local answers (values included); past MSCOPE_MAX_DOWNLOAD it is refused with one line and
    nothing is left in the folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    name = "transformer_tied.pt"
    srv = RangeServer(SAMPLES)
    srv.fault = "no-range"
    try:
        code, local, _ = run_main("audit", "--stats", "--json", SAMPLES / name)
        srv.reset()
        rcode, remote, err = run_main("audit", "--stats", "--json", "--download", f"{srv.url}/{name}")
        assert rcode == code, err
        same_json(local, remote)
        assert srv.requests == 1, srv.log  # one GET; every later range reads the copy
        downloads = tmp_path / "cache" / "mscope" / "downloads"
        copies = [p.read_bytes() for p in downloads.iterdir()]
        assert copies == [(SAMPLES / name).read_bytes()]

        code, _, err = run_main("summary", "--no-cache", f"{srv.url}/{name}")  # no flag: no download
        assert code == 2 and "--download" in err and len(err.strip().splitlines()) == 1

        monkeypatch.setenv("MSCOPE_MAX_DOWNLOAD", "64K")
        for p in downloads.iterdir():
            p.unlink()
        code, out, err = run_main("summary", "--no-cache", "--download", f"{srv.url}/{name}")
    finally:
        srv.close()
    assert (code, out) == (2, "")
    assert "more than the 65,536 bytes --download fetches" in err and len(err.strip().splitlines()) == 1
    assert list(downloads.iterdir()) == []
