"""Statistics in the details pane and the audit view of the explorer."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from conftest import settle
from modelscope_tui.tui.app import MscopeApp
from modelscope_tui.tui.screens.audit import AuditScreen

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"


def details_text(app) -> str:
    console = Console(width=120, record=True, file=open("/dev/null", "w"))
    console.print(app.query_one("#details").content)
    return console.export_text()


async def test_tensor_statistics_and_histogram_match_torch():
    app = MscopeApp(SAMPLES / "transformer_tied.pt", show_gpus=False)
    ref = torch.load(SAMPLES / "transformer_tied.pt", weights_only=True)["blocks.0.linear1.weight"].double()
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        app.tree.reveal(tensor_name="blocks.0.linear1.weight")
        await settle(pilot)
        text = details_text(app)
        assert "histogram" in text
        stats, _ = app.stats.cache["blocks.0.linear1.weight"]
        assert abs(stats.mean - ref.mean().item()) < 1e-6
        assert abs(stats.std - ref.std(correction=0).item()) < 1e-6
        assert stats.min == ref.min().item() and stats.max == ref.max().item()


async def test_audit_view_lists_nan_and_jumps(tmp_path):
    bad = {"ok.weight": torch.randn(4, 4), "broken.weight": torch.tensor([1.0, float("nan"), 2.0])}
    path = tmp_path / "nan.pt"
    torch.save(bad, path)
    app = MscopeApp(path, show_gpus=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        await pilot.press("A")
        await settle(pilot)
        assert isinstance(app.screen, AuditScreen)
        findings = app.screen.report.findings
        nan = [i for i, f in enumerate(findings) if f.tensor and "broken.weight" in f.tensor and "nan" in f.code.lower()]
        assert nan, [(f.code, f.tensor) for f in findings]
        option_list = app.screen.query_one("OptionList")
        option_list.highlighted = nan[0]
        await pilot.press("enter")
        await pilot.pause()
        assert app.tree.cursor_node.data.tensor.name == "broken.weight"


async def test_root_norm_profile_fills_in_when_the_audit_finishes():
    """The root said "A (audit) computes it…" with … placeholders until the cursor moved off and
    back; the audit's statistics must redraw it at once."""
    app = MscopeApp(SAMPLES / "transformer_tied.pt", show_gpus=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        assert app.tree.cursor_node is app.tree.root
        assert "computes it" in details_text(app)
        await pilot.press("A")
        await settle(pilot)
        await pilot.press("escape")
        await settle(pilot)
        assert app.tree.cursor_node is app.tree.root
        text = details_text(app)
        assert "computes it" not in text and "…" not in text.split("norm", 1)[-1], text
