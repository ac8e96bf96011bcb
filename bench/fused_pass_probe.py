#!/usr/bin/env python
"""How close can any statistics pass get to the page-touch floor on this machine?

    python bench/fused_pass_probe.py [FILE] [--threads N] [--repeat N]

Not part of mscope: a probe for the bound behind bench_audit.py's "<= 1.5x the floor" target.
In one process, with FILE (default bench/_data/gpt_1p3b_fp16.pt) in the page cache, it times
passes over the whole file mapped read-only, 2 MB at a time, each on a fresh mapping (so each
pays the page faults, as a real run does):

  touch       one byte of every 4 KiB page (what bench_audit.py's floor does after start-up)
  read-all    numpy max over uint64 words: every byte read, the cheapest numpy pass there is
  fused C     one compiled loop computing what audit's fp16 kernel computes (sum and sum of
              squares in float32 rows, min, max, zeros, non-finite) with F16C/AVX2 where the
              compiler and CPU have them; built with `cc` into a temp dir (skipped without one)
  mscope      audit's numpy chunk kernel (`_chunk_part`, what `mscope audit --stats` runs)

each with 1 thread and with N (default: audit.default_threads()). Whole-process costs (Python
start, imports, parsing) come on top of every line; bench_audit.py measures those.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "src"))
from modelscope_tui import audit  # noqa: E402

CHUNK = 2 << 20

C_SOURCE = r"""
#include <stdint.h>
#include <stddef.h>
#if defined(__F16C__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
/* out: sum, sumsq, min, max, zeros, non-finite (fp16 values; rows of 2048 in float32) */
void stats_f16(const uint16_t *p, size_t n, double *out) {
    double S = 0, Q = 0, zeros = 0, nonfin = 0;
    float mn = 1e30f, mx = -1e30f;
    size_t i = 0;
#if defined(__F16C__) && defined(__AVX2__) && defined(__FMA__)
    __m256 vmin = _mm256_set1_ps(1e30f), vmax = _mm256_set1_ps(-1e30f);
    const __m256i magmask = _mm256_set1_epi16(0x7fff), infpat = _mm256_set1_epi16(0x7bff);
    while (i + 16 <= n) {
        size_t end = i + 2048 <= n ? i + 2048 : n - (n - i) % 16;
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, q0 = s0, q1 = s0;
        __m256i z = _mm256_setzero_si256(), nf = z;
        for (; i < end; i += 16) {
            __m128i a = _mm_loadu_si128((const __m128i *)(p + i));
            __m128i b = _mm_loadu_si128((const __m128i *)(p + i + 8));
            __m256 x = _mm256_cvtph_ps(a), y = _mm256_cvtph_ps(b);
            s0 = _mm256_add_ps(s0, x); s1 = _mm256_add_ps(s1, y);
            q0 = _mm256_fmadd_ps(x, x, q0); q1 = _mm256_fmadd_ps(y, y, q1);
            vmin = _mm256_min_ps(vmin, _mm256_min_ps(x, y));
            vmax = _mm256_max_ps(vmax, _mm256_max_ps(x, y));
            __m256i mag = _mm256_and_si256(_mm256_set_m128i(b, a), magmask);
            z = _mm256_sub_epi16(z, _mm256_cmpeq_epi16(mag, _mm256_setzero_si256()));
            nf = _mm256_sub_epi16(nf, _mm256_cmpgt_epi16(mag, infpat));
        }
        float t[8]; int16_t c[16];
        _mm256_storeu_ps(t, _mm256_add_ps(s0, s1)); for (int k = 0; k < 8; k++) S += t[k];
        _mm256_storeu_ps(t, _mm256_add_ps(q0, q1)); for (int k = 0; k < 8; k++) Q += t[k];
        _mm256_storeu_si256((__m256i *)c, z); for (int k = 0; k < 16; k++) zeros += (uint16_t)c[k];
        _mm256_storeu_si256((__m256i *)c, nf); for (int k = 0; k < 16; k++) nonfin += (uint16_t)c[k];
    }
    float a[8], b[8];
    _mm256_storeu_ps(a, vmin); _mm256_storeu_ps(b, vmax);
    for (int k = 0; k < 8; k++) { if (a[k] < mn) mn = a[k]; if (b[k] > mx) mx = b[k]; }
#endif
    for (; i < n; i++) {  /* scalar tail (or the whole pass without F16C) */
        uint16_t h = p[i], e = (h >> 10) & 31, m = h & 1023;
        float v = e == 0 ? m * (1.0f / 16777216.0f)
                         : (float)(1024 + m) * (e >= 25 ? (float)(1u << (e - 25)) : 1.0f / (float)(1u << (25 - e)));
        if (h & 0x8000) v = -v;
        if (e == 31) { nonfin++; continue; }
        zeros += (h & 0x7fff) == 0;
        S += v; Q += (double)v * v;
        if (v < mn) mn = v;
        if (v > mx) mx = v;
    }
    out[0] = S; out[1] = Q; out[2] = mn; out[3] = mx; out[4] = zeros; out[5] = nonfin;
}
"""


def build(workdir: str) -> ctypes.CDLL | None:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    src = Path(workdir, "probe.c")
    src.write_text(C_SOURCE)
    lib = Path(workdir, "probe.so")
    for flags in (["-mavx2", "-mf16c", "-mfma"], []):
        r = subprocess.run(
            [cc, "-O3", *flags, "-shared", "-fPIC", "-o", str(lib), str(src)], capture_output=True
        )
        if r.returncode == 0:
            dll = ctypes.CDLL(str(lib))
            dll.stats_f16.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            return dll
    return None


def check_fused(lib: ctypes.CDLL) -> None:
    """The fused loop computes the same numbers as audit's kernel (else the timing means nothing)."""
    x = (np.random.default_rng(0).standard_normal(1_000_003) * 0.02).astype(np.float16)
    x[::1000] = 0
    out = np.zeros(8)
    lib.stats_f16(x.ctypes.data, x.size, out.ctypes.data)
    part = audit._chunk_part(x.view(np.int16), "f16")
    mean = out[0] / x.size
    assert abs(mean - part.mean) <= 1e-6 * (abs(part.mean) + 1e-3), (mean, part.mean)
    assert abs(out[1] - part.sumsq) <= 1e-6 * part.sumsq, (out[1], part.sumsq)
    assert (out[2], out[3], int(out[4]), int(out[5])) == (part.mn, part.mx, part.zeros, 0), out


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


def fused(lib: ctypes.CDLL, path: Path, threads: int) -> None:
    a = mapped(path)
    size = a.size // 2 * 2
    base = a.ctypes.data
    outs = [np.zeros(8) for _ in range(threads)]

    def work(i: int) -> None:
        s = i * CHUNK
        lib.stats_f16(base + s, (min(size, s + CHUNK) - s) // 2, outs[i % threads].ctypes.data)

    run_threads(threads, -(-size // CHUNK), work)


def numpy_kernel(path: Path, threads: int) -> None:
    a = mapped(path)
    size = a.size // 2 * 2
    run_threads(
        threads,
        -(-size // CHUNK),
        lambda i: audit._chunk_part(
            a[i * CHUNK : min(size, (i + 1) * CHUNK)].view(np.int16), "f16"
        ),
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", nargs="?", type=Path, default=BENCH_DIR / "_data" / "gpt_1p3b_fp16.pt")
    ap.add_argument("--threads", type=int, default=audit.default_threads())
    ap.add_argument("--repeat", type=int, default=3, help="runs of each pass (the best counts)")
    args = ap.parse_args()
    if not args.file.exists():
        ap.error(f"{args.file} does not exist (bench_audit.py generates it)")
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(tmp)
        passes = [("touch", touch), ("read-all", read_all)]
        if lib is not None:
            check_fused(lib)
            passes.append(("fused C", lambda p, t: fused(lib, p, t)))
        else:
            print("no C compiler: the fused pass is skipped")
        passes.append(("mscope numpy kernel", numpy_kernel))
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
            print(f"  {name:20s} " + "   ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
