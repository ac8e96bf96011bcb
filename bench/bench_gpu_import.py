"""Import cost of the GPU layer, ours against `nvitop.api` (docs/gpu-backend.md has the decision).

    python bench/bench_gpu_import.py [--runs 15] [--nvitop-site DIR]

Each statement runs in fresh processes, alternating, and is timed inside the process
(perf_counter and process CPU time around the import only, so interpreter start-up is not
counted; CPU time is the steadier figure on a loaded machine):

- warm: bytecode and files in the page cache (every run after the first of the day);
- cold: the files that statement opens are first dropped from the page cache with
  posix_fadvise(DONTNEED) (only those files; nothing global), like the first `mscope` after boot.

`--nvitop-site DIR` is a `pip install --target DIR nvitop` made for the comparison; nvitop is no
dependency of mscope. Without it only our statements run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# label -> (statement run untimed first, statement timed)
# gpu.monitor pulls in the whole layer (both backends, snapshots, mapping): what the explorer and
# `mscope gpus` import; pynvml follows on the first NVML sample.
OURS = {
    "gpu.monitor (modelscope_tui imported first)": ("import modelscope_tui", "import modelscope_tui.gpu.monitor"),
    "gpu.monitor + pynvml (first sample)": ("import modelscope_tui", "import modelscope_tui.gpu.monitor, pynvml"),
    "pynvml alone": ("", "import pynvml"),
}
THEIRS = {
    "nvitop.api": ("", "import nvitop.api"),
    "psutil alone (nvitop needs it)": ("", "import psutil"),
}

CHILD = """
import sys, time
{pre}
before = set(sys.modules)
t, c = time.perf_counter(), time.process_time()
{stmt}
dt, dc = time.perf_counter() - t, time.process_time() - c
import json
new = sorted(set(sys.modules) - before)
files = [getattr(sys.modules[m], "__file__", None) for m in new]
print(json.dumps({{"seconds": dt, "cpu": dc, "modules": len(new), "files": [f for f in files if f]}}))
"""


def child(pre: str, stmt: str, env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(pre=pre, stmt=stmt)],
        capture_output=True, text=True, env=env, check=True, timeout=120,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def evict(files: list[str]) -> None:
    """Drop these files (and their bytecode) from the page cache; nothing else."""
    import importlib.util

    paths = set()
    for f in files:
        paths.add(f)
        if f.endswith(".py"):
            try:
                paths.add(importlib.util.cache_from_source(f))
            except (NotImplementedError, ValueError):
                pass
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--nvitop-site", type=Path, default=None)
    args = ap.parse_args()
    env = dict(os.environ)
    path = [str(ROOT / "src"), env.get("PYTHONPATH", "")]
    statements = dict(OURS)
    if args.nvitop_site is not None:
        path.insert(0, str(args.nvitop_site))
        statements.update(THEIRS)
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    opened = {label: child(pre, stmt, env) for label, (pre, stmt) in statements.items()}
    times: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.runs):
        for label, (pre, stmt) in statements.items():  # alternate, so load drifts hit all alike
            times.setdefault((label, "warm"), []).append(child(pre, stmt, env))
            evict(opened[label]["files"])
            times.setdefault((label, "cold"), []).append(child(pre, stmt, env))
    print(f"{'statement':46} {'mode':5} {'median':>8} {'min':>8} {'cpu med':>8} {'modules':>8}")
    for label in statements:
        for mode in ("warm", "cold"):
            runs = times[(label, mode)]
            wall = sorted(r["seconds"] * 1e3 for r in runs)
            cpu = statistics.median(r["cpu"] * 1e3 for r in runs)
            print(
                f"{label:46} {mode:5} {statistics.median(wall):7.1f}ms {wall[0]:7.1f}ms"
                f" {cpu:7.1f}ms {opened[label]['modules']:8}"
            )
    print(f"({args.runs} runs each, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
