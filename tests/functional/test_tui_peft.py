"""The explorer with a PEFT adapter attached (`mscope BASE --adapter DIR`), and `R`: the freeze
selection exported as a LoraConfig that peft applies to exactly those modules."""

from __future__ import annotations

import json

import pytest
from test_tui import started

from modelscope_tui.readers.peft import open_checkpoint_with_adapter
from modelscope_tui.tui.app import MscopeApp

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
save_file = pytest.importorskip("safetensors.torch").save_file


def layer():
    return torch.nn.ModuleDict({"q_proj": torch.nn.Linear(4, 4), "norm": torch.nn.LayerNorm(4)})


def tiny():
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([layer() for _ in range(3)])
    return torch.nn.ModuleDict({"layers": layers, "head": torch.nn.Linear(4, 2)})


async def test_export_lora_config_key(tmp_path):
    base = tmp_path / "model.safetensors"
    save_file(tiny().state_dict(), base)
    app = MscopeApp(base)
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        app.session.freeze_all()
        app.session.freeze_pattern("layers.2.*", value=True)
        await pilot.press("R")
        await pilot.press("enter")
        await pilot.pause()
    out = tmp_path / "model.lora-config.json"
    config = json.loads(out.read_text())
    assert (tmp_path / "model.lora-config.py").exists()
    model = peft.get_peft_model(tiny(), peft.LoraConfig(**config))
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains and all(".layers.2." in n for n in trains)
    assert any("norm.modules_to_save" in n for n in trains) and any(
        "q_proj.lora_A" in n for n in trains
    )


async def test_explorer_shows_the_adapter_over_its_base(tmp_path):
    base = tmp_path / "model.safetensors"
    save_file(tiny().state_dict(), base)
    model = peft.get_peft_model(tiny(), peft.LoraConfig(target_modules=["q_proj"], r=2))
    model.save_pretrained(tmp_path / "adapter")
    expected = model.get_nb_trainable_parameters()
    ckpt = open_checkpoint_with_adapter(base, tmp_path / "adapter")
    app = MscopeApp(None, checkpoint=ckpt, show_gpus=False)
    async with app.run_test(size=(120, 36)) as pilot:
        await started(pilot)
        assert app.session.totals() == expected
        header = str(app.query_one("#header").render())
        assert f"{expected[0]}" in header.replace(",", "")
