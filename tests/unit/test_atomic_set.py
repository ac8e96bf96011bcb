"""atomic_write_set: a set of files (shards, then their index) appears whole or not at all."""

from __future__ import annotations

import os

import pytest

from modelscope_tui.write.atomic import SaveError, atomic_write_set


def writer(data: bytes):
    return lambda fh: fh.write(data)


def failing(fh):
    fh.write(b"half")
    raise OSError(28, "No space left on device")


def test_failure_in_the_last_file_leaves_none(tmp_path):
    (tmp_path / "a").write_bytes(b"old a")
    files = [
        (tmp_path / "a", writer(b"new a")),
        (tmp_path / "b", writer(b"b")),
        (tmp_path / "index", failing),
    ]
    with pytest.raises(SaveError, match="disk is full"):
        atomic_write_set(files, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["a"]
    assert (tmp_path / "a").read_bytes() == b"old a"


def test_all_written_in_order_with_backups(tmp_path):
    (tmp_path / "a").write_bytes(b"old a")
    out = atomic_write_set(
        [(tmp_path / "a", writer(b"A")), (tmp_path / "i", writer(b"I"))], overwrite=True
    )
    assert out == [tmp_path / "a", tmp_path / "i"]
    assert (tmp_path / "a").read_bytes() == b"A" and (tmp_path / "a.bak").read_bytes() == b"old a"
    assert sorted(os.listdir(tmp_path)) == ["a", "a.bak", "i"]


def test_existing_file_refused_before_anything_is_written(tmp_path):
    (tmp_path / "b").write_bytes(b"keep")
    with pytest.raises(SaveError, match="destination exists"):
        atomic_write_set([(tmp_path / "a", writer(b"A")), (tmp_path / "b", writer(b"B"))])
    assert sorted(os.listdir(tmp_path)) == ["b"]
