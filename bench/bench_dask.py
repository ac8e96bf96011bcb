#!/usr/bin/env python
"""Benchmark ``mscope audit --stats --json`` locally against ``--dask`` on two local workers.

    python bench/bench_dask.py [--workdir DIR] [--mb 200] [--repeat 3] [--workers 2]

Input (generated on first use into ``--workdir``, default ``bench/_data/``): a two-shard
safetensors set of about ``--mb`` MB (fp16, bf16 and fp32 tensors of 2-32 MB each, as in a
transformer). A ``dask scheduler`` and ``--workers`` ``dask worker`` processes (one thread
each) start on free local ports and stop at the end.

Timed: whole CLI processes (interpreter start, imports, connecting to the scheduler included),
warm page cache, the median of ``--repeat`` runs after one unmeasured run each:

  local   mscope audit --stats --json DIR --threads W   (W = --workers: the same cores)
  dask    mscope audit --stats --json DIR --dask tcp://127.0.0.1:PORT

The two reports' statistics must be equal (checked on every run). On one machine, the Dask run
measures the overhead of the cluster (task round trips, the workers' own opens of the
checkpoint), not a speed-up: the point of --dask is more machines, each near its storage.
This is a benchmark, not a test: it always exits 0 unless arguments are bad.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
SRC = BENCH_DIR.parent / "src"

MAKE = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
out, mb = Path(sys.argv[1]), float(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
g = torch.Generator().manual_seed(0)
sd, total, i = {}, 0, 0
dtypes = [torch.float16, torch.bfloat16, torch.float32]
while total < mb * 2**20:
    rows = [512, 1024, 2048, 4096][i % 4]
    t = (torch.randn(rows, 2048, generator=g) * 0.02).to(dtypes[i % 3])
    sd[f"layers.{i}.weight"] = t
    total += t.numel() * t.element_size()
    i += 1
names = list(sd)
shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
weight_map = {}
for file, keys in shards.items():
    save_file({k: sd[k] for k in keys}, out / file)
    weight_map.update({k: file for k in keys})
(out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
print(total)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{path}" if path else str(SRC)}


def timed(argv: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env())
    seconds = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        sys.exit(f"bench_dask: {' '.join(argv)} failed: {proc.stderr.strip()}")
    return seconds, proc.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--workdir", type=Path, default=BENCH_DIR / "_data")
    ap.add_argument("--mb", type=float, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    data = args.workdir / f"dask_shards_{int(args.mb)}mb"
    if not (data / "model.safetensors.index.json").exists():
        subprocess.run([sys.executable, "-c", MAKE, str(data), str(args.mb)], check=True, env=env())
    size = sum(p.stat().st_size for p in data.glob("*.safetensors"))
    for p in data.glob("*.safetensors"):  # warm the page cache
        with open(p, "rb") as fh:
            while fh.read(16 << 20):
                pass

    dask = Path(sys.executable).with_name("dask")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = []
    log = open(args.workdir / "bench_dask.log", "wb")
    try:
        procs.append(subprocess.Popen([str(dask), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                       "--no-dashboard"], stdout=log, stderr=log, env=env(), start_new_session=True))
        for i in range(args.workers):
            procs.append(subprocess.Popen([str(dask), "worker", address, "--nthreads", "1", "--no-dashboard",
                                           "--name", f"bench{i}"], stdout=log, stderr=log, env=env(),
                                          start_new_session=True))  # fmt: skip
        from distributed import Client

        with Client(address, timeout=30, set_as_default=False) as client:
            client.wait_for_workers(args.workers, timeout=60)

        mscope = [sys.executable, "-m", "modelscope_tui", "audit", "--stats", "--json", str(data)]
        runs = {
            "local": mscope + ["--threads", str(args.workers)],
            "dask": mscope + ["--dask", address],
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        reference = None
        for _ in range(args.repeat + 1):
            for name, argv in runs.items():
                seconds, out = timed(argv)
                stats = json.loads(out)["stats"]["tensors"]
                reference = reference or stats
                if stats != reference:
                    sys.exit("bench_dask: the --dask statistics differ from the local ones")
                times[name].append(seconds)
        print(f"audit --stats of {size / 2**20:.0f} MB in 2 shards, {len(reference)} tensors; "
              f"{args.workers} worker(s) x 1 thread vs --threads {args.workers}; median of {args.repeat}")  # fmt: skip
        for name, ts in times.items():
            med = statistics.median(ts[1:])
            print(f"  {name:6s} {med:6.2f} s  {size / 2**20 / med:7.0f} MB/s   (runs: {', '.join(f'{t:.2f}' for t in ts[1:])})")
    finally:
        for p in procs[::-1]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs[::-1]:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
