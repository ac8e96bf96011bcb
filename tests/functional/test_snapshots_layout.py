"""The explorer at 80x24, 120x40 and 200x50: deep Hugging Face names, both side panes, siblings
with long shared prefixes. Update baselines on purpose: --snapshot-update."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_tui_gpu import fixed_sample

from conftest import settle
from modelscope_tui.gpu.monitor import GpuMonitor
from modelscope_tui.tui.app import MscopeApp

ROOT = Path(__file__).resolve().parents[2]
SIZES = [(80, 24), (120, 40), (200, 50)]


class FixedMonitor:
    """A GPU monitor that delivers one fixed sample: no live figures in a snapshot."""

    ticks = 0

    def start(self, interval, on_sample) -> None:
        on_sample(fixed_sample())

    def memory_history(self, nvml_index: int) -> list[int]:
        total = fixed_sample().gpus[nvml_index].memory_total
        return [int(total * f / 10) for f in range(1, 9)]

    def close(self, timeout: float = 2.0) -> None:
        pass


@pytest.fixture
def fixed_gpus(monkeypatch):
    monkeypatch.setattr(GpuMonitor, "from_env", classmethod(lambda cls, *a, **k: FixedMonitor()))


async def shown(pilot, details: bool | None = None, gpus: bool | None = None) -> None:
    """Ask for the panes (as the keys do), let every worker finish, drop the toasts."""
    app = pilot.app
    await settle(pilot)
    if details is not None and app.query_one("#details-pane").display != details:
        await pilot.press("d")
    if gpus is not None and app.query_one("#gpu-panel").display != gpus:
        await pilot.press("g")
    await settle(pilot)
    app.clear_notifications()
    await pilot.pause()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_llama_deep_names(snap_compare, size, monkeypatch):
    """Seven levels deep: names, shapes and dtypes all visible, the details pane where it fits."""
    monkeypatch.chdir(ROOT)
    app = MscopeApp("sample_models/llama_tiny.safetensors", show_gpus=False)

    async def run_before(pilot) -> None:
        await settle(pilot)
        app.tree.expand_visible(app.tree.root, 3000)
        app.tree.reveal(tensor_name="model.layers.1.self_attn.q_proj.weight")
        await shown(pilot)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_full_module_with_both_panes(snap_compare, size, monkeypatch, fixed_gpus):
    """d and g both asked for: each pane gets what the tree spares (at 80 columns the GPU panel,
    asked for last, stays and the details pane waits for room)."""
    monkeypatch.chdir(ROOT)
    app = MscopeApp("sample_models/notebook_full.pt", show_gpus=False)

    async def run_before(pilot) -> None:
        await settle(pilot)
        app.tree.reveal(module_name="body.1")
        await pilot.press("space")  # freeze one BatchNorm: the header shows the change
        await shown(pilot, details=True, gpus=True)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_long_sibling_names(snap_compare, size, tmp_path, monkeypatch):
    """Siblings sharing long prefixes and suffixes, deep down: shortened apart, never alike."""
    import torch
    from safetensors.torch import save_file

    names = [
        "self_attention_in_proj_weight",
        "self_attention_in_proj_bias",
        "encoder_attention_layernorm_weight",
        "encoder_ffn_layernorm_weight",
        "batch_norm_running_mean",
        "batch_norm_running_var",
    ]
    save_file({f"model.encoder.layers.11.block.{n}": torch.zeros(3, 5) for n in names}, str(tmp_path / "long.safetensors"))
    monkeypatch.chdir(tmp_path)
    app = MscopeApp("long.safetensors", show_gpus=False)

    async def run_before(pilot) -> None:
        await settle(pilot)
        app.tree.expand_visible(app.tree.root, 3000)
        app.tree.reveal(tensor_name="model.encoder.layers.11.block.batch_norm_running_var")
        await shown(pilot, details=True)

    assert snap_compare(app, terminal_size=size, run_before=run_before)
