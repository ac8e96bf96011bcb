"""Quantized weights as one logical record (quant.py): real bitsandbytes files where its CPU
backend quantizes, and safetensors files with exactly the names, dtypes and shapes the other
quantizers write (each layout cites its source)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelscope_tui.audit.runner import run_audit
from modelscope_tui.readers import open_checkpoint
from modelscope_tui.summary import summary_dict, summary_json
from modelscope_tui.training.session import Session


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """bitsandbytes and transformers may look for kernels on the Hugging Face Hub: never here."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def save(path: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    if config is not None:
        (path.parent / "config.json").write_text(
            json.dumps({"model_type": "llama", "quantization_config": config})
        )
    return path


def quantized(ckpt) -> dict[str, object]:
    return {t.quant.logical_name: t.quant for t in ckpt.tensors if t.quant is not None}


# ----------------------------------------------------------------------------------------------
# layouts generated with the names, dtypes and shapes their libraries write
# ----------------------------------------------------------------------------------------------
def gptq_linear(
    prefix: str, infeatures: int, outfeatures: int, bits: int = 4, group: int = 32
) -> dict[str, torch.Tensor]:
    """AutoGPTQ / GPTQModel QuantLinear (auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py,
    gptqmodel/nn_modules/qlinear/__init__.py): qweight int32 [in // 32 * bits, out], qzeros int32
    [ceil(in / group), out // 32 * bits], scales float16 [ceil(in / group), out], g_idx int32 [in],
    bias float16 [out]."""
    groups = math.ceil(infeatures / group)
    return {
        f"{prefix}.qweight": torch.randint(
            -(2**31), 2**31 - 1, (infeatures // 32 * bits, outfeatures), dtype=torch.int32
        ),
        f"{prefix}.qzeros": torch.randint(
            -(2**31), 2**31 - 1, (groups, outfeatures // 32 * bits), dtype=torch.int32
        ),
        f"{prefix}.scales": torch.rand(groups, outfeatures).half(),
        f"{prefix}.g_idx": torch.tensor([i // group for i in range(infeatures)], dtype=torch.int32),
        f"{prefix}.bias": torch.zeros(outfeatures).half(),
    }


def awq_linear(
    prefix: str, infeatures: int, outfeatures: int, bits: int = 4, group: int = 32
) -> dict[str, torch.Tensor]:
    """AutoAWQ WQLinear_GEMM (awq/modules/linear/gemm.py): qweight int32 [in, out // (32 // w_bit)],
    qzeros int32 [in // group, out // (32 // w_bit)], scales float16 [in // group, out], bias."""
    pack = 32 // bits
    return {
        f"{prefix}.qweight": torch.randint(
            0, 2**31 - 1, (infeatures, outfeatures // pack), dtype=torch.int32
        ),
        f"{prefix}.qzeros": torch.randint(
            0, 2**31 - 1, (infeatures // group, outfeatures // pack), dtype=torch.int32
        ),
        f"{prefix}.scales": torch.rand(infeatures // group, outfeatures).half(),
        f"{prefix}.bias": torch.zeros(outfeatures).half(),
    }


def compressed_linear(
    prefix: str, infeatures: int, outfeatures: int, group: int = 32
) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized W4A16 (compressed_tensors/compressors/quantized_compressors/
    pack_quantized.py): weight_packed int32 [out, in // 8], weight_scale [out, in // group] in the
    model's dtype, weight_shape int64 [2] (the logical shape)."""
    return {
        f"{prefix}.weight_packed": torch.randint(
            0, 2**31 - 1, (outfeatures, infeatures // 8), dtype=torch.int32
        ),
        f"{prefix}.weight_scale": torch.rand(outfeatures, infeatures // group).bfloat16(),
        f"{prefix}.weight_shape": torch.tensor([outfeatures, infeatures], dtype=torch.int64),
    }


def fp8_block_linear(
    prefix: str, infeatures: int, outfeatures: int, block: int = 128
) -> dict[str, torch.Tensor]:
    """DeepSeek-V3 FP8 (its inference/convert.py and transformers' FP8Linear): weight F8_E4M3
    [out, in], weight_scale_inv F32 [ceil(out / 128), ceil(in / 128)]."""
    return {
        f"{prefix}.weight": torch.randn(outfeatures, infeatures).to(torch.float8_e4m3fn),
        f"{prefix}.weight_scale_inv": torch.rand(
            math.ceil(outfeatures / block), math.ceil(infeatures / block)
        ),
    }


def mxfp4_experts(
    prefix: str, experts: int, rows: int, cols: int, scales_dtype=torch.uint8
) -> dict[str, torch.Tensor]:
    """gpt-oss MXFP4 experts (transformers integrations/mxfp4.py, openai/gpt-oss-20b's
    model.safetensors): X_blocks U8 [E, rows, cols // 32, 16] (two FP4 values per byte, 32 per
    block), X_scales U8 (E8M0) [E, rows, cols // 32]."""
    nb = cols // 32
    return {
        f"{prefix}_blocks": torch.randint(0, 255, (experts, rows, nb, 16), dtype=torch.uint8),
        f"{prefix}_scales": torch.randint(120, 130, (experts, rows, nb), dtype=torch.uint8).view(
            scales_dtype
        )
        if scales_dtype is torch.uint8
        else torch.ones(experts, rows, nb).to(scales_dtype),
    }


def nvfp4_linear(prefix: str, infeatures: int, outfeatures: int) -> dict[str, torch.Tensor]:
    """NVIDIA ModelOpt NVFP4 (nvidia/Llama-3.1-8B-Instruct-FP4's safetensors): weight U8
    [out, in // 2], weight_scale F8_E4M3 [out, in // 16], weight_scale_2 F32 [], input_scale F32 []."""
    return {
        f"{prefix}.weight": torch.randint(
            0, 255, (outfeatures, infeatures // 2), dtype=torch.uint8
        ),
        f"{prefix}.weight_scale": torch.rand(outfeatures, infeatures // 16).to(torch.float8_e4m3fn),
        f"{prefix}.weight_scale_2": torch.tensor(0.5),
        f"{prefix}.input_scale": torch.tensor(1.0),
    }


# ----------------------------------------------------------------------------------------------
# bitsandbytes: the real library (its CPU backend quantizes since 0.45)
# ----------------------------------------------------------------------------------------------
def bnb_model(kind: str):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    if kind == "int8":
        layers = [
            bnb.nn.Linear8bitLt(64, 128, has_fp16_weights=False),
            torch.nn.ReLU(),
            bnb.nn.Linear8bitLt(128, 32, has_fp16_weights=False),
        ]
    else:
        layers = [
            bnb.nn.Linear4bit(64, 128, quant_type=kind, compress_statistics=True),
            torch.nn.ReLU(),
            bnb.nn.Linear4bit(128, 32, quant_type=kind, compress_statistics=False),
        ]
    q = torch.nn.Sequential(*layers)
    q.load_state_dict(plain.state_dict())
    return plain, q.to("cpu")  # moving to a device quantizes


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_bitsandbytes_4bit_is_one_logical_weight(tmp_path, kind):
    plain, q = bnb_model(kind)
    assert q[0].weight.dtype == torch.uint8  # really quantized by bitsandbytes on the CPU
    path = save(tmp_path / "m.safetensors", q.state_dict())
    ckpt = open_checkpoint(path)
    found = quantized(ckpt)
    assert set(found) == {"0.weight", "2.weight"}
    w = found["0.weight"]
    assert w.scheme == kind
    assert w.logical_shape == tuple(q[0].weight.quant_state.shape) == (128, 64)
    assert "0.weight.quant_state.bitsandbytes__" + kind in w.companions
    assert "0.weight.nested_absmax" in w.companions  # double quantization
    assert "2.weight.nested_absmax" not in found["2.weight"].companions
    # real bytes: packed data plus every companion, as stored
    records = {t.name: t for t in ckpt.tensors}
    assert w.nbytes == sum(records[n].nbytes for n in ("0.weight", *w.companions))
    # totals count logical parameters, the library's own count of the unquantized model
    totals = ckpt.totals()
    assert totals.parameters == sum(p.numel() for p in plain.parameters())
    assert totals.trainable == 128 + 32  # the biases; a quantized base never trains
    assert totals.nbytes == sum(t.nbytes for t in ckpt.tensors)  # bytes stay real
    assert totals.quantized[kind]["weights"] == 2
    # companions never count as trainable parameters (they used to: absmax is float32)
    for name in w.companions:
        assert not records[name].trainable
        assert records[name].companion_of == "0.weight"
    # the module tree keeps companions with their weight: no module named "0.weight"
    assert set(ckpt.tree.children["0"].children) == set()
    assert ckpt.tree.children["0"].stats.params == 128 * 64 + 128


def test_bitsandbytes_int8(tmp_path):
    plain, q = bnb_model("int8")
    assert q[0].weight.dtype == torch.int8
    ckpt = open_checkpoint(save(tmp_path / "m.safetensors", q.state_dict()))
    found = quantized(ckpt)
    assert {k: v.scheme for k, v in found.items()} == {"0.weight": "int8", "2.weight": "int8"}
    assert set(found["0.weight"].companions) == {"0.SCB", "0.weight_format"}
    assert ckpt.totals().parameters == sum(p.numel() for p in plain.parameters())
    assert ckpt.totals().buffers == 0  # SCB / weight_format fold under the weight


def test_gptq_awq_compressed_layouts(tmp_path):
    torch.manual_seed(0)
    gptq = open_checkpoint(
        save(tmp_path / "gptq" / "model.safetensors", gptq_linear("l.q_proj", 256, 128, group=64))
    )
    (g,) = quantized(gptq).values()
    assert (g.logical_name, g.scheme, g.logical_shape) == (
        "l.q_proj.weight",
        "gptq int4 g64",
        (128, 256),
    )
    assert set(g.companions) == {"l.q_proj.qzeros", "l.q_proj.scales", "l.q_proj.g_idx"}
    assert gptq.totals().parameters == 128 * 256 + 128  # and the fp16 bias
    assert gptq.totals().trainable == 0  # QuantLinear's bias is a buffer: it does not train

    gptq8 = open_checkpoint(
        save(
            tmp_path / "gptq8" / "model.safetensors",
            gptq_linear("l.o", 256, 128, bits=8, group=128),
        )
    )
    assert next(iter(quantized(gptq8).values())).scheme == "gptq int8 g128"

    awq = open_checkpoint(
        save(tmp_path / "awq" / "model.safetensors", awq_linear("l.up", 256, 128, group=64))
    )
    (a,) = quantized(awq).values()
    assert (a.scheme, a.logical_shape) == ("awq int4 g64", (128, 256))

    ct = open_checkpoint(
        save(
            tmp_path / "ct" / "model.safetensors", compressed_linear("l.down", 256, 128, group=128)
        )
    )
    (c,) = quantized(ct).values()
    assert (c.scheme, c.logical_shape) == ("compressed-tensors int4 g128", (128, 256))
    assert "l.down.weight_shape" in c.companions


def test_config_names_the_method_and_bits(tmp_path):
    # A GPTQ layout saved by a tool that says so in config.json: the config wins over the shapes.
    cfg = {"quant_method": "gptq", "bits": 8, "group_size": 64, "desc_act": False}
    ckpt = open_checkpoint(
        save(tmp_path / "model.safetensors", gptq_linear("l.k", 256, 128, bits=8, group=64), cfg)
    )
    (g,) = quantized(ckpt).values()
    assert g.scheme == "gptq int8 g64"
    assert ckpt.metadata["quantization_config"]["quant_method"] == "gptq"


def test_fp8_block_mxfp4_nvfp4(tmp_path):
    torch.manual_seed(0)
    tensors = {
        **fp8_block_linear("model.layers.0.self_attn.q_proj", 256, 384),
        **mxfp4_experts("model.layers.0.mlp.experts.gate_up_proj", 2, 64, 128),
        **mxfp4_experts(
            "model.layers.0.mlp.experts.down_proj", 2, 128, 64, scales_dtype=torch.float8_e8m0fnu
        ),
        **nvfp4_linear("model.layers.0.mlp.shared.up_proj", 128, 64),
        "model.layers.0.mlp.experts.gate_up_proj_bias": torch.zeros(2, 64).bfloat16(),
    }
    cfg = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    ckpt = open_checkpoint(save(tmp_path / "model.safetensors", tensors, cfg))
    found = quantized(ckpt)
    assert found["model.layers.0.self_attn.q_proj.weight"].scheme == "fp8 e4m3 block 128"
    assert found["model.layers.0.self_attn.q_proj.weight"].logical_shape == (384, 256)
    gate_up = found["model.layers.0.mlp.experts.gate_up_proj"]
    assert (gate_up.scheme, gate_up.logical_shape) == ("mxfp4", (2, 64, 128))
    down = found["model.layers.0.mlp.experts.down_proj"]
    assert (down.scheme, down.logical_shape) == ("mxfp4", (2, 128, 64))  # F8_E8M0 scales too
    nv = found["model.layers.0.mlp.shared.up_proj.weight"]
    assert (nv.scheme, nv.logical_shape) == ("nvfp4", (64, 128))
    assert set(nv.companions) == {
        f"model.layers.0.mlp.shared.up_proj.{n}"
        for n in ("weight_scale", "weight_scale_2", "input_scale")
    }
    records = {t.name: t for t in ckpt.tensors}
    # the scales that used to count as trainable parameters (float32, E8M0) never train now
    assert not records["model.layers.0.self_attn.q_proj.weight_scale_inv"].trainable
    assert records["model.layers.0.self_attn.q_proj.weight_scale_inv"].kind == "buffer"
    totals = ckpt.totals()
    assert totals.trainable == 2 * 64  # the expert bias only
    assert totals.parameters == 384 * 256 + 2 * 64 * 128 + 2 * 128 * 64 + 64 * 128 + 2 * 64


def test_f4_weight_with_block_scales(tmp_path):
    """An F4 weight (safetensors' 4-bit float, two per byte) with F8_E8M0 scales per 32 is MXFP4;
    with F8_E4M3 scales per 16 it is NVFP4. safetensors writes F4 from torch.float4_e2m1fn_x2."""
    w = torch.randint(0, 255, (64, 64), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    tensors = {
        "a.weight": w,
        "a.weight_scale": torch.ones(64, 4).to(torch.float8_e8m0fnu),
        "b.weight": w.clone(),
        "b.weight_scale": torch.ones(64, 8).to(torch.float8_e4m3fn),
    }
    ckpt = open_checkpoint(save(tmp_path / "f4.safetensors", tensors))
    found = quantized(ckpt)
    assert (found["a.weight"].scheme, found["a.weight"].logical_shape) == ("mxfp4", (64, 128))
    assert (found["b.weight"].scheme, found["b.weight"].logical_shape) == ("nvfp4", (64, 128))


def test_plain_checkpoint_is_unchanged(tmp_path):
    # Names that look like companions but belong to nothing quantized stay as they were.
    tensors = {
        "enc.scales": torch.ones(4, 4),
        "enc.weight": torch.ones(4, 4),
        "enc.qzeros": torch.zeros(2, dtype=torch.int32),
    }
    ckpt = open_checkpoint(save(tmp_path / "m.safetensors", tensors))
    assert not quantized(ckpt)
    assert all(t.companion_of is None for t in ckpt.tensors)
    assert ckpt.totals().trainable == 32


def test_session_freezing_acts_on_the_logical_weight(tmp_path):
    plain, q = bnb_model("nf4")
    ckpt = open_checkpoint(save(tmp_path / "m.safetensors", q.state_dict()))
    session = Session(ckpt)
    # patterns select logical weights, never their companions
    assert session.match("0.*") == ["0.bias", "0.weight"]
    assert not session.can_train("0.weight") and not session.can_train("0.weight.absmax")
    session.freeze_all()
    assert session.totals() == (0, sum(p.numel() for p in plain.parameters()))
    # unfreezing a quantized weight chooses it as a LoRA target; it never trains itself
    result = session.unfreeze(["0.weight"])
    assert result.changed == 1 and "chose 1 quantized weight(s) as LoRA target(s)" in result.message
    assert session.is_lora_target("0.weight") and not session.is_trainable("0.weight")
    assert session.totals() == (0, sum(p.numel() for p in plain.parameters()))
    # a module's names include the companions: they follow their weight, never chosen alone
    session.undo()
    result = session.set_trainable(
        [t.name for t in ckpt.tree.children["0"].all_tensors() if t.name != "0.bias"], True
    )
    assert result.changed == 1 and session.lora_target_count() == (1, 2)
    assert not any(session.is_lora_target(n) for n in session.records["0.weight"].quant.companions)


def test_summary_json_lists_companions(tmp_path):
    torch.manual_seed(0)
    ckpt = open_checkpoint(
        save(tmp_path / "model.safetensors", gptq_linear("l.q", 64, 32, group=32))
    )
    doc = json.loads(summary_json(ckpt))
    assert doc == json.loads(json.dumps(summary_dict(ckpt)))  # the fast path says the same
    by_name = {t["name"]: t for t in doc["tensors"]}
    q = by_name["l.q.qweight"]["quant"]
    assert (
        q["scheme"] == "gptq int4 g32"
        and q["logical_shape"] == [32, 64]
        and q["logical_numel"] == 2048
    )
    assert by_name["l.q.scales"]["companion_of"] == "l.q.qweight"
    assert by_name["l.q.scales"]["trainable"] is False
    assert doc["totals"]["quantized"]["gptq int4 g32"]["parameters"] == 2048


def test_audit_names_schemes_and_flags_unquantized_sibling(tmp_path):
    torch.manual_seed(0)
    tensors = {}
    for i in range(2):
        for proj in ("q_proj", "k_proj", "v_proj"):
            tensors.update(gptq_linear(f"model.layers.{i}.self_attn.{proj}", 64, 64))
        if i == 0:
            tensors.update(gptq_linear("model.layers.0.self_attn.o_proj", 64, 64))
        else:  # left in fp16 next to its quantized siblings
            tensors["model.layers.1.self_attn.o_proj.weight"] = torch.randn(64, 64).half()
    tensors["lm_head.weight"] = torch.randn(10, 64).half()  # no quantized sibling: not flagged
    tensors["model.norm.weight"] = torch.ones(64).half()
    ckpt = open_checkpoint(save(tmp_path / "model.safetensors", tensors), strict=False)
    report = run_audit(ckpt)
    codes = [
        (f.code, f.tensor)
        for f in report.findings
        if f.code in ("quantized-layers", "unquantized-layer")
    ]
    assert codes == [
        ("quantized-layers", "model.layers.0.self_attn.k_proj.qweight"),
        ("unquantized-layer", "model.layers.1.self_attn.o_proj.weight"),
    ]
    (info,) = [f for f in report.findings if f.code == "quantized-layers"]
    assert info.details["layers"]["model.layers.1.self_attn.v_proj.weight"] == "gptq int4 g32"
    assert report.verdict != "fail"  # a warning, not in the default --fail-on

    # listed in modules_to_not_convert: deliberate, not flagged
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "quantization_config": {
                    "quant_method": "gptq",
                    "bits": 4,
                    "modules_to_not_convert": ["model.layers.*.self_attn.o_proj"],
                }
            }
        )
    )
    report = run_audit(open_checkpoint(tmp_path / "model.safetensors", strict=False))
    assert not [f for f in report.findings if f.code == "unquantized-layer"]


def test_quant_state_that_lies_falls_back_to_the_packed_size(tmp_path):
    # A quant_state whose shape does not match the packed bytes: the packed size wins.
    state = torch.tensor(
        list(json.dumps({"quant_type": "nf4", "blocksize": 64, "shape": [1000, 1000]}).encode()),
        dtype=torch.uint8,
    )
    tensors = {
        "l.weight": torch.zeros(32, 1, dtype=torch.uint8),
        "l.weight.absmax": torch.ones(1),
        "l.weight.quant_map": torch.ones(16),
        "l.weight.quant_state.bitsandbytes__nf4": state,
    }
    ckpt = open_checkpoint(save(tmp_path / "m.safetensors", tensors))
    (w,) = quantized(ckpt).values()
    assert w.logical_shape == (64,)


def test_sharded_set_with_companions_in_another_shard(tmp_path):
    # transformers' save_pretrained splits by size, so a qweight and its scales may land in two
    # shards; the set is read as one and config.json next to the index names the method.
    torch.manual_seed(0)
    layer = awq_linear("model.layers.0.mlp.up_proj", 128, 64, group=64)
    first = {k: v for k, v in layer.items() if k.endswith("qweight")}
    second = {k: v for k, v in layer.items() if not k.endswith("qweight")}
    save(tmp_path / "model-00001-of-00002.safetensors", first)
    save(
        tmp_path / "model-00002-of-00002.safetensors",
        second,
        {"quant_method": "awq", "bits": 4, "group_size": 64},
    )
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first} | {
        k: "model-00002-of-00002.safetensors" for k in second
    }
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    ckpt = open_checkpoint(tmp_path)
    (a,) = quantized(ckpt).values()
    assert (a.scheme, a.logical_shape) == ("awq int4 g64", (64, 128))
    assert ckpt.metadata["quantization_config"] == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 64,
    }


def test_hostile_shapes_do_not_break_recognition(tmp_path):
    # Zero-sized and mismatched companions: recognised where they add up, left alone otherwise,
    # never an exception.
    tensors = {
        "a.qweight": torch.zeros(0, 0, dtype=torch.int32),
        "a.scales": torch.zeros(0, 0).half(),
        "b.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn),
        "b.weight_scale_inv": torch.zeros(0, 3),
        "c_blocks": torch.zeros(2, 3, dtype=torch.uint8),
        "c_scales": torch.zeros(5, dtype=torch.uint8),
        "d.weight.quant_state.bitsandbytes__nf4": torch.tensor(
            list(b"not json"), dtype=torch.uint8
        ),
        "d.weight": torch.zeros(8, 1, dtype=torch.uint8),
    }
    ckpt = open_checkpoint(save(tmp_path / "m.safetensors", tensors))
    found = quantized(ckpt)
    assert found["d.weight"].logical_shape == (16,)  # the packed size when the state is unreadable
    assert "c" not in found  # scales that do not fit the blocks
    assert ckpt.totals().tensors == len(tensors)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_transformers_save_pretrained_counts_match_num_parameters(tmp_path, kind):
    """A tiny Llama quantized by transformers + bitsandbytes on the CPU and saved with
    save_pretrained (safetensors + config.json with quantization_config): mscope's logical
    parameter count is the library's own `num_parameters()`."""
    pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    if kind == "nf4":
        qc = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    else:
        qc = transformers.BitsAndBytesConfig(load_in_8bit=True)
    model = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=qc, device_map="cpu", use_kernels=False
    )
    model.save_pretrained(tmp_path / kind)
    ckpt = open_checkpoint(tmp_path / kind)
    assert ckpt.metadata["quantization_config"]["quant_method"] == "bitsandbytes"
    found = quantized(ckpt)
    assert len(found) == 2 * 7  # q, k, v, o, gate, up, down per layer; lm_head stays bf16/fp32
    assert {q.scheme for q in found.values()} == {kind}
    assert ckpt.totals().parameters == model.num_parameters()
    # nothing but norms, embeddings and the head can train; no scale is a trainable parameter
    assert ckpt.totals().trainable == sum(
        p.numel() for n, p in model.named_parameters() if "proj" not in n
    )
    assert not [f for f in run_audit(ckpt).findings if f.code == "unquantized-layer"]


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_stats_do_not_flag_what_a_quantizer_stores_by_design(tmp_path, kind):
    # nf4: the same code books in every layer (not waste worth tying); int8: a zero
    # `weight_format` tag per layer (not an all-zero tensor).
    bnb = pytest.importorskip("bitsandbytes")
    if kind == "nf4":  # double quantization in both layers: two identical 1 KiB code books
        q = torch.nn.Sequential(
            *(
                bnb.nn.Linear4bit(64, 64, quant_type="nf4", compress_statistics=True)
                for _ in range(2)
            )
        )
    else:
        q = torch.nn.Sequential(
            *(bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False) for _ in range(2))
        )
    q = q.to("cpu")
    ckpt = open_checkpoint(save(tmp_path / "m.safetensors", q.state_dict()), strict=False)
    report = run_audit(ckpt, stats=True)
    flagged = [
        (f.code, f.tensor)
        for f in report.findings
        if f.code in ("duplicate-tensor", "all-zero", "constant", "dead")
    ]
    assert flagged == []
    assert report.stats  # the values were read


@pytest.mark.parametrize(
    ("tensors", "scheme", "shape"),
    [
        # compressed-tensors nvfp4-pack-quantized (compressors/quantized_compressors/nvfp4_quantized.py):
        # weight_packed U8 [out, in/2], weight_scale F8_E4M3 [out, in/16], weight_global_scale F32 [1]
        (
            {
                "l.weight_packed": torch.zeros(32, 32, dtype=torch.uint8),
                "l.weight_scale": torch.ones(32, 4).to(torch.float8_e4m3fn),
                "l.weight_global_scale": torch.ones(1),
            },
            "nvfp4",
            (32, 64),
        ),
        # compressed-tensors float-quantized FP8, channel strategy: weight F8_E4M3 + weight_scale [out, 1]
        (
            {
                "l.weight": torch.zeros(32, 64).to(torch.float8_e4m3fn),
                "l.weight_scale": torch.ones(32, 1),
            },
            "fp8 e4m3 channel",
            (32, 64),
        ),
        # per-tensor FP8 (ModelOpt / FBGEMM style): a scalar weight_scale and input_scale
        (
            {
                "l.weight": torch.zeros(32, 64).to(torch.float8_e4m3fn),
                "l.weight_scale": torch.tensor(0.5),
                "l.input_scale": torch.tensor(1.0),
            },
            "fp8 e4m3 tensor",
            (32, 64),
        ),
        # compressed-tensors int-quantized W8A8: weight I8 [out, in] + weight_scale [out, 1]
        (
            {
                "l.weight": torch.zeros(32, 64, dtype=torch.int8),
                "l.weight_scale": torch.ones(32, 1).bfloat16(),
            },
            "compressed-tensors int8 channel",
            (32, 64),
        ),
    ],
    ids=["ct-nvfp4", "fp8-channel", "fp8-tensor", "ct-int8"],
)
def test_more_schemes(tmp_path, tensors, scheme, shape):
    ckpt = open_checkpoint(save(tmp_path / "m.safetensors", tensors))
    ((name, q),) = quantized(ckpt).items()
    assert (name, q.scheme, q.logical_shape) == ("l.weight", scheme, shape)
    assert set(q.companions) == set(tensors) - {t.name for t in ckpt.tensors if t.quant is not None}
    assert ckpt.totals().trainable == 0 and ckpt.totals().parameters == math.prod(shape)


# ----------------------------------------------------------------------------------------------
# diff: a quantized file against its unquantized original
# ----------------------------------------------------------------------------------------------
def fp8_quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's block FP8 (inference/kernel.py act_quant / weight_dequant): per 128x128
    block, scale = amax / 448, q = w / scale in float8_e4m3fn; stored as weight_scale_inv."""
    rows, cols = w.shape
    grid = torch.zeros(math.ceil(rows / block), math.ceil(cols / block))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            tile = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            scale = tile.abs().max().clamp(min=1e-12) / 448.0
            grid[i, j] = scale
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (tile / scale).to(
                torch.float8_e4m3fn
            )
    return q, grid


def dequantized(q: torch.Tensor, grid: torch.Tensor, block: int = 128) -> torch.Tensor:
    rows, cols = q.shape
    scales = grid.double().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return q.double() * scales


def test_diff_fp8_block_against_its_original_compares_dequantized_values(tmp_path):
    from modelscope_tui.diff.stream import diff_checkpoints

    torch.manual_seed(0)
    w = torch.randn(300, 200)  # blocks that do not divide the shape: 3 x 2, the last ones partial
    q, grid = fp8_quantize(w)
    quant = {"l.weight": q, "l.weight_scale_inv": grid, "l.bias": torch.zeros(300)}
    b = open_checkpoint(save(tmp_path / "fp8" / "m.safetensors", quant))
    a = open_checkpoint(
        save(tmp_path / "orig.safetensors", {"l.weight": w, "l.bias": torch.zeros(300)})
    )
    report = diff_checkpoints(a, b)
    by_name = {d.name: d for d in report.tensors}
    assert set(by_name) == {"l.weight", "l.bias"}  # the scale folds under its weight: not "added"
    d = by_name["l.weight"]
    assert d.status == "dtype-changed" and d.a_shape == d.b_shape == (300, 200)
    assert d.b_dtype == "fp8 e4m3 block 128"
    assert d.message == "quantized to fp8 e4m3 block 128; values compared dequantized"
    # exactly what dequantizing with torch gives
    truth = (dequantized(q, grid) - w.double()).abs()
    assert d.max_abs == truth.max().item()
    assert d.rel_l2 == pytest.approx((truth.norm() / w.double().norm()).item(), rel=1e-12)
    assert 0 < d.rel_l2 < 0.05  # FP8's rounding, not a broken layout
    assert any("fp8 e4m3 block 128 compared dequantized" in n for n in report.notes)
    assert any("1 tensor(s) quantized: float32 -> fp8 e4m3 block 128" in n for n in report.notes)
    # the dequantized values themselves (float64: the product is exact) compare with no error
    exact = open_checkpoint(
        save(tmp_path / "exact.safetensors", {"l.weight": dequantized(q, grid)})
    )
    d = {d.name: d for d in diff_checkpoints(exact, b).tensors}["l.weight"]
    assert d.max_abs == 0.0 and d.mismatched == 0
    # the other way round: B is the original
    d = {d.name: d for d in diff_checkpoints(b, a).tensors}["l.weight"]
    assert (
        d.message.startswith("dequantized from fp8 e4m3 block 128")
        and d.max_abs == truth.max().item()
    )


def test_diff_nf4_and_gptq_against_the_original_pair_by_logical_weight(tmp_path):
    from modelscope_tui.diff.stream import diff_checkpoints

    plain, q = bnb_model("nf4")
    a = open_checkpoint(save(tmp_path / "plain.safetensors", plain.state_dict()))
    b = open_checkpoint(save(tmp_path / "nf4.safetensors", q.state_dict()))
    report = diff_checkpoints(a, b)
    by_name = {d.name: d for d in report.tensors}
    assert set(by_name) == {"0.weight", "0.bias", "2.weight", "2.bias"}  # no companion added
    d = by_name["0.weight"]
    assert d.status == "dtype-changed" and d.a_shape == d.b_shape == (128, 64)
    assert d.message == "quantized to nf4; values not compared (quantized)" and d.max_abs is None
    assert report.counts()["shape-changed"] == 0 and report.counts()["added"] == 0
    assert any("nf4: values not compared (quantized)" in n for n in report.notes)
    # GPTQ: the packed weight has another name (qweight); it pairs with `weight` all the same
    gptq = gptq_linear("p", 64, 32)
    c = open_checkpoint(save(tmp_path / "gptq" / "m.safetensors", gptq))
    orig = {"p.weight": torch.randn(32, 64).half(), "p.bias": torch.zeros(32).half()}
    o = open_checkpoint(save(tmp_path / "orig16.safetensors", orig))
    report = diff_checkpoints(o, c)
    by_name = {(d.a_name, d.b_name): d for d in report.tensors}
    assert set(by_name) == {("p.weight", "p.qweight"), ("p.bias", "p.bias")}
    d = by_name[("p.weight", "p.qweight")]
    assert d.b_dtype.startswith("gptq int4") and d.a_shape == d.b_shape == (32, 64)
    # a different logical shape is a shape change, said in logical shapes
    wrong = open_checkpoint(
        save(tmp_path / "wrong.safetensors", {"0.weight": torch.randn(64, 128)})
    )
    d = {d.name: d for d in diff_checkpoints(wrong, b).tensors}["0.weight"]
    assert d.status == "shape-changed" and (d.a_shape, d.b_shape) == ((64, 128), (128, 64))


def test_diff_cli_says_quantized_not_shape_changed(tmp_path, capsys):
    from modelscope_tui.cli import main

    plain, q = bnb_model("nf4")
    save(tmp_path / "plain.safetensors", plain.state_dict())
    save(tmp_path / "nf4.safetensors", q.state_dict())
    assert main(
        ["diff", str(tmp_path / "plain.safetensors"), str(tmp_path / "nf4.safetensors")]
    ) in (0, 1)
    out = capsys.readouterr().out
    assert "0.weight: dtype float32 -> nf4, values not compared (quantized)" in out
    assert "shape" not in out.replace("shape-changed", "")
