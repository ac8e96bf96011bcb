#!/usr/bin/env python
"""Regenerate every sample checkpoint in this folder.

Run as ``python sample_models/make_samples.py``; files are written next to
this script. Everything is produced by real torch / safetensors APIs with a
fixed seed, and the models are tiny (tens of thousands of parameters) so the
whole folder stays well under 5 MB.

Some samples must be pickled from a class that lives somewhere specific
(``__main__.Net``, or a package that is deleted afterwards); those are made in
child processes (see ``NOTEBOOK_SCRIPT`` and ``GONE_PACKAGE_NETS``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
SEED = 1234


def seed(offset: int = 0) -> None:
    torch.manual_seed(SEED + offset)


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Conv2d + BatchNorm2d + Linear, about 3k parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, kernel_size=3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, kernel_size=3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class ScriptableCNN(SmallCNN):
    """SmallCNN plus a plain registered buffer, for the TorchScript sample."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes)
        self.register_buffer("input_mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - self.input_mean
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class TinyTransformerLM(nn.Module):
    """Embedding + positional embedding + N encoder blocks + LayerNorm + tied lm_head."""

    def __init__(
        self,
        vocab: int = 128,
        d_model: int = 32,
        n_layers: int = 2,
        n_heads: int = 4,
        d_ff: int = 64,
        max_len: int = 16,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos_embed = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model,
                n_heads,
                dim_feedforward=d_ff,
                dropout=0.0,
                batch_first=True,
                norm_first=True,
            )
            for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tie: one Parameter, two names

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.embed(idx) + self.pos_embed(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class LlamaAttention(nn.Module):
    """Grouped-query attention projections, named as in transformers' LlamaAttention."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        head_dim = dim // heads
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=False)


class LlamaMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, dim: int, hidden: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(dim, heads, kv_heads)
        self.mlp = LlamaMLP(dim, hidden)
        self.input_layernorm = RMSNorm(dim)
        self.post_attention_layernorm = RMSNorm(dim)


class LlamaModel(nn.Module):
    def __init__(self, vocab: int, dim: int, hidden: int, layers: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(LlamaDecoderLayer(dim, hidden, heads, kv_heads) for _ in range(layers))
        self.norm = RMSNorm(dim)


class LlamaTiny(nn.Module):
    """The parameter names of transformers' LlamaForCausalLM (deep Hugging Face-style names:
    `model.layers.N.self_attn.q_proj.weight`), at a few thousand parameters per layer. Only the
    weights matter here: mscope reads files and never runs a forward pass."""

    def __init__(self, vocab: int = 256, dim: int = 32, hidden: int = 88, layers: int = 4) -> None:
        super().__init__()
        self.model = LlamaModel(vocab, dim, hidden, layers, heads=4, kv_heads=2)
        self.lm_head = nn.Linear(dim, vocab, bias=False)


def make_cnn() -> SmallCNN:
    seed(0)
    model = SmallCNN()
    # Run a couple of forward passes in train mode so the BatchNorm running
    # stats and num_batches_tracked are not just their initial values.
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 8, 8))
    model.eval()
    return model


def make_transformer() -> TinyTransformerLM:
    seed(1)
    return TinyTransformerLM().eval()


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, sched, steps: int, kind: str) -> None:
    model.train()
    for _ in range(steps):
        if kind == "cnn":
            x = torch.randn(8, 3, 8, 8)
            y = torch.randint(0, 10, (8,))
            loss = F.cross_entropy(model(x), y)
        else:
            x = torch.randn(8, 16)
            y = torch.randint(0, 4, (8,))
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    model.eval()


# --------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------


def write_cnn_state_dict() -> None:
    torch.save(make_cnn().state_dict(), HERE / "cnn_state_dict.pt")


def write_transformer_tied() -> None:
    sd = make_transformer().state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["embed.weight"].data_ptr()
    torch.save(sd, HERE / "transformer_tied.pt")


def write_train_checkpoint() -> None:
    seed(2)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train_steps(model, opt, sched, 3, "cnn")
    ckpt = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": 3,
        "step": 120,
        "best_acc": 0.875,
        "config": {"lr": 1e-3, "batch_size": 32, "arch": "cnn"},
    }
    torch.save(ckpt, HERE / "train_checkpoint.pt")


class LitMLP(nn.Module):
    def __init__(self, in_dim: int = 16, hidden: int = 32, out_dim: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def write_lightning_ckpt() -> None:
    """A checkpoint laid out like pytorch_lightning.Trainer.save_checkpoint() writes it."""
    seed(3)
    inner = LitMLP()
    opt = torch.optim.Adam(inner.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.1)
    train_steps(inner, opt, sched, 1, "mlp")
    # A LightningModule holding ``self.model`` prefixes every key with "model.".
    state_dict = OrderedDict(("model." + k, v) for k, v in inner.state_dict().items())

    def progress(n: int) -> dict:
        return {"ready": n, "completed": n, "started": n, "processed": n}

    mc_key = (
        "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, "
        "'every_n_epochs': 1, 'train_time_interval': None}"
    )
    ckpt = {
        "epoch": 2,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": state_dict,
        "loops": {
            "fit_loop": {
                "state_dict": {},
                "epoch_loop.state_dict": {"_batches_that_stepped": 120},
                "epoch_loop.batch_progress": {
                    "total": progress(120),
                    "current": progress(40),
                    "is_last_batch": True,
                },
                "epoch_progress": {"total": progress(3), "current": progress(3)},
            },
            "validate_loop": {
                "state_dict": {},
                "batch_progress": {"total": progress(8), "current": progress(8)},
            },
            "test_loop": {"state_dict": {}},
            "predict_loop": {"state_dict": {}},
        },
        "callbacks": {
            mc_key: {
                "monitor": "val_loss",
                "best_model_score": torch.tensor(0.4321),
                "best_model_path": "/tmp/lightning_logs/version_0/checkpoints/epoch=2-step=120.ckpt",
                "current_score": torch.tensor(0.4321),
                "dirpath": "/tmp/lightning_logs/version_0/checkpoints",
                "best_k_models": {},
                "kth_best_model_path": "",
                "kth_value": torch.tensor(float("inf")),
                "last_model_path": "",
            }
        },
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [sched.state_dict()],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 1e-3, "hidden": 32, "in_dim": 16, "out_dim": 4, "dropout": 0.1},
    }
    torch.save(ckpt, HERE / "lightning.ckpt")


def write_legacy() -> None:
    torch.save(
        make_cnn().state_dict(), HERE / "legacy_cnn.pt", _use_new_zipfile_serialization=False
    )
    seed(4)
    model = SmallCNN()
    torch.save(
        {"model": model.state_dict(), "epoch": 5},
        HERE / "legacy_train_checkpoint.pt",
        _use_new_zipfile_serialization=False,
    )


def write_scripted() -> None:
    seed(5)
    model = ScriptableCNN().eval()
    for p in model.features[0].parameters():
        p.requires_grad_(False)  # frozen first conv
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript deprecation notices
        scripted = torch.jit.script(model)
        torch.jit.save(scripted, str(HERE / "scripted_cnn.pt"))


def untied_transformer_sd() -> OrderedDict[str, torch.Tensor]:
    sd = make_transformer().state_dict()
    return OrderedDict((k, v.detach().clone().contiguous()) for k, v in sd.items())


def write_transformer_safetensors() -> None:
    from safetensors.torch import save_file

    save_file(
        untied_transformer_sd(),
        str(HERE / "transformer.safetensors"),
        metadata={"format": "pt", "model": "tiny-transformer"},
    )


def write_llama_tiny() -> None:
    """A Llama-like decoder in bfloat16 safetensors, as transformers' save_pretrained writes it
    (untied lm_head, metadata {'format': 'pt'})."""
    from safetensors.torch import save_file

    seed(7)
    sd = LlamaTiny().state_dict()
    sd = OrderedDict((k, v.detach().to(torch.bfloat16).contiguous()) for k, v in sd.items())
    save_file(sd, str(HERE / "llama_tiny.safetensors"), metadata={"format": "pt"})


# llama_tiny.gguf: the GGML type of each llama.cpp tensor (block 32 where rows allow it: the
# model's rows are 32 or 88 values, too short for the 256-value K-quants).
GGUF_TYPES = {
    "token_embd.weight": "Q8_0",
    "output.weight": "Q5_1",
    "output_norm.weight": "F32",
    "attn_norm": "F32",
    "ffn_norm": "F32",
    "attn_q": "Q8_0",
    "attn_k": "Q8_0",
    "attn_v": "Q8_0",
    "attn_output": "Q8_0",
    "ffn_gate": "Q4_0",
    "ffn_up": "Q4_0",
    "ffn_down": "F16",  # rows of 88 values: not whole blocks, as llama.cpp falls back
}


def write_llama_tiny_gguf() -> None:
    """llama_tiny.safetensors as llama.cpp's convert_hf_to_gguf.py + llama-quantize would leave
    it: llama.cpp names (`blk.N.attn_q.weight`), attn_q / attn_k rows permuted for its rotary
    layout (LlamaModel.permute), Q8_0 / Q5_1 / Q4_0 blocks quantized by gguf-py's own
    `gguf.quants.quantize`, norms in F32, ffn_down in F16 (block 3 in BF16), and a 256-token
    vocabulary. Written with gguf.GGUFWriter; needs `pip install gguf`."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    sd = load_file(str(HERE / "llama_tiny.safetensors"))
    heads, kv_heads, layers = 4, 2, 4  # LlamaTiny's
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)

    def permute(w: np.ndarray, n_head: int) -> np.ndarray:  # convert_hf_to_gguf.LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(str(HERE / "llama_tiny.gguf"), "llama")
    writer.add_name("llama_tiny")
    writer.add_context_length(128)
    writer.add_embedding_length(32)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(88)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(253)]
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([2, 3, 3] + [6] * 253)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for hf_name, tensor in sd.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        data = tensor.float().numpy()
        if name.endswith("attn_q.weight"):
            data = permute(data, heads)
        elif name.endswith("attn_k.weight"):
            data = permute(data, kv_heads)
        kind = GGUF_TYPES.get(name) or GGUF_TYPES[name.split(".")[2]]
        if kind == "F16" and name.startswith(f"blk.{layers - 1}."):
            kind = "BF16"
        qtype = gguf.GGMLQuantizationType[kind]
        if kind == "F32":
            writer.add_tensor(name, data.astype(np.float32))
        elif kind == "F16":
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_quant_tiny() -> None:
    """An FP8 + MXFP4 mixture-of-experts decoder layer in the layouts DeepSeek-V3 and gpt-oss
    publish, with every low-precision safetensors dtype: FP8 attention (`weight` F8_E4M3 +
    `weight_scale_inv` F32 per 128x128 block), MXFP4 experts (`*_blocks` U8 [E, rows, cols/32, 16]
    + `*_scales` E8M0, stored as U8 like gpt-oss and as F8_E8M0), an F4 weight with E8M0 scales
    per 32 (MXFP4), bf16 embeddings, norms, router and an untied lm_head."""
    from safetensors.torch import save_file

    seed(16)
    dim, experts, hidden, vocab = 64, 2, 64, 32
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    sd["model.embed_tokens.weight"] = torch.randn(vocab, dim).bfloat16()
    layer = "model.layers.0"
    sd[f"{layer}.input_layernorm.weight"] = torch.ones(dim).bfloat16()
    for proj, rows in (("q_proj", dim), ("k_proj", dim // 2), ("v_proj", dim // 2), ("o_proj", dim)):
        sd[f"{layer}.self_attn.{proj}.weight"] = (torch.randn(rows, dim) * 0.05).to(torch.float8_e4m3fn)
        sd[f"{layer}.self_attn.{proj}.weight_scale_inv"] = torch.full((1, 1), 0.02)
    sd[f"{layer}.post_attention_layernorm.weight"] = torch.ones(dim).bfloat16()
    sd[f"{layer}.mlp.router.weight"] = torch.randn(experts, dim).bfloat16()
    for name, rows, cols, scales_dtype in (
        ("gate_up_proj", 2 * hidden, dim, torch.uint8),  # gpt-oss stores E8M0 scales as U8
        ("down_proj", dim, hidden, torch.float8_e8m0fnu),
    ):
        sd[f"{layer}.mlp.experts.{name}_blocks"] = torch.randint(0, 256, (experts, rows, cols // 32, 16), dtype=torch.uint8)
        scales = torch.randint(118, 128, (experts, rows, cols // 32), dtype=torch.uint8)
        sd[f"{layer}.mlp.experts.{name}_scales"] = scales if scales_dtype is torch.uint8 else scales.view(scales_dtype)
    sd[f"{layer}.mlp.shared_expert.weight"] = torch.randint(0, 256, (dim, hidden // 2), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    sd[f"{layer}.mlp.shared_expert.weight_scale"] = torch.randint(118, 128, (dim, hidden // 32), dtype=torch.uint8).view(torch.float8_e8m0fnu)
    sd["model.norm.weight"] = torch.ones(dim).bfloat16()
    sd["lm_head.weight"] = torch.randn(vocab, dim).bfloat16()
    save_file(sd, str(HERE / "quant_tiny.safetensors"), metadata={"format": "pt"})


def _split_in_two(names: list[str], sizes: dict[str, int]) -> tuple[list[str], list[str]]:
    total = sum(sizes.values())
    first: list[str] = []
    acc = 0
    for name in names:
        if acc >= total / 2:
            break
        first.append(name)
        acc += sizes[name]
    return first, [n for n in names if n not in first]


def write_sharded_hf() -> None:
    """Like transformers' save_pretrained(max_shard_size=...) with safetensors.

    HF drops the tied ``lm_head.weight`` from safetensors checkpoints and
    records ``tie_word_embeddings: true`` in config.json instead.
    """
    from safetensors.torch import save_file

    out = HERE / "sharded_hf"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    sd = untied_transformer_sd()
    del sd["lm_head.weight"]
    sizes = {k: v.numel() * v.element_size() for k, v in sd.items()}
    shards = _split_in_two(list(sd), sizes)
    weight_map = {}
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: sd[n] for n in names}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(
        json.dumps(index, indent=2, sort_keys=True) + "\n"
    )
    config = {
        "architectures": ["TinyTransformerLM"],
        "model_type": "tiny-transformer",
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 16,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "transformers_version": "4.46.0",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_sharded_bin() -> None:
    """Like save_pretrained(safe_serialization=False, max_shard_size=...).

    Here the tied pair is kept (as older transformers did for .bin): tensors
    sharing storage are grouped into the same shard, so shard 1 holds
    ``embed.weight`` and ``lm_head.weight`` on one storage.
    """
    out = HERE / "sharded_bin"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    sd = make_transformer().state_dict()
    names = list(sd)
    # Group by storage so tied tensors land in the same shard; count each storage once.
    groups: OrderedDict[int, list[str]] = OrderedDict()
    for n in names:
        groups.setdefault(sd[n].untyped_storage().data_ptr(), []).append(n)
    group_names = [tuple(g) for g in groups.values()]
    gsize = {g: sd[g[0]].untyped_storage().nbytes() for g in group_names}
    first_g, second_g = _split_in_two(group_names, gsize)  # type: ignore[arg-type]
    weight_map = {}
    for i, gs in enumerate((first_g, second_g), 1):
        fname = f"pytorch_model-{i:05d}-of-00002.bin"
        shard = OrderedDict((n, sd[n]) for g in gs for n in g)
        torch.save(shard, out / fname)
        weight_map.update({n: fname for n in shard})
    index = {"metadata": {"total_size": sum(gsize.values())}, "weight_map": weight_map}
    (out / "pytorch_model.bin.index.json").write_text(
        json.dumps(index, indent=2, sort_keys=True) + "\n"
    )
    config = json.loads((HERE / "sharded_hf" / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_dcp() -> None:
    import torch.distributed.checkpoint as dcp

    out = HERE / "dcp_checkpoint"
    shutil.rmtree(out, ignore_errors=True)
    state = {"model": make_transformer().state_dict(), "step": 7}
    with warnings.catch_warnings():
        # "torch.distributed is disabled, unavailable or uninitialized, assuming
        # the intent is to save in a single process."
        warnings.simplefilter("ignore")
        # DCP pickles checkpoint_id into .metadata (StorageMeta); use a relative
        # path so the committed file does not embed this machine's absolute path.
        cwd = os.getcwd()
        os.chdir(HERE)
        try:
            dcp.save(state, checkpoint_id=out.name)
        finally:
            os.chdir(cwd)


def write_dtypes() -> None:
    seed(6)
    t: OrderedDict[str, object] = OrderedDict()
    t["float32"] = torch.randn(2, 3, dtype=torch.float32)
    t["float64"] = torch.randn(2, 3, dtype=torch.float64)
    t["float16"] = torch.randn(2, 3).to(torch.float16)
    t["bfloat16"] = torch.randn(2, 3).to(torch.bfloat16)
    for name in ("float8_e4m3fn", "float8_e5m2"):
        if hasattr(torch, name):
            t[name] = torch.randn(2, 3).to(getattr(torch, name))
    t["complex64"] = torch.randn(2, 3, dtype=torch.complex64)
    t["complex128"] = torch.randn(2, 3, dtype=torch.complex128)
    t["bool"] = torch.tensor([[True, False, True], [False, False, True]])
    t["int8"] = torch.randint(-128, 128, (2, 3), dtype=torch.int8)
    t["uint8"] = torch.randint(0, 256, (2, 3), dtype=torch.uint8)
    t["int16"] = torch.randint(-1000, 1000, (2, 3), dtype=torch.int16)
    t["int32"] = torch.randint(-100000, 100000, (2, 3), dtype=torch.int32)
    t["int64"] = torch.randint(-(2**40), 2**40, (2, 3), dtype=torch.int64)
    # Layouts / storage sharing.
    t["transposed"] = torch.randn(3, 4).t()  # shape (4, 3), stride (1, 4), not contiguous
    base = torch.arange(10, dtype=torch.float32)
    t["base"] = base
    t["base_slice"] = base[3:7]  # storage_offset 3, shares base's storage
    t["base_view"] = base.view(2, 5)  # same storage, different shape
    t["scalar"] = torch.tensor(3.5)  # 0-dim
    t["empty"] = torch.empty(0, 4)
    t["param_trainable"] = nn.Parameter(torch.randn(3), requires_grad=True)
    t["param_frozen"] = nn.Parameter(torch.randn(3), requires_grad=False)
    torch.save(t, HERE / "dtypes.pt")


# --------------------------------------------------------------------------
# Samples written by child processes
# --------------------------------------------------------------------------

NOTEBOOK_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )
            self.body = nn.Sequential(
                nn.Conv2d(8, 16, 3, padding=1),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
            )
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))

        def forward(self, x):
            return self.head(self.body(self.stem(x)))

    torch.manual_seed(int(sys.argv[2]))
    model = Net()
    with torch.no_grad():
        model(torch.randn(4, 1, 8, 8))  # update BatchNorm running stats
    model.eval()
    for p in model.stem[0].parameters():
        p.requires_grad = False  # frozen first conv
    torch.save(model, sys.argv[1])
    """
)

GONE_PACKAGE_NETS = textwrap.dedent(
    """
    import torch
    import torch.nn as nn


    class Block(nn.Module):
        def __init__(self, d, n_heads):
            super().__init__()
            self.ln_1 = nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, n_heads, batch_first=True)
            self.ln_2 = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

        def forward(self, x):
            h = self.ln_1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.mlp(self.ln_2(x))


    class TinyTransformer(nn.Module):
        def __init__(self, vocab=96, d=32, n_layers=2, n_heads=4, max_len=16):
            super().__init__()
            self.tok = nn.Embedding(vocab, d)
            self.pos = nn.Parameter(torch.zeros(1, max_len, d))
            self.blocks = nn.ModuleList(Block(d, n_heads) for _ in range(n_layers))
            self.ln_f = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab, bias=False)
            self.register_buffer("causal_mask", torch.triu(torch.ones(max_len, max_len, dtype=torch.bool), 1))

        def forward(self, idx):
            x = self.tok(idx) + self.pos[:, : idx.shape[1]]
            for b in self.blocks:
                x = b(x)
            return self.head(self.ln_f(x))
    """
)

GONE_SAVE_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from mscope_gone_models.nets import TinyTransformer

    torch.manual_seed(int(sys.argv[2]))
    torch.save(TinyTransformer().eval(), sys.argv[1])
    """
)


def _run_child(args: list[str], env_extra: dict[str, str] | None = None) -> None:
    env = dict(os.environ)
    if env_extra:
        env.update(env_extra)
    subprocess.run([sys.executable, *args], check=True, env=env)


def write_notebook_full() -> None:
    # ``python -c`` runs the code as __main__, so the pickle refers to __main__.Net.
    _run_child(["-c", NOTEBOOK_SCRIPT, str(HERE / "notebook_full.pt"), str(SEED + 7)])


def write_gone_module_full() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="mscope_gone_"))
    try:
        pkg = tmp / "mscope_gone_models"
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        (pkg / "nets.py").write_text(GONE_PACKAGE_NETS)
        _run_child(
            ["-c", GONE_SAVE_SCRIPT, str(HERE / "gone_module_full.pt"), str(SEED + 8)],
            {"PYTHONPATH": str(tmp), "PYTHONDONTWRITEBYTECODE": "1"},
        )
    finally:
        shutil.rmtree(tmp)


def main() -> None:
    # TorchScript writes class constants in set-iteration order, which depends on
    # str hash randomization; pin it so scripted_cnn.pt is byte-reproducible.
    if os.environ.get("PYTHONHASHSEED") != "0":
        env = dict(os.environ, PYTHONHASHSEED="0")
        os.execve(
            sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], env
        )
    writers = [
        write_cnn_state_dict,
        write_transformer_tied,
        write_notebook_full,
        write_gone_module_full,
        write_train_checkpoint,
        write_lightning_ckpt,
        write_legacy,
        write_scripted,
        write_transformer_safetensors,
        write_sharded_hf,
        write_sharded_bin,
        write_dcp,
        write_dtypes,
        write_llama_tiny,
        write_llama_tiny_gguf,
        write_quant_tiny,
    ]
    only = set(sys.argv[1:])  # e.g. `make_samples.py write_llama_tiny`: just those
    for w in writers:
        if only and w.__name__ not in only:
            continue
        w()
        print(f"ok  {w.__name__}")


if __name__ == "__main__":
    main()
