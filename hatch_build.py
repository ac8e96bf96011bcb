"""Compile mscope's C sources into _native.so while pip builds the wheel.

statkernel.c (audit's one-pass statistics) and picklescan.c (the pickle pre-scan) go into one
plain shared library loaded with ctypes (no Python C API): it needs only a C compiler, and
mscope works without it (numpy kernels and a regex scan, slower). So a failed compile warns and
the install goes on. The library lands next to the source, which is where an editable install
imports from; a regular wheel also gets it as a forced include and a platform tag.

The build embeds the sha256 of the C sources (native.source_hash, passed as -DMSCOPE_SOURCE_HASH
to native.c); native.py ignores a library whose hash differs from the sources it ships, so a
stale build is never used and no version number needs bumping by hand.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface
except ImportError:  # imported without hatchling: by tests, or to rebuild by hand (compile_kernel)
    BuildHookInterface = object

PACKAGE = Path("src") / "modelscope_tui"
LIBRARY = PACKAGE / "_native.so"
SLOWER = "audit --stats and large pickles will use slower Python paths"


def _compiler() -> list[str] | None:
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if not candidate:
            continue
        argv = shlex.split(candidate)
        if argv and shutil.which(argv[0]):
            return argv
    return None


def native_module(root: Path):
    """src/modelscope_tui/native.py loaded by path (stdlib only): its SOURCES and source_hash()
    are the one definition of what the library is built from, for this hook and for the loader."""
    spec = importlib.util.spec_from_file_location("_mscope_native_build", root / PACKAGE / "native.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_kernel(root: Path, target: Path | None = None, source_hash: str | None = None) -> Path | None:
    """Build the library (at `target`, default next to the sources); None (with a warning on
    stderr) when there is no working compiler. `source_hash` overrides the embedded hash (tests
    build a stale library with it)."""
    target = root / LIBRARY if target is None else target
    native = native_module(root)
    embedded = native.source_hash(root / PACKAGE) if source_hash is None else source_hash
    cc = _compiler()
    if cc is None:
        print(f"mscope: no C compiler found; {SLOWER}", file=sys.stderr)
        return None
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    sources = [str(root / PACKAGE / name) for name in native.SOURCES]
    define = f'-DMSCOPE_SOURCE_HASH="{embedded}"'
    cmd = [*cc, "-O2", "-shared", "-fPIC", "-fno-math-errno", define, "-o", str(tmp), *sources]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"mscope: could not compile {LIBRARY.name}: {exc}; {SLOWER}", file=sys.stderr)
        return None
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        print(f"mscope: compiling {LIBRARY.name} failed; {SLOWER}:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    os.replace(tmp, target)
    return target


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel":
            return
        built = compile_kernel(Path(self.root))
        if built is None or version == "editable":
            return
        build_data["force_include"][str(built)] = f"modelscope_tui/{LIBRARY.name}"
        build_data["pure_python"] = False
        # Plain C behind ctypes: any Python 3 on this platform can load it (not cp311-cp311).
        platform = sysconfig.get_platform().replace("-", "_").replace(".", "_")
        build_data["tag"] = f"py3-none-{platform}"
