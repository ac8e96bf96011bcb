"""Compile mscope's C sources into _native.so while pip builds the wheel.

statkernel.c (audit's one-pass statistics) and picklescan.c (the pickle pre-scan) go into one
plain shared library loaded with ctypes (no Python C API): it needs only a C compiler, and
mscope works without it (numpy kernels and a regex scan, slower). So a failed compile warns and
the install goes on. The library lands next to the source, which is where an editable install
imports from; a regular wheel also gets it as a forced include and a platform tag.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PACKAGE = Path("src") / "modelscope_tui"
SOURCES = (PACKAGE / "statkernel.c", PACKAGE / "picklescan.c")
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


def compile_kernel(root: Path) -> Path | None:
    """Build the library; None (with a warning on stderr) when there is no working compiler."""
    target = root / LIBRARY
    cc = _compiler()
    if cc is None:
        print(f"mscope: no C compiler found; {SLOWER}", file=sys.stderr)
        return None
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    cmd = [*cc, "-O2", "-shared", "-fPIC", "-fno-math-errno", "-o", str(tmp), *(str(root / s) for s in SOURCES)]
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
