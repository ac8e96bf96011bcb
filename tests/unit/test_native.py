"""_native.so staleness: the build embeds the sha256 of its C sources and native.py loads only a
library whose hash matches the sources it ships (no version numbers bumped by hand)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pytest

from modelscope_tui import native
from modelscope_tui.readers.pickle import scan as S
from modelscope_tui.values import statkernel

ROOT = Path(__file__).resolve().parents[2]
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
    with open(tmp_path / "readers" / "pickle" / "picklescan.c", "a") as f:
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
    S.native_scan.cache_clear()
    try:
        assert statkernel.load() is None
        assert S.native_scan() is None
    finally:
        S.native_scan.cache_clear()


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


# -- the wheel a release publishes (hatch_build.CustomBuildHook, scripts/check_wheel.py) --------


def run_hook(version: str, monkeypatch, cc: str | None = None) -> tuple[dict, SimpleNamespace]:
    """The hook as hatchling calls it, on a stand-in for its interface (hatchling itself is
    only in pip's isolated build environment)."""
    if cc is None:
        monkeypatch.delenv("CC", raising=False)
    else:
        monkeypatch.setenv("CC", cc)
    hook = SimpleNamespace(target_name="wheel", root=str(ROOT))
    build_data: dict = {"force_include": {}, "pure_python": True}
    hatch_build.CustomBuildHook.initialize(hook, version, build_data)
    return build_data, hook


def glibc() -> tuple[int, int] | None:
    m = re.fullmatch(r"glibc (\d+)\.(\d+)", os.confstr("CS_GNU_LIBC_VERSION") or "")
    return (int(m[1]), int(m[2])) if m else None


@pytest.mark.skipif(not sys.platform.startswith("linux") or glibc() is None, reason="glibc Linux")
def test_platform_tag_is_manylinux_for_this_glibc():
    """PyPI refuses `linux_x86_64`; PEP 600 names the glibc the wheel needs at least."""
    major, minor = glibc()
    arch = sysconfig.get_platform().split("-", 1)[1].replace("-", "_").replace(".", "_")
    assert hatch_build.platform_tag() == f"manylinux_{major}_{minor}_{arch}"


@needs_cc
def test_a_release_wheel_carries_the_library_and_a_platform_tag(monkeypatch):
    build_data, hook = run_hook("standard", monkeypatch)
    (built, dest), = build_data["force_include"].items()
    try:
        assert dest == "modelscope_tui/_native.so" and not build_data["pure_python"]
        assert build_data["tag"] == f"py3-none-{hatch_build.platform_tag()}"
        assert Path(built).parent == Path(hook._build_dir) != native.HERE, "the checkout is left alone"
        assert native.open_library(Path(built), native.source_hash()) is not None
    finally:
        hatch_build.CustomBuildHook.finalize(hook, "standard", build_data, "")
    assert not Path(hook._build_dir).exists()


def test_a_missing_cc_gives_the_pure_wheel(monkeypatch, capsys):
    """CC names the compiler; a missing one is not replaced by another (how to build the pure
    wheel on purpose, and what a machine without a compiler gets)."""
    build_data, hook = run_hook("standard", monkeypatch, cc="/nonexistent")
    hatch_build.CustomBuildHook.finalize(hook, "standard", build_data, "")
    assert build_data == {"force_include": {}, "pure_python": True}  # py3-none-any
    assert "no C compiler found (CC='/nonexistent')" in capsys.readouterr().err
    monkeypatch.setenv("CC", "/nonexistent --flag")
    assert hatch_build._compiler() is None


def test_an_editable_install_builds_next_to_the_sources(monkeypatch):
    calls = []
    monkeypatch.setattr(hatch_build, "compile_kernel", lambda root, target=None: calls.append((root, target)))
    build_data, _hook = run_hook("editable", monkeypatch)
    assert calls == [(ROOT, None)] and build_data == {"force_include": {}, "pure_python": True}


def test_release_wheels_built_by_pip():
    """scripts/check_wheel.py: `pip wheel .` with and without a compiler, tags, contents, and
    each installed on its own."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_wheel.py")], capture_output=True, text=True, timeout=900
    )
    if done.returncode == 3:
        pytest.skip(done.stdout.strip()[-300:])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAIL" not in done.stdout and "PASS: CC=/nonexistent wheel is modelscope_tui-0.1.0-py3-none-any.whl" in done.stdout
