"""The details pane says each count once: `676`, not `676 (676)`; `528 B`, not `528 B (528)`."""

from __future__ import annotations

import re
from pathlib import Path

from rich.console import Console

from conftest import settle
from modelscope_tui.tui.app import MscopeApp

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"


def details_text(app) -> str:
    console = Console(width=120, record=True, file=open("/dev/null", "w"))
    console.print(app.query_one("#details").content)
    return console.export_text()


async def test_module_counts_are_not_repeated_and_large_ones_keep_both_forms():
    app = MscopeApp(SAMPLES / "lightning.ckpt", show_gpus=False)
    async with app.run_test(size=(160, 40)) as pilot:
        await settle(pilot)
        app.tree.reveal(module_name="model.net.2")  # 132 parameters, 528 bytes
        await settle(pilot)
        text = details_text(app)
        assert re.search(r"params\s+132\n", text), text
        assert re.search(r"bytes\s+528 B\n", text), text
        assert "(132)" not in text and "(528)" not in text
        app.tree.reveal(module_name="model.net.0")  # 544 parameters, 2,176 bytes
        await settle(pilot)
        text = details_text(app)
        assert re.search(r"bytes\s+2\.1 \S+ \(2,176\)", text), text


async def test_trainable_row_does_not_repeat_its_label():
    app = MscopeApp(SAMPLES / "lightning.ckpt", show_gpus=False)
    async with app.run_test(size=(160, 40)) as pilot:
        await settle(pilot)
        app.tree.reveal(module_name="model.net.2")
        await settle(pilot)
        assert re.search(r"trainable\s+132 \(all\)", details_text(app)), details_text(app)
        await pilot.press("space")  # freeze the module
        await settle(pilot)
        assert re.search(r"trainable\s+0 \(frozen\)", details_text(app)), details_text(app)
