"""The metadata path stays light: no torch, no textual, unless a command needs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
HEAVY = ("torch", "textual", "numpy", "safetensors")


def modules_after(code: str) -> set[str]:
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_package_is_light():
    loaded = modules_after("import modelscope_tui")
    assert not [m for m in HEAVY if m in loaded]


CORE = [
    "modelscope_tui.checkpoint",
    "modelscope_tui.errors",
    "modelscope_tui.summary",
    "modelscope_tui.cli",
    "modelscope_tui.readers",
    "modelscope_tui.readers.unpickler",
    "modelscope_tui.readers.torchzip",
    "modelscope_tui.readers.legacy",
    "modelscope_tui.readers.walk",
    "modelscope_tui.gpu",
    "modelscope_tui.session",
    "modelscope_tui.freeze",
    "modelscope_tui.estimate",
    "modelscope_tui.placement",
    "modelscope_tui.writers",
    "modelscope_tui.convert",
    "modelscope_tui.devicemap",
]


@pytest.mark.parametrize("module", CORE)
def test_core_modules_never_import_textual(module):
    loaded = modules_after(f"import {module}")
    assert "textual" not in loaded and "torch" not in loaded


@pytest.mark.parametrize(
    "sample",
    ["transformer_tied.pt", "legacy_cnn.pt", "scripted_cnn.pt", "gone_module_full.pt", "lightning.ckpt"],
)
def test_summary_does_not_import_torch(sample):
    code = (
        "import io, contextlib\n"
        "from modelscope_tui.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        f"    assert main(['summary', {str(SAMPLES / sample)!r}, '--json']) == 0\n"
        f"    assert main(['summary', {str(SAMPLES / sample)!r}]) == 0\n"
    )
    loaded = modules_after(code)
    assert not [m for m in HEAVY if m in loaded]
