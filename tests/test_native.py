"""_native.so staleness: the build embeds the sha256 of its C sources and native.py loads only a
library whose hash matches the sources it ships (no version numbers bumped by hand)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modelscope_tui import native
from modelscope_tui.readers import unpickler as U
from modelscope_tui.values import statkernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import hatch_build  # noqa: E402

needs_cc = pytest.mark.skipif(hatch_build._compiler() is None, reason="no C compiler")


@needs_cc
def test_a_fresh_build_is_used(tmp_path):
    built = hatch_build.compile_kernel(ROOT, target=tmp_path / "fresh.so")
    assert built == tmp_path / "fresh.so"
    lib = native.open_library(built, native.source_hash())
    assert lib is not None
    assert lib.mscope_source_hash() == native.source_hash().encode()


@needs_cc
def test_a_stale_build_is_ignored(tmp_path):
    built = hatch_build.compile_kernel(ROOT, target=tmp_path / "stale.so", source_hash="0" * 64)
    assert built is not None
    assert native.open_library(built, native.source_hash()) is None


@needs_cc
def test_a_build_without_a_hash_is_ignored(tmp_path):
    """A library from before the hash (or compiled by hand without the define) never matches."""
    src = tmp_path / "old.c"
    src.write_text("int mscope_scan_version(void) { return 3; }\n")
    cc = hatch_build._compiler()
    subprocess.run([*cc, "-shared", "-fPIC", "-o", str(tmp_path / "old.so"), str(src)], check=True)
    assert native.open_library(tmp_path / "old.so", native.source_hash()) is None
    plain = tmp_path / "plain.so"
    cmd = [
        *cc,
        "-shared",
        "-fPIC",
        "-o",
        str(plain),
        *(str(native.HERE / n) for n in native.SOURCES),
    ]
    subprocess.run(cmd, check=True)
    assert native.open_library(plain, native.source_hash()) is None  # "unknown"


def test_editing_a_source_changes_the_hash(tmp_path):
    for name in native.SOURCES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(native.HERE / name, tmp_path / name)
    assert native.source_hash(tmp_path) == native.source_hash()
    with open(tmp_path / "picklescan.c", "a") as f:
        f.write("/* edited */\n")
    assert native.source_hash(tmp_path) != native.source_hash()
    (tmp_path / "values" / "statkernel.c").unlink()
    assert native.source_hash(tmp_path) is None
    assert native.open_library(native.LIBRARY, None) is None


def test_the_installed_library_is_current():
    """`pip install -e .` (or hatch_build.compile_kernel) built _native.so from these sources."""
    lib = native.library()
    assert lib is not None, "_native.so is missing or stale: run pip install -e ."
    assert lib.mscope_source_hash() == native.source_hash().encode()


def test_no_library_means_the_python_paths(monkeypatch):
    monkeypatch.setattr(native, "_opened", [None])
    monkeypatch.setattr(statkernel, "_loaded", {})
    U._native_scan.cache_clear()
    try:
        assert statkernel.load() is None
        assert U._native_scan() is None
    finally:
        U._native_scan.cache_clear()


def test_no_compiler_warns_and_builds_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hatch_build, "_compiler", lambda: None)
    assert hatch_build.compile_kernel(ROOT, target=tmp_path / "x.so") is None
    assert "no C compiler" in capsys.readouterr().err
    assert not (tmp_path / "x.so").exists()


def test_no_stale_library_names_are_left():
    for path in (
        ROOT / ".gitignore",
        ROOT / "pyproject.toml",
        *native.HERE.rglob("*.c"),
        *native.HERE.rglob("*.py"),
    ):
        assert "_statkernel.so" not in path.read_text(), path
