"""The metadata path stays light: no torch, no textual, unless a command needs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"
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
    "modelscope_tui.readers.pickle.unpickler",
    "modelscope_tui.readers.torchzip",
    "modelscope_tui.readers.legacy",
    "modelscope_tui.readers.walk",
    "modelscope_tui.gpu.monitor",
    "modelscope_tui.gpu.schema",
    "modelscope_tui.training.session",
    "modelscope_tui.training.plan",
    "modelscope_tui.training.fingerprint",
    "modelscope_tui.training.apply",
    "modelscope_tui.training.snippet",
    "modelscope_tui.training.estimate",
    "modelscope_tui.training.placement",
    "modelscope_tui.training.devicemap",
    "modelscope_tui.write.atomic",
    "modelscope_tui.write.requires_grad",
    "modelscope_tui.write.remap",
    "modelscope_tui.write.cast",
    "modelscope_tui.write.zipwriter",
]


@pytest.mark.parametrize("module", CORE)
def test_core_modules_never_import_textual(module):
    loaded = modules_after(f"import {module}")
    assert "textual" not in loaded and "torch" not in loaded


PACKAGE = Path(__file__).resolve().parents[2] / "src" / "modelscope_tui"
# Where Textual may be imported: the CLI (which starts the app) and the TUI package.
UI_MODULES = ("modelscope_tui.cli", "modelscope_tui.__main__")


def domain_modules() -> list[str]:
    """Every module of the package outside cli.py and tui/, found from the source files (a new
    module is covered without editing this list)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        if name in UI_MODULES or name == "modelscope_tui.tui" or name.startswith("modelscope_tui.tui."):
            continue
        names.append(name)
    return names


def test_domain_modules_never_import_textual():
    """DESIGN.md: a domain module never imports textual (rendering lives in cli/ or tui/). All of
    them in one process; on failure, each alone names the culprit."""
    modules = domain_modules()
    assert "modelscope_tui.checkpoint" in modules and "modelscope_tui.readers.pickle.unpickler" in modules
    assert not any(m.startswith("modelscope_tui.tui") for m in modules)
    loaded = modules_after("\n".join(f"import {m}" for m in modules))
    if "textual" in loaded:
        culprits = [m for m in modules if "textual" in modules_after(f"import {m}")]
        pytest.fail(f"textual imported at import time by: {culprits}")


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


REMOTE_LIBS = ("fsspec", "s3fs", "gcsfs", "huggingface_hub", "aiohttp", "botocore", "http.client", "ssl")


@pytest.mark.parametrize(
    "sample", ["transformer_tied.pt", "llama_tiny.safetensors", "sharded_hf", "legacy_cnn.pt", "dcp_checkpoint"]
)
def test_local_paths_never_import_network_libraries(sample):
    """A local file's summary and audit --stats load no network or fsspec module (the remote
    extra is for URLs only); main() is the whole CLI path, argv parsing included."""
    loaded = modules_after(
        "import contextlib, io\n"
        "from modelscope_tui.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    main(['summary', {str(SAMPLES / sample)!r}])\n"
        f"    main(['audit', '--stats', {str(SAMPLES / sample)!r}])\n"
    )
    assert not [m for m in REMOTE_LIBS if m in loaded]


def test_url_without_the_extra_says_what_to_install(tmp_path):
    """s3:// with fsspec not importable: one line naming the extra."""
    blocker = tmp_path / "fsspec"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('blocked for this test')\n")
    import os

    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)
    code = "import sys; from modelscope_tui.cli import main; sys.exit(main(['summary', 's3://b/x.pt']))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": path}
    )
    assert out.returncode == 2
    assert out.stderr.strip() == "mscope: error: s3://b/x.pt: reading s3:// URLs needs fsspec (install modelscope-tui[remote])"
# What the explorer's first paint does not show, imported on first use (a key, a pane) rather
# than at start-up, where each import was start-up time (issue #14's first paint).
DEFERRED = (
    "modelscope_tui.tui.screens",  # every dialog
    "modelscope_tui.audit.findings",  # A (audit); the root's norm rows need none of it
    "modelscope_tui.audit.runner",
    "modelscope_tui.values.stream",  # statistics and norms, computed on a worker
    "modelscope_tui.diff.stream",  # v (compare)
    "modelscope_tui.training.estimate",  # the GPU panel's estimate (no panel at 120 columns)
    "modelscope_tui.gpu.monitor",
    "torch",
    "numpy",
)


def test_first_paint_imports_only_what_it_shows():
    """The explorer at 120x40 (the benchmark's size: tree and details pane, no GPU panel),
    after its first paint: none of DEFERRED is imported."""
    code = (
        "import asyncio\n"
        "from modelscope_tui.tui.app import MscopeApp\n"
        "async def main():\n"
        f"    app = MscopeApp({str(SAMPLES / 'transformer_tied.pt')!r})\n"
        "    async with app.run_test(size=(120, 40)) as pilot:\n"
        "        await app.workers.wait_for_complete()\n"
        "        await pilot.pause()\n"
        "        assert app.session is not None and app.tree.root.children, app.error_line\n"
        "        assert app.query_one('#details-pane').display  # the root's details were drawn\n"
        "asyncio.run(main())\n"
    )
    loaded = modules_after(code)
    assert "modelscope_tui.tui.widgets.tree" in loaded and "modelscope_tui.audit.norms" in loaded
    early = [m for m in DEFERRED if m in loaded or any(k.startswith(m + ".") for k in loaded)]
    assert not early, f"imported before first use: {early}"
