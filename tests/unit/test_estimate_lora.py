"""LoRA / QLoRA estimates (training/estimate.lora_inventory): a frozen base, quantized by a
bitsandbytes scheme or as stored, plus trainable adapters; checked against what bitsandbytes
really stores and against the QLoRA paper's 65B figures (docs/memory-estimate.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelscope_tui.checkpoint import PARAMETER, Checkpoint, TensorRecord
from modelscope_tui.errors import MscopeError
from modelscope_tui.readers import open_checkpoint
from modelscope_tui.training.estimate import (
    bnb_bytes,
    estimate,
    estimate_for_session,
    inventory,
    lora_estimate_table,
    lora_inventory,
)

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"
GB = 10**9


def llama_layout(
    dim: int, layers: int, hidden: int, vocab: int, dtype: str = "bfloat16"
) -> Checkpoint:
    """A LLaMA-shaped checkpoint as metadata only (no bytes): names and shapes as Meta's
    LLaMA in transformers' naming (q/k/v/o, gate/up/down, two RMSNorms per layer)."""
    tensors = [TensorRecord("model.embed_tokens.weight", (vocab, dim), dtype, kind=PARAMETER)]
    for i in range(layers):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors.append(
                TensorRecord(f"{p}.self_attn.{proj}.weight", (dim, dim), dtype, kind=PARAMETER)
            )
        tensors.append(
            TensorRecord(f"{p}.mlp.gate_proj.weight", (hidden, dim), dtype, kind=PARAMETER)
        )
        tensors.append(
            TensorRecord(f"{p}.mlp.up_proj.weight", (hidden, dim), dtype, kind=PARAMETER)
        )
        tensors.append(
            TensorRecord(f"{p}.mlp.down_proj.weight", (dim, hidden), dtype, kind=PARAMETER)
        )
        tensors.append(TensorRecord(f"{p}.input_layernorm.weight", (dim,), dtype, kind=PARAMETER))
        tensors.append(
            TensorRecord(f"{p}.post_attention_layernorm.weight", (dim,), dtype, kind=PARAMETER)
        )
    tensors.append(TensorRecord("model.norm.weight", (dim,), dtype, kind=PARAMETER))
    tensors.append(TensorRecord("lm_head.weight", (vocab, dim), dtype, kind=PARAMETER))
    return Checkpoint(Path("llama.safetensors"), "safetensors", tensors=tensors)


def test_bnb_bytes_match_what_bitsandbytes_stores(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    for out, inp in ((128, 64), (96, 320)):
        lin = bnb.nn.Linear4bit(
            inp, out, bias=False, quant_type="nf4", compress_statistics=True
        ).to("cpu")
        sd = lin.state_dict()
        real = sum(v.numel() * v.element_size() for v in sd.values())
        state = sd["weight.quant_state.bitsandbytes__nf4"].numel()  # the shape as JSON, ~170 bytes
        assert real - state == bnb_bytes("nf4", out * inp, out)
        lin8 = bnb.nn.Linear8bitLt(inp, out, bias=False, has_fp16_weights=False).to("cpu")
        sd8 = lin8.state_dict()
        real8 = sum(v.numel() * v.element_size() for v in sd8.values())
        assert real8 - sd8["weight_format"].numel() == bnb_bytes("int8", out * inp, out)


def test_double_quantized_nf4_is_4_127_bits_per_parameter():
    # Dettmers et al. 2023, sec. 3: 4 + 8/64 + 32/(64*256) bits per parameter
    n = 8192 * 8192
    assert 8 * bnb_bytes("nf4", n, 8192) / n == pytest.approx(
        4 + 8 / 64 + 32 / (64 * 256), rel=1e-4
    )


def test_qlora_65b_fits_in_48_gb_and_full_finetune_does_not():
    """QLoRA (Dettmers et al. 2023, arXiv:2305.14314): LLaMA-65B finetunes on one 48 GB GPU
    (r = 64 adapters on every linear layer, NF4 with double quantization), where 16-bit full
    finetuning needs more than 780 GB."""
    ckpt = llama_layout(dim=8192, layers=80, hidden=22016, vocab=32000)
    full = estimate(inventory(ckpt), "bf16-mixed", "adamw")
    assert (
        full.parameters
        == 2 * 32000 * 8192 + 80 * (4 * 8192**2 + 3 * 8192 * 22016 + 2 * 8192) + 8192
    )  # 65.29B
    assert full.total > 780 * GB
    assert (
        estimate(inventory(ckpt), "bf16", "adamw").total > 780 * GB * 0.6
    )  # 8 B/param, still huge
    rows, plan = lora_estimate_table(
        ckpt, rank=64, quantize="nf4", precisions=["bf16-mixed", "bf16"], optimizers=["adamw"]
    )
    assert plan.modules == 80 * 7
    assert plan.adapter_params == 80 * (4 * 64 * (8192 + 8192) + 3 * 64 * (8192 + 22016))
    assert plan.base_params == full.parameters
    mixed, pure = rows
    assert mixed.parameters == full.parameters + plan.adapter_params
    assert mixed.trainable == plan.adapter_params
    # the NF4 base: every linear weight at 4.127 bits, embeddings and head in bf16
    assert plan.base_quantized_bytes["nf4"] == pytest.approx(64.76e9 * 4.127 / 8, rel=0.01)
    assert mixed.total < 48 * GB  # 16 bytes per adapter parameter (fp32 master and Adam states)
    assert pure.total < mixed.total < full.total / 20


def test_lora_targets_and_frozen_base_on_a_real_file():
    ckpt = open_checkpoint(SAMPLES / "llama_tiny.safetensors")
    counts, plan = lora_inventory(ckpt, rank=8, targets=["q_proj", "v_proj"])
    layers = {t.name.split(".")[2] for t in ckpt.tensors if ".layers." in t.name}
    q = next(t for t in ckpt.tensors if t.name.endswith("q_proj.weight"))
    v = next(t for t in ckpt.tensors if t.name.endswith("v_proj.weight"))
    assert plan.modules == 2 * len(layers)
    assert plan.adapter_params == len(layers) * 8 * (sum(q.shape) + sum(v.shape))
    # what trains is the adapters alone; the base costs its bf16 weights
    est = estimate(counts, "bf16-mixed", "adamw")
    assert est.trainable == plan.adapter_params
    assert est.gradients == 2 * plan.adapter_params
    assert est.weights == ckpt.totals().nbytes + 2 * plan.adapter_params
    with pytest.raises(MscopeError):
        lora_inventory(ckpt, rank=0)
    with pytest.raises(MscopeError):
        lora_inventory(ckpt, rank=4, quantize="int3")


def test_quantized_file_keeps_its_bytes_whatever_the_precision(tmp_path):
    ckpt = open_checkpoint(SAMPLES / "quant_tiny.safetensors")
    quantized = sum(
        t.nbytes for t in ckpt.tensors if t.quant is not None or t.companion_of is not None
    )
    plain = [t for t in ckpt.tensors if t.quant is None and t.companion_of is None]
    for precision in ("fp32", "bf16"):
        est = estimate_for_session(ckpt, precision, "none")
        size = 4 if precision == "fp32" else 2
        assert est.weights == quantized + size * sum(t.numel for t in plain)
        assert est.parameters == ckpt.totals().parameters  # logical parameters


def test_cli_prints_the_lora_table_next_to_the_full_one(tmp_path):
    from conftest import run_cli

    sd = {"l.weight": torch.zeros(64, 32), "l.bias": torch.zeros(64)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    out = run_cli(
        "estimate",
        str(tmp_path / "m.safetensors"),
        "--lora",
        "4",
        "--quantize",
        "nf4",
        "--precision",
        "bf16-mixed",
        "--optimizer",
        "adamw",
    )
    assert out.rc == 0, out.stderr
    assert "QLoRA rank 4 on 1 module(s) (every linear layer): 384 trainable" in out.stdout
    assert "quantized nf4" in out.stdout
    bad = run_cli("estimate", str(tmp_path / "m.safetensors"), "--quantize", "nf4")
    assert bad.rc != 0 and "add --lora RANK" in bad.stderr and "Traceback" not in bad.stderr
