#!/usr/bin/env python3
"""Plain-text captures of the explorer's main screens at 80x24 and 200x50, as a user sees them.

    python scripts/screens.py docs/screens          # needs tmux; GPUs are simulated

Each screen runs `mscope` in a detached tmux session of that size, sends the keys a user would
press, and keeps `tmux capture-pane -p`. The captures are for reading (and for issue notes):
snapshot tests (tests/test_snapshots*.py) are what guards the layout.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = [(80, 24), (200, 50)]
DOWN = ["Down"]

# name -> (mscope arguments, keys at 80 columns, keys at 200 columns). At 80 columns the details
# pane starts hidden (d shows it); from 140 the GPU panel starts shown.
SCREENS = {
    "explorer-llama": (
        ["sample_models/llama_tiny.safetensors"],
        ["e", *DOWN * 25, "d"],  # model.layers.0.self_attn.q_proj.weight
        ["e", *DOWN * 25],
    ),
    "explorer-full-module-panes": (
        ["sample_models/notebook_full.pt"],
        ["Down", "Right", "Down", "Right", "Down", "d", "g"],  # both asked for: the tree decides
        ["Down", "Right", "Down", "Right", "Down"],
    ),
    "explorer-long-names": (
        ["{tmp}/long.safetensors"],
        ["e", "End", "d"],
        ["e", "End"],
    ),
    "diff": (
        ["diff", "{tmp}/before.pt", "{tmp}/after.safetensors"],
        ["e", "n", "n", "d"],
        ["e", "n", "n"],
    ),
    "help": (["sample_models/transformer_tied.pt"], ["?"], ["?"]),
}


def capture(args: list[str], keys: list[str], size: tuple[int, int], cwd: Path, env: dict[str, str]) -> str:
    name = f"mscope-screens-{uuid.uuid4().hex[:8]}"
    command = " ".join([sys.executable, "-m", "modelscope_tui", *args]) + "; sleep 60"
    width, height = size
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", str(width), "-y", str(height), "-c", str(cwd), command], check=True, env=env)
    try:
        time.sleep(4)  # start-up and the first paint
        for key in keys:
            subprocess.run(["tmux", "send-keys", "-t", name, key], check=True)
            time.sleep(0.3)
        time.sleep(2.5)  # workers (statistics, the comparison) finish
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", name], capture_output=True, text=True, check=True).stdout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], check=False)


def write_inputs(tmp: Path) -> None:
    """A diff pair (tests/diffpair.py) and siblings with long shared prefixes and suffixes."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tests"))
    from diffpair import write_pair

    write_pair(tmp)
    names = [
        "self_attention_in_proj_weight",
        "self_attention_in_proj_bias",
        "encoder_attention_layernorm_weight",
        "encoder_ffn_layernorm_weight",
        "batch_norm_running_mean",
        "batch_norm_running_var",
    ]
    save_file({f"model.encoder.layers.11.block.{n}": torch.zeros(3, 5) for n in names}, str(tmp / "long.safetensors"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", nargs="*", default=None, help="screen names (default: all)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TERM": "xterm-256color",
        "LANG": "C.UTF-8",
        "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHONPATH": str(ROOT / "src"),
        "MSCOPE_SIMULATE_GPUS": "2",
    }
    with tempfile.TemporaryDirectory() as tmp:
        write_inputs(Path(tmp))
        for screen, (argv, keys80, keys200) in SCREENS.items():
            if args.only and screen not in args.only:
                continue
            # files made here are opened by relative name from their folder, so no temp path shows
            cwd = Path(tmp) if any("{tmp}" in a for a in argv) else ROOT
            argv = [a.replace("{tmp}/", "") for a in argv]
            for size, keys in zip(SIZES, (keys80, keys200)):
                text = capture(argv, keys, size, cwd, env)
                path = args.out / f"{screen}-{size[0]}x{size[1]}.txt"
                path.write_text(f"$ mscope {' '.join(argv)}   (keys: {' '.join(keys)})\n{text}")
                print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
