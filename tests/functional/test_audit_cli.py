"""`mscope audit --stats` text as a user runs it, at 80 and at 200 columns: optimizer state named
by its parameter, names shortened only when the terminal is too narrow, and never into twins."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_models"
TRAIN = SAMPLES / "train_checkpoint.pt"
NUMBER = r"-?\d[\d.e+-]*%?|-"  # a statistics cell


def mscope(*args: str, columns: int) -> subprocess.CompletedProcess:
    # this tree's sources, whichever checkout the environment installed
    env = {"COLUMNS": str(columns), "PATH": "/usr/bin:/bin", "TERM": "dumb", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "modelscope_tui", *args], capture_output=True, text=True, timeout=60, env=env
    )


def stat_names(stdout: str) -> list[str]:
    """The tensor column of the statistics table: each row's text before its six numbers."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("tensor "))
    names = []
    for line in lines[start + 1 :]:
        m = re.match(rf"^(.+?)\s+(?:(?:{NUMBER})\s+){{5}}(?:{NUMBER})$", line)
        if not m:
            break
        names.append(m.group(1))
    return names


def resolved(names: list[str]) -> list[str]:
    """Rows as full names: a hanging `  ├ exp_avg` is the state of the parameter named by the
    nearest full row above it (`features.3.weight`, or `features.3.bias · exp_avg`)."""
    out, owner = [], None
    for name in names:
        hanging = re.match(r"^  [├└] (\S+)$", name)
        if hanging:
            assert owner is not None, names
            out.append(f"{owner} · {hanging.group(1)}")
        else:
            owner = name.split(" · ")[0]
            out.append(name)
    return out


def model_parameter_order(path: Path) -> list[str]:
    """What the optimizer's indices stand for: the model's parameters in state-dict order
    (torch.load of our own sample: a plain state dict, no code)."""
    ckpt = torch.load(path, weights_only=True)
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return [k for k in ckpt["model"] if not k.endswith(buffers)]


def test_optimizer_state_is_named_by_its_parameter_at_200_columns():
    result = mscope("audit", "--stats", "--all-stats", str(TRAIN), columns=200)
    assert result.returncode == 0, result.stderr
    rows = stat_names(result.stdout)
    names = resolved(rows)
    assert len(names) == 46  # every tensor: --all-stats
    assert "  ├ exp_avg" in rows and "  └ exp_avg_sq" in rows  # state right under its parameter hangs there
    params = model_parameter_order(TRAIN)
    ckpt = torch.load(TRAIN, weights_only=True)
    for index, state in ckpt["optimizer"]["state"].items():
        for key in state:
            assert f"{params[index]} · {key}" in names, (index, key)
    assert not any("state." in n or "…" in n for n in names)  # nothing shortened, nothing raw
    assert "features.3.weight · exp_avg" in names
    assert max(len(line) for line in result.stdout.splitlines()) <= 200


def test_shortened_names_stay_distinct_at_80_columns():
    for extra in ((), ("--all-stats",)):
        result = mscope("audit", "--stats", *extra, str(TRAIN), columns=80)
        assert result.returncode == 0, result.stderr
        assert max(len(line) for line in result.stdout.splitlines()) <= 80
        names = resolved(stat_names(result.stdout))
        assert names and len(set(names)) == len(names), names
        if not extra:  # the ten largest: hanging under its parameter, no name needs a cut
            assert "features.3.weight · exp_avg_sq" in names and not any("…" in n for n in names), names
    assert "10 of 46 tensors shown" in mscope("audit", "--stats", str(TRAIN), columns=80).stdout


def test_raw_names_stay_when_the_optimizer_cannot_be_mapped(tmp_path):
    """An optimizer over only some of the parameters (a filtered list): index 0 is not the
    model's first parameter, so the state keeps its own name."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(model[1].parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    path = tmp_path / "partial.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    names = stat_names(mscope("audit", "--stats", "--all-stats", str(path), columns=200).stdout)
    assert "optimizer/state.0.exp_avg" in names
    assert not any(" · " in n for n in names)
