"""Compile mscope's C sources into _native.so while pip builds the wheel.

values/statkernel.c (one-pass tensor statistics) and readers/pickle/picklescan.c (the pickle pre-scan) go into one
plain shared library loaded with ctypes (no Python C API): it needs only a C compiler, and
mscope works without it (numpy kernels and the exact Python scan, slower). So a failed compile warns and
the install goes on with a pure-Python wheel (py3-none-any). An editable install gets the library
next to the sources, where it imports from; a regular wheel gets it built in a temporary
directory (the checkout is left alone) as a forced include, tagged for this platform the way a
package index accepts: `py3-none-manylinux_2_NN_x86_64` for this machine's glibc (see
`platform_tag`), never `linux_x86_64`, which PyPI refuses. `CC` names the compiler; when it is
set and not there (CC=/nonexistent), no other compiler is tried, so that is how to build the
pure wheel on purpose.

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
import tempfile
from pathlib import Path

try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface
except ImportError:  # imported without hatchling: by tests, or to rebuild by hand (compile_kernel)
    BuildHookInterface = object

PACKAGE = Path("src") / "modelscope_tui"
LIBRARY = PACKAGE / "_native.so"
SLOWER = "audit --stats and large pickles will use slower Python paths"


def _compiler() -> list[str] | None:
    """The C compiler's argv: `CC` when set (and only it: a user who names a compiler, or a
    missing one to get the pure wheel, is obeyed), else Python's own CC, cc, gcc or clang."""
    chosen = os.environ.get("CC")
    candidates = [chosen] if chosen else [sysconfig.get_config_var("CC"), "cc", "gcc", "clang"]
    for candidate in candidates:
        if not candidate:
            continue
        argv = shlex.split(candidate)
        if argv and shutil.which(argv[0]):
            return argv
    return None


def platform_tag() -> str:
    """The platform part of the wheel tag. On Linux, PEP 600's `manylinux_2_NN_<arch>` for the
    build machine's glibc (`musllinux_1_N_<arch>` on musl): the library is plain C that links
    only libc, and glibc's symbol versions keep it loadable on that glibc and every later one.
    The tag comes from `packaging.tags` (hatchling's own dependency), the code pip uses to decide
    what this machine installs. Elsewhere sysconfig's platform (`macosx_...`), as before."""
    plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    if not plat.startswith("linux"):
        return plat
    from packaging.tags import platform_tags

    for tag in platform_tags():  # newest libc first; `linux_<arch>` is also listed: skip it
        if tag.startswith(("manylinux_", "musllinux_")):
            return tag
    print(f"mscope: unknown libc, wheel tagged {plat}: it installs here, an index refuses it", file=sys.stderr)
    return plat


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
        named = f" (CC={os.environ['CC']!r})" if os.environ.get("CC") else ""
        print(f"mscope: no C compiler found{named}; {SLOWER}", file=sys.stderr)
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
        root = Path(self.root)
        if version == "editable":  # the library goes where the editable install imports from
            compile_kernel(root)
            return
        self._build_dir = tempfile.mkdtemp(prefix="mscope-native-")
        built = compile_kernel(root, target=Path(self._build_dir) / LIBRARY.name)
        if built is None:
            return  # pure-Python wheel: py3-none-any, installs anywhere
        build_data["force_include"][str(built)] = f"modelscope_tui/{LIBRARY.name}"
        build_data["pure_python"] = False
        # Plain C behind ctypes: any Python 3 on this platform can load it (not cp311-cp311).
        build_data["tag"] = f"py3-none-{platform_tag()}"

    def finalize(self, version: str, build_data: dict, artifact_path: str) -> None:
        build_dir = getattr(self, "_build_dir", None)
        if build_dir is not None:
            shutil.rmtree(build_dir, ignore_errors=True)
