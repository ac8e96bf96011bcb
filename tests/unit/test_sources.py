"""Byte sources and locations without a network: URL parsing, the local source, the cache file."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelscope_tui.errors import CorruptCheckpointError
from modelscope_tui.readers.remote import shard_url
from modelscope_tui.readers.sources import RemotePath, as_location, open_source, redact
from modelscope_tui.readers.sources import cache as remote_cache

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"


@pytest.mark.parametrize(
    "text", ["s3://bucket/run/x.pt", "gs://b/x", "hf://org/repo@main/a.safetensors", "https://h/x?sig=1", "FTP://h/x"]
)
def test_urls_stay_urls(text):
    loc = as_location(text)
    assert isinstance(loc, RemotePath) and loc.url == text


def test_local_paths_stay_paths():
    assert as_location("model.pt") == Path("model.pt")
    assert as_location("dir/s3:/x") == Path("dir/s3:/x")  # no scheme://: a local name


def test_remote_path_parts():
    loc = RemotePath("hf://org/repo@v1/sub/model.safetensors")
    assert (loc.name, loc.suffix, loc.stem) == ("model.safetensors", ".safetensors", "model")
    assert loc.parent.url == "hf://org/repo@v1/sub/"
    assert (loc.parent / "b.json").url == "hf://org/repo@v1/sub/b.json"
    assert not hasattr(loc, "__fspath__")  # never opened as a local file


def test_redact_drops_credentials_and_query():
    assert redact("https://user:pw@host/a/b.pt?X-Amz-Signature=abc") == "https://host/a/b.pt?…"
    assert redact("s3://") == "s3://"
    assert "pw" not in str(RemotePath("https://user:pw@host/x.pt"))


@pytest.mark.parametrize("name", ["a.safetensors", "sub/a-00001.safetensors"])
def test_shard_names_beside_the_index(name):
    index = RemotePath("s3://b/run/model.safetensors.index.json")
    assert shard_url(index.parent, name, index).url == f"s3://b/run/{name}"


@pytest.mark.parametrize(
    "name",
    ["../x", "/abs", "s3://other/x", "https://evil/x", "a/../../x", "a\\b", "x?y", "c:x", "", None, "a//b", "%2e%2e/x"],
)
def test_shard_names_that_leave_the_folder_are_refused(name):
    index = RemotePath("s3://b/run/model.safetensors.index.json")
    with pytest.raises(CorruptCheckpointError):
        shard_url(index.parent, name, index)


def test_local_source_reads_the_file():
    path = SAMPLES / "llama_tiny.safetensors"
    with open_source(path) as src:
        assert src.size == path.stat().st_size and not src.remote
        assert src.read(0, 8) == path.read_bytes()[:8]
        assert src.read_ranges([(0, 2), (10, 3)]) == [path.read_bytes()[:2], path.read_bytes()[10:13]]
        with pytest.raises(CorruptCheckpointError):
            src.read(src.size - 1, 2)


def test_cache_round_trip_and_damage(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    url = "https://h/x.pt"
    remote_cache.save(url, 100, '"e1"', [(0, b"abc"), (90, b"0123456789")])
    entry = remote_cache.load(url)
    assert entry is not None and (entry.size, entry.etag) == (100, '"e1"')
    assert entry.blocks == [(0, b"abc"), (90, b"0123456789")]
    files = list((tmp_path / "mscope" / "remote").glob("*.ranges"))
    assert len(files) == 1
    files[0].write_bytes(files[0].read_bytes()[:-5])  # truncated: ignored, never an error
    assert remote_cache.load(url) is None
    remote_cache.save("https://h/no-etag.pt", 10, None, [(0, b"x")])  # nothing to check it against
    assert remote_cache.load("https://h/no-etag.pt") is None


def test_cache_size_bound(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("MSCOPE_CACHE_MB", "0.001")  # ~1 KB: the oldest entries go
    for i in range(4):
        remote_cache.save(f"https://h/{i}.pt", 1000, f'"{i}"', [(0, bytes(400))])
    kept = list((tmp_path / "mscope" / "remote").glob("*.ranges"))
    assert 1 <= len(kept) <= 2
    assert remote_cache.load("https://h/3.pt") is not None


def test_line_switches_last_only_for_their_command(tmp_path, monkeypatch, capsys):
    """main() runs in-process too (tests, the explorer): `--no-cache` and `--download` used to stay
    set for the rest of the process, so a later open in it skipped the cache."""
    from modelscope_tui.cli import main
    from modelscope_tui.readers.sources import http

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    sample = Path(__file__).resolve().parents[2] / "sample_models" / "transformer.safetensors"
    assert main(["summary", "--no-cache", "--download", str(sample)]) == 0
    assert remote_cache.enabled() and not http.DOWNLOAD
