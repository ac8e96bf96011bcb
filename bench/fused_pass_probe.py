#!/usr/bin/env python
"""How close do the statistics kernels get to the page-touch floor on this machine?

    python bench/fused_pass_probe.py [FILE] [--threads N] [--repeat N]

A probe for the bound behind bench_audit.py's "<= 1.5x the floor" target. In one process, with
FILE (default bench/_data/gpt_1p3b_fp16.pt) in the page cache, it times passes over the whole
file mapped read-only, 2 MB at a time, each on a fresh mapping (so each pays the page faults,
as a real run does), the file read as fp16 values:

  touch           one byte of every 4 KiB page (what bench_audit.py's floor does after start-up)
  read-all        numpy max over uint64 words: every byte read, the cheapest numpy pass there is
  compiled kernel the one-pass kernel (values/statkernel.c, what `mscope audit --stats` runs)
  numpy kernels   the numpy fallback (MSCOPE_STATS_KERNEL=numpy, or no compiler at install)

each with 1 thread and with N (default: values.stream.default_threads()). Whole-process costs (Python
start, imports, parsing) come on top of every line; bench_audit.py measures those.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "src"))
from modelscope_tui.values import kernels, statkernel  # noqa: E402
from modelscope_tui.values.stream import default_threads  # noqa: E402

CHUNK = 2 << 20

def mapped(path: Path) -> np.ndarray:
    with open(path, "rb") as fh:
        m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(m, dtype=np.uint8)


def run_threads(threads: int, nchunks: int, work) -> None:
    def worker(k: int) -> None:
        for i in range(k, nchunks, threads):
            work(i)

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def touch(path: Path, threads: int) -> None:
    a = mapped(path)
    run_threads(threads, -(-a.size // CHUNK), lambda i: a[i * CHUNK : (i + 1) * CHUNK : 4096].sum())


def read_all(path: Path, threads: int) -> None:
    a = mapped(path)
    words = a[: a.size // 8 * 8].view(np.uint64)
    step = CHUNK // 8
    run_threads(threads, -(-words.size // step), lambda i: words[i * step : (i + 1) * step].max())


def compiled_kernel(kernel: statkernel.Kernel, path: Path, threads: int) -> None:
    a = mapped(path)
    size = a.size // 2 * 2
    base = a.ctypes.data
    kind = statkernel.KINDS["f16"]
    run_threads(
        threads,
        -(-size // CHUNK),
        lambda i: kernel.stats(base + i * CHUNK, (min(size, (i + 1) * CHUNK) - i * CHUNK) // 2, kind),
    )


def numpy_kernel(path: Path, threads: int) -> None:
    a = mapped(path)
    size = a.size // 2 * 2
    run_threads(
        threads,
        -(-size // CHUNK),
        lambda i: kernels.numpy_chunk_part(
            a[i * CHUNK : min(size, (i + 1) * CHUNK)].view(np.int16), "f16"
        ),
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", nargs="?", type=Path, default=BENCH_DIR / "_data" / "gpt_1p3b_fp16.pt")
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--repeat", type=int, default=3, help="runs of each pass (the best counts)")
    args = ap.parse_args()
    if not args.file.exists():
        ap.error(f"{args.file} does not exist (bench_audit.py generates it)")
    passes = [("touch", touch), ("read-all", read_all)]
    kernel = statkernel.load()
    if kernel is not None:
        passes.append((f"compiled kernel ({kernel.isa})", lambda p, t: compiled_kernel(kernel, p, t)))
    else:
        print(f"{statkernel.LIBRARY.name} is not built (pip install -e .): compiled kernel skipped")
    passes.append(("numpy kernels", numpy_kernel))
    read_all(args.file, 1)  # page cache warm
    gb = args.file.stat().st_size / 1e9
    print(f"{args.file.name}: {gb:.2f} GB, {os.cpu_count()} CPUs, best of {args.repeat}")
    for name, fn in passes:
        cells = []
        for threads in sorted({1, args.threads}):
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                fn(args.file, threads)
                best = min(best, time.perf_counter() - t0)
            cells.append(f"{threads} thread(s) {best:.3f} s ({gb / best:.1f} GB/s)")
        print(f"  {name:26s} " + "   ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
