"""hf:// through huggingface_hub's own HfFileSystem, pointed at a local server that answers the
few Hub routes it calls (tests/hubserver: repo info, tree, paths-info, resolve with Range): a
repo root works like a local directory, a file and an @revision like the local files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

hf_constants = pytest.importorskip("huggingface_hub.constants")
fsspec = pytest.importorskip("fsspec")

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from hubserver import HubServer  # noqa: E402
from remotehelp import run_main, same_json  # noqa: E402

SAMPLES = TESTS.parent / "sample_models"


@pytest.fixture(scope="module")
def hub():
    srv = HubServer({"org/sharded": SAMPLES / "sharded_hf", "org/samples": SAMPLES, "org/bins": SAMPLES / "sharded_bin", "org/dcp": SAMPLES / "dcp_checkpoint"})
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_ENDPOINT", srv.url)
    # read at import (the session may have imported huggingface_hub before): set them too
    mp.setattr(hf_constants, "ENDPOINT", srv.url)
    mp.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", srv.url + "/{repo_id}/resolve/{revision}/{filename}")
    mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    mp.delenv("HF_TOKEN", raising=False)
    fsspec.filesystem("hf").clear_instance_cache()
    yield srv
    fsspec.filesystem("hf").clear_instance_cache()
    mp.undo()
    srv.close()


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


@pytest.mark.parametrize(
    "local, url",
    [
        ("sharded_hf", "hf://org/sharded"),
        ("sharded_bin", "hf://org/bins"),
        ("sharded_hf/model.safetensors.index.json", "hf://org/sharded@main/model.safetensors.index.json"),
        ("llama_tiny.safetensors", "hf://org/samples/llama_tiny.safetensors"),
        ("transformer_tied.pt", "hf://org/samples/transformer_tied.pt"),
    ],
)
def test_hf_equals_local(hub, local, url):
    code, expected, _ = run_main("summary", "--json", SAMPLES / local)
    rcode, got, err = run_main("summary", "--json", url)
    assert (rcode, err) == (code, "")
    same_json(expected, got)
    resolves = [line for line in hub.log if "/resolve/" in line]
    assert resolves  # bytes came through the Hub's resolve route


def test_hf_audit_stats_equals_local(hub):
    code, expected, _ = run_main("audit", "--stats", "--json", SAMPLES / "sharded_hf")
    rcode, got, err = run_main("audit", "--stats", "--json", "hf://org/sharded")
    assert (rcode, err) == (code, "")
    same_json(expected, got)


@pytest.mark.parametrize("command", [["summary", "--json"], ["audit", "--stats", "--json"]])
def test_hf_dcp_repo_equals_local(hub, command):
    """A repo whose root holds `.metadata` and `*.distcp` is a DCP folder, as on disk; the audit
    also re-checks the Hub's file identity before and after reading values."""
    code, expected, _ = run_main(*command, SAMPLES / "dcp_checkpoint")
    rcode, got, err = run_main(*command, "hf://org/dcp")
    assert (rcode, err) == (code, "")
    same_json(expected, got)


def test_hf_missing_repo_is_one_line(hub):
    code, out, err = run_main("summary", "hf://org/nothing-here/model.safetensors")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "hf://org/nothing-here/model.safetensors" in lines[0]
