"""A GGUF file in the explorer: its llama.cpp facts at the root, GGML types and real bytes on
its tensors, values of a quantized tensor dequantized (gguf-py as the reference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from conftest import settle
from modelscope_tui.tui.app import MscopeApp

gguf = pytest.importorskip("gguf")

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"


def details_text(app) -> str:
    console = Console(width=120, record=True, file=open("/dev/null", "w"))
    console.print(app.query_one("#details").content)
    return console.export_text()


async def test_gguf_root_facts_and_quantized_tensor():
    path = SAMPLES / "llama_tiny.gguf"
    app = MscopeApp(path, show_gpus=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        root = details_text(app)
        assert "GGUF (llama.cpp)" in root
        for words in (
            "architecture",
            "llama",
            "context length",
            "128",
            "tokenizer tokens",
            "256",
            "MOSTLY_Q8_0",
            "quantization version",
            "Q8_0 x17",
        ):
            assert words in root, words
        assert "<0x41>" not in root  # the vocabulary is counted, never listed whole
        app.tree.reveal(tensor_name="blk.0.attn_q.weight")
        await settle(pilot)
        text = details_text(app)
        assert "Q8_0" in text and "[32, 32]" in text and "GGML Q8_0: 8.5 bits per value" in text
        assert "(1,088)" in text  # 32 blocks of 34 bytes, not 32x32 one-byte values
        assert "histogram" in text
        stats, _ = app.stats.cache["blk.0.attn_q.weight"]
        ref = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight")
        want = gguf.quants.dequantize(ref.data, ref.tensor_type).astype(np.float64)
        assert stats.min == want.min() and stats.max == want.max()
        assert abs(stats.mean - want.mean()) < 1e-6
