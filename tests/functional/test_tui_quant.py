"""The explorer on a quantized checkpoint (sample_models/quant_tiny.safetensors: FP8 block
attention, MXFP4 experts, an F4 weight): one logical row per quantized weight, its parts as
stored one level in, frozen however the user asks."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from modelscope_tui.tui.app import MscopeApp

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"


async def started(pilot) -> MscopeApp:
    app = pilot.app
    await app.workers.wait_for_complete()
    await pilot.pause()
    assert app.session is not None, app.error_line
    return app


def details_text(app) -> str:
    console = Console(width=120, record=True, file=open("/dev/null", "w"))
    console.print(app.query_one("#details").content)
    return console.export_text()


def tree_lines(app) -> list[str]:
    tree = app.tree
    return [
        str(tree.render_label(line.path[-1], tree.rich_style, tree.rich_style))
        for line in tree._tree_lines
    ]


async def test_quantized_weight_is_one_row_with_its_parts_under_it():
    app = MscopeApp(SAMPLES / "quant_tiny.safetensors")
    async with app.run_test(size=(200, 50)) as pilot:
        await started(pilot)
        # logical parameters in the header: 45.4K, not the 17.1K the packed bytes made it
        assert "trainable 4.4K / 45.4K" in str(app.query_one("#header").render())
        node = app.tree.reveal(tensor_name="model.layers.0.self_attn.q_proj.weight")
        await pilot.pause()
        assert node is not None and not node.data.part
        lines = tree_lines(app)
        q_row = next(line for line in lines if "fp8 e4m3 block 128" in line and "64×64" in line)
        assert "✗ no" in q_row  # a quantized base is frozen
        # its companion is not a sibling row: only its parts show it, once expanded
        assert not any("weight_scale_inv" in line for line in lines)
        part = app.tree.reveal(tensor_name="model.layers.0.self_attn.q_proj.weight_scale_inv")
        await pilot.pause()
        assert part is not None and part.data.part and part.parent is node
        lines = tree_lines(app)
        scale_row = next(line for line in lines if "weight_scale_inv" in line)
        assert "float32" in scale_row and "1×1" in scale_row
        details = details_text(app)
        assert "companion of" in details and "q_proj.weight" in details
        # freezing or unfreezing the attention acts on logical weights; companions stay out
        app.tree.reveal(module_name="model.layers.0.self_attn")
        await pilot.pause()
        await pilot.press("space")
        await pilot.pause()
        assert not app.session.can_train("model.layers.0.self_attn.q_proj.weight_scale_inv")
        header = str(app.query_one("#header").render())
        # the space chose the attention's quantized weights as LoRA targets: nothing more trains
        assert "trainable 4.4K / 45.4K" in header and "LoRA on " in header
        lines = tree_lines(app)
        q_row = next(line for line in lines if "fp8 e4m3 block 128" in line and "64×64" in line)
        assert "◆lora" in q_row and "✗ no" not in q_row
        attn = next(line for line in lines if "self_attn" in line)
        assert "◆lora" in attn  # every weight of the attention is a LoRA target
        await pilot.press("z")  # undo
        await pilot.pause()
        assert "LoRA on" not in str(app.query_one("#header").render())
        assert "✗ no" in next(line for line in tree_lines(app) if "fp8 e4m3 block 128" in line)


async def test_mxfp4_experts_show_their_logical_shape():
    app = MscopeApp(SAMPLES / "quant_tiny.safetensors")
    async with app.run_test(size=(200, 50)) as pilot:
        await started(pilot)
        app.tree.reveal(tensor_name="model.layers.0.mlp.experts.gate_up_proj_blocks")
        await pilot.pause()
        lines = tree_lines(app)
        row = next(line for line in lines if "gate_up_proj" in line and "mxfp4" in line)
        assert "2×128×64" in row and "16.4K" in row
        details = details_text(app)
        assert "mxfp4" in details and "gate_up_proj_scales" in details
