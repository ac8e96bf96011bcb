"""Compile src/modelscope_tui/statkernel.c into _statkernel.so while pip builds the wheel.

A plain shared library loaded with ctypes (no Python C API): it needs only a C compiler, and
mscope works without it (audit's numpy kernels, slower). So a failed compile warns and the
install goes on. The library lands next to the source, which is where an editable install
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
SOURCE = PACKAGE / "statkernel.c"
LIBRARY = PACKAGE / "_statkernel.so"


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
    source, target = root / SOURCE, root / LIBRARY
    cc = _compiler()
    if cc is None:
        print("mscope: no C compiler found; audit --stats will use numpy (slower)", file=sys.stderr)
        return None
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    cmd = [*cc, "-O2", "-shared", "-fPIC", "-fno-math-errno", "-o", str(tmp), str(source)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"mscope: could not compile {SOURCE}: {exc}; audit --stats will use numpy", file=sys.stderr)
        return None
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        print(
            f"mscope: compiling {SOURCE} failed; audit --stats will use numpy:\n{done.stderr[-2000:]}",
            file=sys.stderr,
        )
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
        build_data["force_include"][str(built)] = "modelscope_tui/_statkernel.so"
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
