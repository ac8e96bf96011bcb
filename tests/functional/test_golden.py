"""Every command's output for every sample, byte for byte (scripts/golden.py). A refactor must
leave these alone; an intended change rewrites them with `python scripts/golden.py --write
tests/golden` and shows up in review as a diff of plain text."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_outputs_match_the_golden_files():
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "golden.py"), "--check", str(ROOT / "tests" / "golden")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
