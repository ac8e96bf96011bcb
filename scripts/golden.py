#!/usr/bin/env python3
"""Golden outputs: what every command prints for every sample, to prove a refactor changed nothing.

    python scripts/golden.py --write tests/golden     # record (after an intended change)
    python scripts/golden.py --check tests/golden     # compare; exit 1 and a unified diff if not

Commands: `summary` (text at 100 columns, and --json), `audit --stats --json`, `estimate`,
`plan` and `apply-plan` for a fixed rule, `diff --json` of two pairs, and `gpus --json` with two
simulated GPUs. Outputs are normalised only where they hold live data: timings, the machine's
host RAM, temp paths and the sample directory. tests/functional/test_golden.py runs --check.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
CHECKPOINTS = sorted(
    p.name for p in SAMPLES.iterdir() if p.suffix in (".pt", ".ckpt", ".safetensors", ".gguf") or p.is_dir()
)
PAIRS = [
    ("transformer_tied.pt", "transformer.safetensors"),
    ("cnn_state_dict.pt", "legacy_cnn.pt"),
    ("llama_tiny.safetensors", "llama_tiny.gguf"),  # through llama.cpp's naming map
]

_LIVE = [
    (re.compile(r'"(seconds|elapsed|elapsed_s|wall_s|timestamp|duration|sample_seconds)": ?[0-9.e+-]+'), r'"\1":0'),
    (re.compile(r"\b\d+(\.\d+)? ?(ms|s)\b(?= |$|\)|,)"), "<time>"),
    (re.compile(r'"host": ?\{[^}]*\}'), '"host":{}'),  # host RAM in gpus --json
    (re.compile(r'"pid": ?\d+(,"name": ?"SIMULATED python","used_memory": ?\d+,"is_self": ?true)'), r'"pid":0\1'),
    (re.compile(r"host RAM: [^;]*; this process [^\n]*"), "host RAM: <live>"),
    (re.compile(r'"created": "[0-9T:Z-]+"'), '"created": "<when>"'),
    (re.compile(r"(plan created |# created )[0-9T:Z-]+"), r"\1<when>"),
]


def normalise(text: str, tmp: str) -> str:
    text = text.replace(str(SAMPLES), "<samples>").replace(tmp, "<tmp>")
    for pattern, repl in _LIVE:
        text = pattern.sub(repl, text)
    return text


def run(args: list[str], tmp: str) -> str:
    env = {**os.environ, "COLUMNS": "100", "MSCOPE_SIMULATE_GPUS": "2", "NO_COLOR": "1", "TERM": "dumb"}
    env.pop("MSCOPE_SIMULATE_GPU_LOST", None)
    proc = subprocess.run(
        [sys.executable, "-m", "modelscope_tui", *args],
        capture_output=True, text=True, env=env, cwd=tmp, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return normalise(f"$ mscope {' '.join(args)}\nexit {proc.returncode}\n{proc.stdout}{proc.stderr}", tmp)


def outputs() -> dict[str, str]:
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in CHECKPOINTS:
            path = str(SAMPLES / name)
            out[f"summary/{name}.txt"] = run(["summary", path], tmp)
            out[f"summary-json/{name}.txt"] = run(["summary", "--json", path], tmp)
            out[f"audit/{name}.txt"] = run(["audit", "--stats", "--json", path], tmp)
            out[f"estimate/{name}.txt"] = run(["estimate", path], tmp)
        plan = str(Path(tmp) / "p.json")
        out["plan/transformer_tied.txt"] = run(
            ["plan", str(SAMPLES / "transformer_tied.pt"), "--freeze", "embed.*", "-o", plan], tmp
        )
        out["plan/transformer_tied.plan.txt"] = normalise(Path(plan).read_text(), tmp) if Path(plan).exists() else ""
        out["apply-plan/transformer_tied.txt"] = run(["apply-plan", plan], tmp)
        for a, b in PAIRS:
            out[f"diff/{a}--{b}.txt"] = run(["diff", "--json", str(SAMPLES / a), str(SAMPLES / b)], tmp)
        out["gpus/simulated.txt"] = run(["gpus", "--json"], tmp)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=Path)
    mode.add_argument("--check", type=Path)
    args = ap.parse_args()
    got = outputs()
    if args.write:
        for rel, text in got.items():
            path = args.write / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        print(f"wrote {len(got)} golden outputs to {args.write}")
        return 0
    bad = 0
    for rel, text in got.items():
        path = args.check / rel
        want = path.read_text() if path.exists() else ""
        if text != want:
            bad += 1
            lines = difflib.unified_diff(want.splitlines(), text.splitlines(), f"golden/{rel}", f"now/{rel}", n=1, lineterm="")
            for line in list(lines)[:12]:
                print(line if len(line) <= 240 else line[:240] + " …")
    extra = sorted(str(p.relative_to(args.check)) for p in args.check.rglob("*.txt") if str(p.relative_to(args.check)) not in got)
    for rel in extra:
        bad += 1
        print(f"golden/{rel}: no longer produced")
    print(json.dumps({"outputs": len(got), "differ": bad}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
