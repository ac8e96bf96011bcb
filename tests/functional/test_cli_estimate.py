"""`mscope estimate`: the fine-tune memory table from the CLI, with and without a freeze plan."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"


def mscope(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelscope_tui", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_table_fits_80_columns_and_plan_halves_training_state(tmp_path):
    full = mscope("estimate", str(SAMPLES / "transformer_tied.pt"), "--precision", "fp32", "--optimizer", "adamw")
    assert full.returncode == 0, full.stderr
    assert "total" in full.stdout and "348,160 B" in full.stdout  # 21,760 params x 16 bytes
    table = mscope("estimate", str(SAMPLES / "transformer_tied.pt"), "--free", "1GiB")
    assert table.returncode == 0 and max(len(line) for line in table.stdout.splitlines()) <= 80
    plan = tmp_path / "plan.json"
    made = mscope("plan", str(SAMPLES / "transformer_tied.pt"), "--freeze", "*", "-o", str(plan))
    assert made.returncode == 0, made.stderr
    frozen = mscope(
        "estimate", str(SAMPLES / "transformer_tied.pt"), "--plan", str(plan), "--precision", "fp32", "--optimizer", "adamw"
    )
    assert frozen.returncode == 0, frozen.stderr
    assert "87,040 B" in frozen.stdout.split("total", 1)[1].splitlines()[0]  # weights only


def test_bad_precision_is_one_line():
    result = mscope("estimate", str(SAMPLES / "cnn_state_dict.pt"), "--precision", "fp3")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "unknown precision" in result.stderr
    assert result.stdout == ""  # nothing printed before the error (the totals line was)


def test_plan_and_estimate_show_one_frozen_norm_layer(tmp_path):
    """The totals line of plan and estimate after freezing one BatchNorm of 1,610 parameters:
    compact counts would read `1.6K / 1.6K` for both, so the counts are exact."""
    plan = tmp_path / "plan.json"
    made = mscope("plan", str(SAMPLES / "train_checkpoint.pt"), "--freeze", "features.1.*", "-o", str(plan))
    assert made.returncode == 0, made.stderr
    assert "trainable 1,594 / 1,610 (99.0%)" in made.stdout
    est = mscope("estimate", str(SAMPLES / "train_checkpoint.pt"), "--plan", str(plan))
    assert est.returncode == 0, est.stderr
    assert "trainable 1,594 / 1,610 (99.0%)" in est.stdout.splitlines()
