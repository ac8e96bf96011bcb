#!/usr/bin/env python
"""Benchmark ``mscope audit --stats --json`` against the page-touch floor and naive torch.

    python bench/bench_audit.py [--only NAME ...] [--workdir DIR] [--repeat N] [--naive-repeat N]

Inputs (generated on first use into ``--workdir``, default ``bench/_data/``, by
``_make_bench_data.py`` in a child process):

  gpt_1p3b_fp16.pt            ~1.3B-param GPT-style fp16 state_dict (~2.6 GB)
  gpt_1p3b_fp16.safetensors   the same tensors as safetensors

Three whole processes per file, interpreter start and imports included:

  (a) floor   a page-touch pass: mmap the file and read one byte of every 4 KiB page, 16 MB
              at a time (a numpy strided sum: a C loop). "floor without numpy" is the same touch
              in plain Python, without numpy's ~0.1 s import: the stricter floor (mscope's
              compiled kernel does not import numpy either). "read-all" also reports a pass that
              reads every byte (numpy max over uint64 words, 16 MB at a time), for context.
  (m) mscope  ``mscope audit --stats --json FILE`` (stdout to /dev/null; exit 0 or 1 both
              count as success: 1 only means a --fail-on category matched). The same command
              without ``--stats`` is timed too: the fixed cost (interpreter, imports, parsing the
              file, the metadata checks) that no statistics kernel can remove.
  (b) naive   ``torch.load(F, mmap=True, weights_only=True)``, then for every tensor
              ``x = t.float()`` and torch's min, max, mean, std, norm, (x == 0).sum(),
              isnan().sum(), isinf().sum() (the same statistics, one reduction each).

Targets: mscope <= 1.5x the page-touch floor, naive / mscope >= 4x, and mscope's peak anonymous
memory < 300 MB.

Memory: peak **RssAnon** (anonymous resident memory: heap, numpy buffers, interpreter) sampled
from /proc/PID/status every 2 ms by the driver while the child runs. ru_maxrss from os.wait4 is
printed too but counts the file's mmap'ed page-cache pages (file-backed, shared, reclaimable):
an mmap pass over a 2.6 GB file shows ~2.6 GB there whatever the process allocates.

Bytecode: mscope runs without PYTHONDONTWRITEBYTECODE, after one unmeasured run, so they use
cached .pyc files as an installed package does.

Page cache: every file is read once (unmeasured) before the measured runs, and every measured
run happens with the file already in the page cache (warm); the driver checks that the machine
has enough free memory to keep it there. Cold-cache numbers are disk numbers, not mscope's.

The driver never imports torch or numpy (a child's ru_maxrss starts at its parent's peak).
This is a benchmark, not a test: it always exits 0 unless arguments are bad.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
MAKE_DATA = BENCH_DIR / "_make_bench_data.py"
CASES = ["gpt_1p3b_fp16.pt", "gpt_1p3b_fp16.safetensors"]
TIME_VS_FLOOR = 1.5
SPEEDUP_VS_NAIVE = 4.0
ANON_LIMIT_MB = 300.0

FLOOR_TOUCH = r"""
import mmap, sys, numpy as np
with open(sys.argv[1], "rb") as fh:
    m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
a = np.frombuffer(m, dtype=np.uint8)
step = 16 << 20
total = 0
for i in range(0, a.size, step):
    total += int(a[i : i + step : 4096].sum())  # one byte of every page
print(total)
"""

# The same touch without numpy (its import is ~0.1 s of the floor above, which mscope's compiled
# kernel no longer pays): bytes() of a strided memoryview copies one byte per page in C.
FLOOR_TOUCH_BARE = r"""
import mmap, sys
with open(sys.argv[1], "rb") as fh:
    m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
v = memoryview(m)
step = 16 << 20
total = 0
for i in range(0, len(m), step):
    total += sum(bytes(v[i : i + step : 4096]))  # one byte of every page
print(total)
"""

FLOOR_READ_ALL = r"""
import mmap, sys, numpy as np
with open(sys.argv[1], "rb") as fh:
    m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
a = np.frombuffer(m, dtype=np.uint64, count=len(m) // 8)
step = (16 << 20) // 8
top = 0
for i in range(0, a.size, step):
    top = max(top, int(a[i : i + step].max()))  # every byte
print(top)
"""

NAIVE = r"""
import sys, torch
sd = torch.load(sys.argv[1], mmap=True, weights_only=True) if sys.argv[1].endswith(".pt") else None
if sd is None:
    from safetensors.torch import load_file
    sd = load_file(sys.argv[1])  # safetensors: its own loader (mmap'ed, lazy per tensor)
out = {}
for name, t in sd.items():
    x = t.float()
    out[name] = (x.min().item(), x.max().item(), x.mean().item(), x.std().item(), x.norm().item(),
                 int((x == 0).sum()), int(x.isnan().sum()), int(x.isinf().sum()))
print(len(out))
"""


@dataclass
class Run:
    seconds: float
    maxrss_kib: int
    anon_peak_kib: int
    returncode: int
    stderr: str = ""


@dataclass
class Result:
    runs: list[Run] = field(default_factory=list)
    ok_codes: tuple[int, ...] = (0,)

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.returncode in self.ok_codes for r in self.runs)

    @property
    def median_s(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def anon_mb(self) -> float:
        return max(r.anon_peak_kib for r in self.runs) / 1024

    @property
    def maxrss_mb(self) -> float:
        return max(r.maxrss_kib for r in self.runs) / 1024

    def error(self) -> str:
        for r in self.runs:
            if r.returncode not in self.ok_codes:
                return f"exit {r.returncode}: {r.stderr.strip()[-2000:]}"
        return ""


def _rss_anon_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return 0


def measure(cmd: list[str], env: dict[str, str] | None = None) -> Run:
    """Run cmd to completion (stdout to /dev/null), sampling its RssAnon every 2 ms."""
    peak = [0]
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env
        )
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                v = _rss_anon_kib(proc.pid)
                if v is not None and v > peak[0]:
                    peak[0] = v
                time.sleep(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, rusage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - t0
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    return Run(elapsed, rusage.ru_maxrss, peak[0], proc.returncode, stderr)


def check_json(cmd: list[str]) -> str:
    """One unmeasured run keeping stdout: it must be an mscope.audit report with statistics."""
    with tempfile.TemporaryFile() as out:
        rc = subprocess.call(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.DEVNULL)
        out.seek(0)
        code = (
            "import json, sys; d = json.load(sys.stdin); "
            "assert d['schema'] == 'mscope.audit', d.get('schema'); "
            "assert len(d['stats']['tensors']) == d['tensors'], 'stats missing'; "
            "print(d['verdict']['line'])"
        )
        check = subprocess.run(
            [sys.executable, "-c", code], stdin=out, capture_output=True, text=True
        )
    if rc not in (0, 1) or check.returncode != 0:
        return f"exit {rc}; JSON check: {(check.stderr.strip().splitlines() or ['?'])[-1]}"
    return ""


def mscope_cmd() -> list[str]:
    script = Path(sys.executable).parent / "mscope"
    return [str(script)] if script.exists() else [sys.executable, "-m", "modelscope_tui"]


def ensure_data(name: str, workdir: Path) -> Path:
    path = workdir / name
    if not path.exists():
        print(f"generating {path} ...", flush=True)
        workdir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(MAKE_DATA), name, str(path)], check=True)
    return path


def mem_available_mb() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", metavar="NAME", help="file name or substring")
    ap.add_argument("--workdir", type=Path, default=BENCH_DIR / "_data")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the floor and mscope (median)")
    ap.add_argument("--naive-repeat", type=int, default=1, help="runs of the naive torch baseline")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="pass --threads N to mscope")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.naive_repeat < 1:
        ap.error("--repeat and --naive-repeat must be >= 1")
    cases = [c for c in CASES if not args.only or any(o in c for o in args.only)]
    if not cases:
        ap.error(f"--only matches nothing; choose from {', '.join(CASES)}")
    workdir = args.workdir.resolve()
    paths = {c: ensure_data(c, workdir) for c in cases}

    mscope = [*mscope_cmd(), "audit", "--stats", "--json"]
    if args.threads:
        mscope += ["--threads", str(args.threads)]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"machine: {cpus} usable CPUs, {os.uname().machine}, MemAvailable {mem_available_mb() or 0:.0f} MB"
    )
    print(f"mscope: {' '.join(mscope)} FILE")
    print("floor:  mmap + one byte per 4 KiB page, 16 MB at a time (numpy strided sum); the target")
    print("        is against it. 'without numpy': the same touch in plain Python (bytes() of a strided")
    print("        memoryview), which saves numpy's ~0.1 s import: the stricter floor, reported too")
    print("naive:  torch.load(F, mmap=True, weights_only=True) + per-tensor torch reductions")
    print(
        "memory: peak RssAnon sampled from /proc/PID/status every 2 ms (ru_maxrss includes mmap'ed file pages)"
    )
    print(
        f"repeat: {args.repeat} (median time), naive {args.naive_repeat}; all runs with the file in the page cache\n",
        flush=True,
    )

    # Byte-compiled modules, as an installed package has them: a PYTHONDONTWRITEBYTECODE=1 in the
    # environment would make every run recompile any module edited since its .pyc was written.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    rows = []
    for case in cases:
        path = paths[case]
        size_mb = path.stat().st_size / (1 << 20)
        avail = mem_available_mb()
        if avail is not None and avail < 1.5 * size_mb:
            print(
                f"  warning: only {avail:.0f} MB available for a {size_mb:.0f} MB file: the page cache may not hold it"
            )
        touch, read_all, bare = Result(), Result(), Result()
        ms = Result(ok_codes=(0, 1))
        fixed = Result(ok_codes=(0, 1))
        naive = Result()
        measure(
            [sys.executable, "-c", FLOOR_READ_ALL, str(path)]
        )  # warm the page cache (unmeasured)
        measure([*mscope_cmd(), "audit", "--json", str(path)], env)  # and the bytecode cache
        for i in range(args.repeat):
            touch.runs.append(measure([sys.executable, "-c", FLOOR_TOUCH, str(path)]))
            bare.runs.append(measure([sys.executable, "-c", FLOOR_TOUCH_BARE, str(path)]))
            read_all.runs.append(measure([sys.executable, "-c", FLOOR_READ_ALL, str(path)]))
            ms.runs.append(measure([*mscope, str(path)], env))
            fixed.runs.append(measure([*mscope_cmd(), "audit", "--json", str(path)], env))
            print(
                f"  {case} #{i + 1}: floor {touch.runs[-1].seconds:.3f}s (no numpy {bare.runs[-1].seconds:.3f}s)  "
                f"read-all {read_all.runs[-1].seconds:.3f}s  "
                f"no-stats {fixed.runs[-1].seconds:.3f}s  "
                f"mscope {ms.runs[-1].seconds:.3f}s (RssAnon {ms.runs[-1].anon_peak_kib / 1024:.0f} MB, "
                f"maxrss {ms.runs[-1].maxrss_kib / 1024:.0f} MB, exit {ms.runs[-1].returncode})",
                flush=True,
            )
        if not args.skip_naive:
            for i in range(args.naive_repeat):
                naive.runs.append(measure([sys.executable, "-c", NAIVE, str(path)]))
                r = naive.runs[-1]
                print(
                    f"  {case} naive #{i + 1}: {r.seconds:.3f}s (RssAnon {r.anon_peak_kib / 1024:.0f} MB, exit {r.returncode})",
                    flush=True,
                )
        problem = check_json([*mscope, str(path)]) if ms.ok else ms.error()
        if problem:
            print(f"  mscope FAILED on {case}: {problem}", file=sys.stderr)
        if naive.runs and not naive.ok:
            print(f"  naive FAILED on {case}: {naive.error()}", file=sys.stderr)
        vs_floor = ms.median_s / touch.median_s if ms.ok and touch.ok else None
        vs_bare = ms.median_s / bare.median_s if ms.ok and bare.ok else None
        vs_read = ms.median_s / read_all.median_s if ms.ok and read_all.ok else None
        vs_naive = naive.median_s / ms.median_s if ms.ok and naive.ok else None
        verdicts = [
            vs_floor is not None and vs_floor <= TIME_VS_FLOOR,
            vs_naive is None or vs_naive >= SPEEDUP_VS_NAIVE,
            ms.ok and ms.anon_mb < ANON_LIMIT_MB,
            not problem,
        ]
        rows.append(
            [
                case,
                f"{size_mb / 1024:.2f} GiB",
                f"{touch.median_s:.3f} s",
                f"{bare.median_s:.3f} s",
                f"{read_all.median_s:.3f} s",
                f"{fixed.median_s:.3f} s" if fixed.ok else "error",
                f"{ms.median_s:.3f} s" if ms.ok else "error",
                f"{naive.median_s:.3f} s" if naive.ok else "-",
                f"{vs_floor:.2f}x" if vs_floor else "-",
                f"{vs_bare:.2f}x" if vs_bare else "-",
                f"{vs_read:.2f}x" if vs_read else "-",
                f"{vs_naive:.1f}x" if vs_naive else "-",
                f"{ms.anon_mb:.0f}" if ms.ok else "-",
                f"{naive.anon_mb:.0f}" if naive.ok else "-",
                " ".join(
                    f"{name}:{'PASS' if ok else 'FAIL'}"
                    for name, ok in zip(("floor", "naive", "memory", "json"), verdicts)
                ),
            ]
        )
    header = [
        "file", "size", "floor (page touch)", "floor without numpy", "read all bytes",
        "mscope audit (no --stats)", "mscope audit --stats", "naive torch",
        f"mscope/floor (<= {TIME_VS_FLOOR})", "mscope/floor without numpy", "mscope/read-all", f"naive/mscope (>= {SPEEDUP_VS_NAIVE:g})",
        f"mscope RssAnon MB (< {ANON_LIMIT_MB:g})", "naive RssAnon MB", "result",
    ]  # fmt: skip
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
