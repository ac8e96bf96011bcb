#!/usr/bin/env python3
"""Build the wheels a release would publish and check their tags and contents (about 15 s).

    python scripts/check_wheel.py [--out DIR]

1. `pip wheel .` with the compiler: tagged `py3-none-manylinux_2_NN_<arch>` for this machine's
   glibc (an index refuses `linux_x86_64`); it holds `_native.so` stamped with the hash of the C
   sources it ships, linked only against libc-family libraries, needing no newer glibc symbol
   than its tag says; installed on its own, mscope opens the library.
2. `CC=/nonexistent pip wheel .`: the pure-Python fallback, `py3-none-any`, no `_native.so`;
   installed on its own, mscope runs on the Python paths (`summary` of a sample).
3. Neither build touches the checkout's own `_native.so`.

Prints PASS / FAIL lines; exits 1 on any FAIL, 3 when pip could not get the build backend
(hatchling comes from the package index into pip's isolated build environment).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "modelscope_tui"
SAMPLE = ROOT / "sample_models" / "transformer_tied.pt"
NO_BACKEND = 3
# PEP 600 / auditwheel: the libraries a manylinux wheel may need from the system.
SYSTEM_LIBS = {"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1"}

failures: list[str] = []


def report(ok: bool, what: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}: {what}", flush=True)
    if not ok:
        failures.append(what)


class NoBackend(Exception):
    pass


def build(out: Path, cc: str | None) -> Path:
    env = dict(os.environ)
    env.pop("CC", None)
    if cc is not None:
        env["CC"] = cc
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        text = done.stdout + done.stderr
        if "hatchling" in text and re.search(r"No matching distribution|connection|resolve", text, re.I):
            raise NoBackend(text.strip()[-500:])
        raise RuntimeError(f"pip wheel failed:\n{text[-2000:]}")
    (wheel,) = out.glob("modelscope_tui-*.whl")
    return wheel


def wheel_file(z: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in z.namelist() if n.endswith(f".dist-info/{name}")]
    return z.read(path).decode()


def glibc() -> tuple[int, int] | None:
    version = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None
    m = re.fullmatch(r"glibc (\d+)\.(\d+)", version or "")
    return (int(m[1]), int(m[2])) if m else None


def elf_needs(lib: Path) -> tuple[set[str], set[tuple[int, int]]]:
    """(NEEDED libraries, GLIBC_x.y symbol versions) from readelf; empty without binutils."""
    if shutil.which("readelf") is None:
        return set(), set()
    dyn = subprocess.run(["readelf", "-dW", str(lib)], capture_output=True, text=True).stdout
    ver = subprocess.run(["readelf", "-VW", str(lib)], capture_output=True, text=True).stdout
    needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dyn))
    versions = {(int(a), int(b)) for a, b in re.findall(r"GLIBC_(\d+)\.(\d+)", ver)}
    return needed, versions


def run_installed(target: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=target, timeout=300
    )


def install(wheel: Path, target: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(target), str(wheel)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)


def check_native(wheel: Path, work: Path) -> None:
    tag = wheel.name.removesuffix(".whl").split("-", 2)[2]
    libc = glibc()
    arch = re.sub(r"^linux_", "", sysconfig_platform())
    if sys.platform.startswith("linux") and libc is not None:
        want = f"py3-none-manylinux_{libc[0]}_{libc[1]}_{arch}"
        report(tag == want, f"native wheel tag {tag} (want {want}: this machine's glibc)")
    else:
        report(not tag.endswith("linux_" + arch), f"native wheel tag {tag} (not a bare linux_ tag)")
    with zipfile.ZipFile(wheel) as z:
        meta = wheel_file(z, "WHEEL")
        names = set(z.namelist())
        report(f"Tag: {tag}\n" in meta, f"WHEEL says Tag: {tag}")
        report("Root-Is-Purelib: false" in meta, "WHEEL says Root-Is-Purelib: false (platlib)")
        report("modelscope_tui/_native.so" in names, "the wheel holds modelscope_tui/_native.so")
        report(
            not any(n.startswith(("tests/", "sample_models/", "bench/")) for n in names),
            "no tests, samples or benches in the wheel",
        )
        z.extractall(work / "unpacked")
    lib = work / "unpacked" / "modelscope_tui" / "_native.so"
    needed, versions = elf_needs(lib)
    if needed:
        report(needed <= SYSTEM_LIBS, f"_native.so links only {sorted(needed)} (manylinux allows libc, libm, ...)")
    if versions and libc is not None:
        report(max(versions) <= libc, f"_native.so needs glibc {'.'.join(map(str, max(versions)))} at most, tag says {libc[0]}.{libc[1]}")
    target = work / "site-native"
    install(wheel, target)
    done = run_installed(
        target,
        "import modelscope_tui.native as n; lib = n.library(); "
        "print(n.__file__, lib is not None and lib.mscope_source_hash().decode() == n.source_hash())",
    )
    report(
        done.returncode == 0 and str(target) in done.stdout and done.stdout.strip().endswith("True"),
        f"installed native wheel opens its library (hash of the shipped sources): {done.stdout.strip() or done.stderr[-300:]}",
    )


def check_pure(wheel: Path, work: Path) -> None:
    report(wheel.name.endswith("-py3-none-any.whl"), f"CC=/nonexistent wheel is {wheel.name}")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        report("Root-Is-Purelib: true" in wheel_file(z, "WHEEL"), "WHEEL says Root-Is-Purelib: true")
        report(not any(n.endswith(".so") for n in names), "no compiled library in the pure wheel")
    target = work / "site-pure"
    install(wheel, target)
    done = run_installed(
        target,
        "import io, contextlib, modelscope_tui.native as n\n"
        "from modelscope_tui.cli import main\n"
        f"assert n.library() is None and n.__file__.startswith({str(target)!r})\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        f"    rc = main(['summary', {str(SAMPLE)!r}, '--json'])\n"
        "print(rc, len(out.getvalue()))\n",
    )
    report(
        done.returncode == 0 and done.stdout.split()[:1] == ["0"],
        f"installed pure wheel runs `mscope summary --json` without the library: {done.stdout.strip() or done.stderr[-300:]}",
    )


def sysconfig_platform() -> str:
    import sysconfig

    return sysconfig.get_platform().replace("-", "_").replace(".", "_")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="keep the wheels here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mscope-wheel-"))
    checkout_lib = PACKAGE / "_native.so"
    before = checkout_lib.stat().st_mtime_ns if checkout_lib.exists() else None
    try:
        try:
            native = build(work / "native", cc=None)
            pure = build(work / "pure", cc="/nonexistent")
        except NoBackend as exc:
            print(f"SKIP: pip could not get the build backend: {exc}")
            return NO_BACKEND
        check_native(native, work)
        check_pure(pure, work)
        after = checkout_lib.stat().st_mtime_ns if checkout_lib.exists() else None
        report(before == after, "the checkout's own _native.so is untouched by both builds")
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            for wheel in (native, pure):
                shutil.copy(wheel, args.out / wheel.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'FAIL' if failures else 'PASS'}: {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
