#!/usr/bin/env python
"""Benchmark ``mscope summary`` of files behind a URL: requests, bytes and wall time over the
counting range server of the tests (tests/rangeserver.py) at 0 and 50 ms per request, and
``audit --stats`` throughput over HTTP and from moto's S3 against the local file.

    python bench/bench_remote.py [--only NAME ...] [--workdir DIR] [--latency MS ...] [--no-s3]
                                 [--audit-mb N]

Inputs are the ones bench_summary.py builds (``bench/_data/``, gitignored, generated on first
use by _make_bench_data.py): the 1.3B ``.pt`` and ``.safetensors`` (~2.6 GB each) and the
100k-tensor state dict. ``--audit-mb`` sizes the file of the audit throughput run (default 256).

Every run is a child process (interpreter start and imports included) with ``--no-cache``, so
each one fetches what a first open fetches. The fetch budget of one file's summary: at most 8
requests and 1.25x its metadata + 2 MiB; the table prints both and the verdict.

This is a benchmark, not a test: it always exits 0 unless arguments are bad.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "tests"))

from rangeserver import RangeServer  # noqa: E402

FILES = ["gpt_1p3b_fp16.pt", "gpt_1p3b_fp16.safetensors", "state_dict_100k.pt", "sharded_30"]
MiB = 1 << 20


def make_sharded_30(folder: Path) -> None:
    """30 safetensors shards (a 70B model's count) of a few tensors each, and their index."""
    code = (
        "import json, sys, torch; from pathlib import Path; from safetensors.torch import save_file\n"
        "d = Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True); wm = {}\n"
        "for i in range(30):\n"
        "    name = f'model-{i + 1:05d}-of-00030.safetensors'\n"
        "    t = {f'model.layers.{i}.{k}.weight': torch.zeros(256, 256, dtype=torch.bfloat16) for k in ('q', 'k', 'v', 'o')}\n"
        "    save_file(t, str(d / name)); wm.update({k: name for k in t})\n"
        "(d / 'model.safetensors.index.json').write_text(json.dumps({'metadata': {}, 'weight_map': wm}))\n"
    )
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True)


def ensure(workdir: Path, name: str) -> Path:
    path = workdir / name
    if name == "sharded_30":
        if not (path / "model.safetensors.index.json").exists():
            make_sharded_30(path)
        return path / "model.safetensors.index.json"
    if not path.exists():
        print(f"generating {name} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, str(BENCH / "_make_bench_data.py"), name, str(path)], check=True)
    return path


def metadata_bytes(path: Path) -> int:
    if path.name.endswith(".index.json"):
        shards = set(json.loads(path.read_text())["weight_map"].values())
        return path.stat().st_size + sum(metadata_bytes(path.parent / s) for s in shards)
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            directory = sum(46 + len(i.filename.encode()) + len(i.extra) + len(i.comment) for i in infos)
            return directory + sum(i.file_size for i in infos if i.filename.endswith("data.pkl"))
    return 8 + struct.unpack("<Q", head[:8])[0]


def mscope(*args: str, env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "modelscope_tui", *args, "--no-cache"], capture_output=True, text=True, env=env)
    return time.perf_counter() - t0, proc


def bench_summary(workdir: Path, names: list[str], latencies: list[float]) -> None:
    print(f"{'file':28} {'latency':>7} {'requests':>8} {'fetched':>11} {'metadata':>11} {'budget':>6} {'wall s':>7}")
    for name in names:
        path = ensure(workdir, name)
        meta = metadata_bytes(path)
        rel = path.relative_to(workdir).as_posix()
        shards = len(set(json.loads(path.read_text())["weight_map"].values())) if rel.endswith(".json") else 1
        local_s, proc = mscope("summary", "--json", str(path))
        print(f"{name:28} {'local':>7} {'':>8} {'':>11} {meta:>11,} {'':>6} {local_s:7.2f}")
        for ms in latencies:
            srv = RangeServer(workdir)
            srv.latency = ms / 1000
            try:
                wall, proc = mscope("summary", "--json", f"{srv.url}/{rel}")
            finally:
                srv.close()
            ok = proc.returncode == 0 and json.loads(proc.stdout)["totals"]["tensors"] > 0
            # the budget is per file: a set of N files may make 8 requests and fetch 2 MiB extra each
            within = srv.requests <= 8 * shards and srv.bytes <= 1.25 * meta + 2 * MiB * shards
            verdict = ("ok" if within else "OVER") if ok else "FAIL"
            print(f"{name:28} {ms:5g}ms {srv.requests:>8} {srv.bytes:>11,} {meta:>11,} {verdict:>6} {wall:7.2f}")


def make_audit_file(workdir: Path, mb: int) -> Path:
    path = workdir / f"audit_{mb}mb.safetensors"
    if not path.exists():
        code = (
            "import sys, torch; from safetensors.torch import save_file\n"
            f"n = {mb} * (1 << 20) // 2 // 64\n"
            "save_file({f'layers.{i}.weight': torch.randn(n // 1024, 1024, dtype=torch.float16) for i in range(64)}, sys.argv[1])\n"
        )
        subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_audit(workdir: Path, mb: int, s3: bool) -> None:
    path = make_audit_file(workdir, mb)
    size = path.stat().st_size
    rows = []
    wall, proc = mscope("audit", "--stats", "--json", str(path))
    rows.append(("local (mmap)", wall, proc.returncode))
    srv = RangeServer(workdir)
    try:
        wall, proc = mscope("audit", "--stats", "--json", f"{srv.url}/{path.name}")
        rows.append((f"http ({srv.requests} requests)", wall, proc.returncode))
    finally:
        srv.close()
    if s3:
        try:
            import boto3
            from moto.server import ThreadedMotoServer
        except ImportError:
            print("moto/boto3 not installed: S3 row skipped", file=sys.stderr)
        else:
            import logging

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
            port = free_port()
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()
            env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                   "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
            try:
                client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                                      aws_access_key_id="bench", aws_secret_access_key="bench")  # fmt: skip
                client.create_bucket(Bucket="bench")
                client.upload_file(str(path), "bench", path.name)
                wall, proc = mscope("audit", "--stats", "--json", f"s3://bench/{path.name}", env=env)
                rows.append(("moto s3", wall, proc.returncode))
            finally:
                server.stop()
    print(f"\naudit --stats of {path.name} ({size / MiB:.0f} MiB, 64 tensors)")
    for what, wall, code in rows:
        status = "ok" if code in (0, 1) else f"exit {code}"
        print(f"  {what:28} {wall:7.2f} s  {size / MiB / wall:8.1f} MiB/s  {status}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=BENCH / "_data")
    ap.add_argument("--only", nargs="*", choices=FILES, default=None)
    ap.add_argument("--latency", nargs="*", type=float, default=[0, 50], metavar="MS")
    ap.add_argument("--audit-mb", type=int, default=256)
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--no-audit", action="store_true")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    bench_summary(args.workdir, args.only if args.only is not None else FILES, args.latency)
    if not args.no_audit:
        bench_audit(args.workdir, args.audit_mb, not args.no_s3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
