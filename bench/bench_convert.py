#!/usr/bin/env python
"""Benchmark ``mscope convert`` of the 1.3B fp16 ``.pt`` to sharded safetensors.

    python bench/bench_convert.py [--workdir DIR] [--repeat N] [--shard-size 1GB] [--out DIR]

Three routes, each a whole child process (interpreter start and imports included):

  mscope  ``mscope convert gpt_1p3b_fp16.pt OUT --max-shard-size 1GB``
  torch   ``torch.load(mmap=True, weights_only=True)``, the tensors grouped into the same
          shards, ``safetensors.torch.save_file`` per shard, then an fsync of each
  cp      ``cp`` of the source file, then ``sync FILE`` (the disk floor for the same bytes)

All three make their output durable (mscope fsyncs every file before renaming it), so none
is timed against a page cache the others had to flush. Outputs go to ``--out`` (default: a
folder in ``--workdir``, on the same file system as the source) and are removed after each run,
followed by a global sync, so no run pays for writing back the previous one's pages.

Memory: the child's anonymous resident memory (``RssAnon`` in /proc/PID/status, sampled every
5 ms; file-backed pages of the mmap'ed source and page cache are not the program's) and its
``ru_maxrss`` (all resident pages, file-backed included). Targets: mscope <= 1.5x cp and <= 0.5x
torch (median time), peak RssAnon < 200 MB. The machine is shared: read medians, not single runs.

This is a benchmark, not a test: it always exits 0 unless arguments are bad.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
MAKE_DATA = BENCH_DIR / "_make_bench_data.py"
SOURCE = "gpt_1p3b_fp16.pt"

TORCH_ROUTE = """
import os, sys, torch
from safetensors.torch import save_file
src, out, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
sd = torch.load(src, mmap=True, weights_only=True)
groups, size = [[]], 0
for name, t in sd.items():
    n = t.numel() * t.element_size()
    if groups[-1] and size + n > limit:
        groups.append([]); size = 0
    groups[-1].append(name); size += n
for i, names in enumerate(groups):
    path = os.path.join(out, f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors")
    save_file({k: sd[k] for k in names}, path, metadata={"format": "pt"})
    fd = os.open(path, os.O_RDONLY); os.fsync(fd); os.close(fd)
"""


@dataclass
class Run:
    seconds: float
    anon_mb: float  # peak RssAnon, sampled
    maxrss_mb: float  # ru_maxrss
    returncode: int
    stderr: str = ""


def rss_anon_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def measure(cmd: list[str]) -> Run:
    """Run cmd to completion, sampling its anonymous memory; stdout to /dev/null."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
        )
        peak = 0
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, rss_anon_kib(proc.pid))
            time.sleep(0.005)
        elapsed = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    return Run(elapsed, peak / 1024, rusage.ru_maxrss / 1024, proc.returncode, stderr)


def ensure_data(workdir: Path) -> Path:
    path = workdir / SOURCE
    if not path.exists():
        print(f"generating {path} ...", flush=True)
        workdir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(MAKE_DATA), SOURCE, str(path)], check=True)
    return path


def parse_size(text: str) -> int:
    units = {
        "": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "KIB": 1 << 10,
        "MIB": 1 << 20,
        "GIB": 1 << 30,
    }
    digits = text.rstrip("BbIiKkMmGg ")
    return int(float(digits) * units[text[len(digits) :].strip().upper()])


def mscope_cmd() -> list[str]:
    script = Path(sys.executable).parent / "mscope"
    return [str(script)] if script.exists() else [sys.executable, "-m", "modelscope_tui"]


def clear(out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=BENCH_DIR / "_data")
    ap.add_argument("--out", type=Path, help="where outputs go (default: WORKDIR/convert-out)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--shard-size", default="1GB", help="shard size for both mscope and torch (1GB)"
    )
    ap.add_argument(
        "--verify", action="store_true", help="one more mscope run with --verify (unmeasured)"
    )
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    src = ensure_data(args.workdir.resolve())
    out = (args.out or args.workdir / "convert-out").resolve()
    limit = parse_size(args.shard_size)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(BENCH_DIR.parent / "src")],
        stdout=subprocess.DEVNULL,
        check=False,
    )
    routes = {
        "mscope": lambda: [
            *mscope_cmd(),
            "convert",
            str(src),
            str(out),
            "--max-shard-size",
            args.shard_size,
        ],
        "torch": lambda: [sys.executable, "-c", TORCH_ROUTE, str(src), str(out), str(limit)],
        "cp": lambda: [
            "/bin/sh",
            "-c",
            'cp "$0" "$1/model.bin" && sync "$1/model.bin"',
            str(src),
            str(out),
        ],
    }
    size = src.stat().st_size
    print(
        f"source: {src} ({size / 2**30:.2f} GiB), shards of {args.shard_size}, repeat {args.repeat}"
    )
    subprocess.run(
        ["cat", str(src)], stdout=subprocess.DEVNULL, check=False
    )  # warm the page cache once
    results: dict[str, list[Run]] = {k: [] for k in routes}
    for i in range(args.repeat):
        for name, cmd in routes.items():  # interleaved: noise from other users hits all three
            clear(out)
            if name != "mscope":
                out.mkdir(parents=True)
            os.sync()  # no run starts behind the previous one's dirty pages
            run = measure(cmd())
            results[name].append(run)
            state = (
                ""
                if run.returncode == 0
                else f" exit {run.returncode}: {run.stderr.strip()[-300:]}"
            )
            print(
                f"  #{i + 1} {name:6s} {run.seconds:7.2f} s  RssAnon {run.anon_mb:7.1f} MB  maxrss {run.maxrss_mb:7.1f} MB{state}",
                flush=True,
            )
    clear(out)
    if args.verify:
        run = measure([*routes["mscope"](), "--verify"])
        print(
            f"  mscope --verify: exit {run.returncode} in {run.seconds:.2f} s {run.stderr.strip()[-300:]}"
        )
        clear(out)
    med = {k: statistics.median(r.seconds for r in v) for k, v in results.items()}
    anon = max(r.anon_mb for r in results["mscope"])
    ok = all(r.returncode == 0 for v in results.values() for r in v)
    print()
    print("| route | median s | GB/s | peak RssAnon MB | max ru_maxrss MB |")
    print("|---|---|---|---|---|")
    for k, v in results.items():
        print(
            f"| {k} | {med[k]:.2f} | {size / med[k] / 1e9:.2f} | {max(r.anon_mb for r in v):.1f} | {max(r.maxrss_mb for r in v):.1f} |"
        )
    vs_cp, vs_torch = med["mscope"] / med["cp"], med["mscope"] / med["torch"]
    print()
    print(f"mscope / cp    = {vs_cp:.2f}x (target <= 1.5x): {'PASS' if vs_cp <= 1.5 else 'FAIL'}")
    print(
        f"mscope / torch = {vs_torch:.2f}x (target <= 0.5x): {'PASS' if vs_torch <= 0.5 else 'FAIL'}"
    )
    print(
        f"mscope peak RssAnon = {anon:.1f} MB (target < 200 MB): {'PASS' if anon < 200 else 'FAIL'}"
    )
    if not ok:
        print("some runs failed (see above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
