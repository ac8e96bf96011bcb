#!/usr/bin/env python
"""Small hostile files against issue #12's targets: summary, audit --stats and diff (and
audit --crc for deflated members) under 5 s and 500 MB RSS for any file under 10 MB.

    PYTHONPATH=src python bench/bench_hostile_sizes.py [--only SUBSTRING ...] [--workdir DIR]

Files are built by tests/hostile (craft.py and the test modules' spellings) into --workdir
(default: a temporary directory). Each command is a child process: wall time around it and
the child's peak RSS from os.wait4. This is a benchmark, not a test: it always exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "hostile"))


def build(d: Path) -> dict[str, Path]:
    from craft import (
        EMPTY_DICT,
        MARK,
        PROTO2,
        SETITEMS,
        STOP,
        state_pickle,
        storage,
        tensor,
        torch_zip,
        uni,
    )
    from test_hash_flood import SPELLINGS as FLOODS
    from test_inflate import OVER_BUDGET, _torch, _torchscript
    from test_names import SPELLINGS as NAMES

    files = {}
    for name in ("honest size", "declares 1 KB", "zip64 declares 1 TB"):
        pkl, opts = OVER_BUDGET[name]
        files[f"deflated data.pkl ({name})"] = _torch(d / f"deflate-{name.replace(' ', '-')}.pt", pkl, opts)
    code = [(f"m/code/__torch__/f{i}.py", b"#" * (6 << 20), {"method": 8}) for i in range(80)]
    files["torchscript 80 x 6 MB deflated code"] = _torchscript(d / "deflate-code.pt", code)
    for name in ("setitems ints", "tuple2 of ints", "frozenset members"):
        files[f"hash flood ({name})"] = torch_zip(d / f"flood-{name.replace(' ', '-')}.pt", FLOODS[name], {})
    # the issue's own sample: 100k colliding int keys
    from test_hash_flood import P, _pairs, integer

    keys = [integer(k * P) for k in range(1, 100_001)]
    files["hash flood 100k ints"] = torch_zip(
        d / "flood-100k.pt", PROTO2 + EMPTY_DICT + MARK + _pairs(keys) + SETITEMS + STOP, {}
    )
    for name in ("dots", "dots and length"):
        files[f"names ({name})"] = torch_zip(d / f"names-{name.replace(' ', '-')}.pt", state_pickle(NAMES[name]()), {"0": bytes(16)})
    for n in (100_000, 500_000):
        items = b"".join(uni(f"t{i}") + tensor(storage(str(i % 4), 4), 0, (4,), (1,)) for i in range(n))
        files[f"flat state dict {n:,}"] = torch_zip(
            d / f"flat-{n}.pt", PROTO2 + EMPTY_DICT + MARK + items + SETITEMS + STOP, {str(k): bytes(16) for k in range(4)}
        )
    return files


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    d = Path(ns.workdir or tempfile.mkdtemp(prefix="mscope-hostile-"))
    d.mkdir(parents=True, exist_ok=True)
    if ns.build_only:
        (d / "index.json").write_text(json.dumps({k: str(v) for k, v in build(d).items()}))
        return 0
    # Built in a child: a child's ru_maxrss starts at its parent's peak (see bench_summary.py).
    subprocess.run([sys.executable, __file__, "--build-only", "--workdir", str(d)], check=True)
    files = {k: Path(v) for k, v in json.loads((d / "index.json").read_text()).items()}
    print(f"{'file':42} {'size':>9}  {'command':14} {'s':>6} {'MB':>6}  rc  last line")
    for name, path in files.items():
        if ns.only and not any(o in name for o in ns.only):
            continue
        commands = [["summary"], ["audit", "--stats"], ["diff"]]
        if name.startswith(("deflated", "torchscript")):
            commands.append(["audit", "--crc"])
        for cmd in commands:
            argv = [*cmd, str(path)] + ([str(path)] if cmd == ["diff"] else [])
            wall, rss, rc, last = run_child(argv)
            print(f"{name:42} {path.stat().st_size:>9,}  {' '.join(cmd):14} {wall:6.2f} {rss / 1024:6.0f}  {rc:>2}  {last}")
    return 0


def run_child(argv: list[str]) -> tuple[float, int, int, str]:
    """wait4 gives the child's own peak RSS (KiB)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NO_COLOR": "1"}
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen([sys.executable, "-m", "modelscope_tui", *argv], stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        text = out.read().decode("utf-8", "replace").strip().splitlines()
    rc = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss, rc, (text[-1] if text else "")[:110]


if __name__ == "__main__":
    sys.exit(main())
