"""Generate one large benchmark input. Run by bench_summary.py in a child process.

    python bench/_make_bench_data.py NAME OUT_PATH

Generation runs in its own process so the benchmark driver never imports
torch or touches gigabytes itself (a child's ru_maxrss starts at its parent's
peak RSS, see bench_summary.py). Files are written to ``OUT_PATH.tmp`` and
renamed, so an interrupted run never leaves a truncated file to be reused.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent

# GPT-style 1.3B (GPT-3 XL / GPT-Neo 1.3B shape): 24 layers, d_model 2048.
GPT_1P3B = dict(vocab=50257, n_ctx=2048, d_model=2048, n_layer=24)


def gpt_1p3b_tensors(dtype: torch.dtype = torch.float16) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) in GPT-2 naming (Conv1D weights are (in, out))."""
    v, n_ctx, d, n_layer = (GPT_1P3B[k] for k in ("vocab", "n_ctx", "d_model", "n_layer"))
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype).mul_(0.02)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=dtype)

    def zeros(n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=dtype)

    yield "transformer.wte.weight", randn(v, d)
    yield "transformer.wpe.weight", randn(n_ctx, d)
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        yield p + "ln_1.weight", ones(d)
        yield p + "ln_1.bias", zeros(d)
        yield p + "attn.c_attn.weight", randn(d, 3 * d)
        yield p + "attn.c_attn.bias", zeros(3 * d)
        yield p + "attn.c_proj.weight", randn(d, d)
        yield p + "attn.c_proj.bias", zeros(d)
        yield p + "ln_2.weight", ones(d)
        yield p + "ln_2.bias", zeros(d)
        yield p + "mlp.c_fc.weight", randn(d, 4 * d)
        yield p + "mlp.c_fc.bias", zeros(4 * d)
        yield p + "mlp.c_proj.weight", randn(4 * d, d)
        yield p + "mlp.c_proj.bias", zeros(d)
    yield "transformer.ln_f.weight", ones(d)
    yield "transformer.ln_f.bias", zeros(d)


def _tmp(out: Path) -> Path:
    return out.with_name(out.name + ".tmp")


def make_gpt_1p3b(out: Path) -> None:
    sd = OrderedDict(gpt_1p3b_tensors())
    n = sum(t.numel() for t in sd.values())
    print(f"  {len(sd)} tensors, {n / 1e9:.3f}B params", flush=True)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(_tmp(out)), metadata={"format": "pt"})
    else:
        torch.save(sd, _tmp(out))
    os.replace(_tmp(out), out)


def make_gpt2_medium_full(out: Path) -> None:
    sys.path.insert(0, str(BENCH_DIR))
    from _gpt_model import GPT2LMHeadModel  # pickled as _gpt_model.GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel().eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"  {n / 1e6:.1f}M params (lm_head tied to wte)", flush=True)
    torch.save(model, _tmp(out))
    os.replace(_tmp(out), out)


def make_state_dict_100k(out: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    sd = OrderedDict()
    for i in range(10_000):
        for j in range(10):
            shape = (4,) if j % 2 == 0 else (2, 3)
            sd[f"layers.{i}.block.{j}.weight"] = torch.randn(shape, generator=gen)
    torch.save(sd, _tmp(out))
    os.replace(_tmp(out), out)


# Llama-2-7B (meta-llama/Llama-2-7b-hf config.json): 32 layers, hidden 4096, MLP 11008, vocab 32000.
LLAMA2_7B = dict(layers=32, hidden=4096, mlp=11008, vocab=32000)
NF4_BLOCK, NESTED_BLOCK = 64, 256  # bitsandbytes' 4-bit blocksize and double-quant blocksize


def llama2_7b_nf4_entries() -> Iterator[tuple[str, str, tuple[int, ...], bytes | None]]:
    """(name, safetensors dtype, shape, bytes or None for zeros) in the order
    `LlamaForCausalLM.from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)).save_pretrained()` writes them:
    each Linear4bit weight as bitsandbytes' state_dict has it (Params4bit: packed uint8 [n/2, 1],
    `absmax` uint8 (double-quantized), `quant_map` F32 [16], `nested_absmax` F32, `nested_quant_map`
    F32 [256], `quant_state.bitsandbytes__nf4` the JSON state as uint8); embeddings, norms and
    lm_head stay fp16 (bitsandbytes skips lm_head)."""
    import json
    import math
    import struct

    h, m, v = LLAMA2_7B["hidden"], LLAMA2_7B["mlp"], LLAMA2_7B["vocab"]
    nf4_map = struct.pack("<16f", *[i / 15 * 2 - 1 for i in range(16)])
    nested_map = struct.pack("<256f", *[i / 255 * 2 - 1 for i in range(256)])
    ones = struct.pack("<e", 1.0)
    yield "model.embed_tokens.weight", "F16", (v, h), None
    for i in range(LLAMA2_7B["layers"]):
        p = f"model.layers.{i}"
        for name, (out, inp) in (
            ("self_attn.q_proj", (h, h)),
            ("self_attn.k_proj", (h, h)),
            ("self_attn.v_proj", (h, h)),
            ("self_attn.o_proj", (h, h)),
            ("mlp.gate_proj", (m, h)),
            ("mlp.up_proj", (m, h)),
            ("mlp.down_proj", (h, m)),
        ):
            n = out * inp
            blocks = math.ceil(n / NF4_BLOCK)
            nested = math.ceil(blocks / NESTED_BLOCK)
            state = json.dumps(
                {
                    "quant_type": "nf4",
                    "blocksize": NF4_BLOCK,
                    "dtype": "float16",
                    "shape": [out, inp],
                    "nested_blocksize": NESTED_BLOCK,
                    "nested_dtype": "float32",
                    "nested_offset": 0.0123,
                }
            ).encode()
            w = f"{p}.{name}.weight"
            yield w, "U8", ((n + 1) // 2, 1), None
            yield f"{w}.absmax", "U8", (blocks,), None
            yield f"{w}.quant_map", "F32", (16,), nf4_map
            yield f"{w}.nested_absmax", "F32", (nested,), None
            yield f"{w}.nested_quant_map", "F32", (256,), nested_map
            yield f"{w}.quant_state.bitsandbytes__nf4", "U8", (len(state),), state
        yield f"{p}.input_layernorm.weight", "F16", (h,), ones * h
        yield f"{p}.post_attention_layernorm.weight", "F16", (h,), ones * h
    yield "model.norm.weight", "F16", (h,), ones * h
    yield "lm_head.weight", "F16", (v, h), None


def make_llama2_7b_nf4(out: Path) -> None:
    """A safetensors file in exactly bitsandbytes' nf4 layout, written by hand: the header, the
    small tensors' real bytes, and the packed weights and embeddings as holes (a sparse file of
    zeros: seconds to write, ~3.8 GB to read). config.json beside it, as save_pretrained writes."""
    import json

    itemsize = {"F16": 2, "F32": 4, "U8": 1}
    header: dict = {"__metadata__": {"format": "pt"}}
    writes = []
    offset = 0
    for name, dtype, shape, data in llama2_7b_nf4_entries():
        size = itemsize[dtype]
        for d in shape:
            size *= d
        assert data is None or len(data) == size, name
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        if data is not None:
            writes.append((offset, data))
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    base = 8 + len(blob)
    tmp = _tmp(out)
    with open(tmp, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little") + blob)
        for at, data in writes:
            fh.seek(base + at)
            fh.write(data)
        fh.truncate(base + offset)
    params = sum(1 for k in header if k.endswith("proj.weight"))
    print(f"  {len(header) - 1} tensors ({params} nf4 weights), {(base + offset) / 1e9:.2f} GB", flush=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": LLAMA2_7B["hidden"],
        "intermediate_size": LLAMA2_7B["mlp"],
        "num_hidden_layers": LLAMA2_7B["layers"],
        "vocab_size": LLAMA2_7B["vocab"],
        "torch_dtype": "float16",
        "quantization_config": {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "float16",
            "llm_int8_skip_modules": None,
        },
    }
    (out.parent / "config.json").write_text(json.dumps(cfg, indent=2))
    os.replace(tmp, out)


MAKERS = {
    "llama2_7b_nf4/model.safetensors": make_llama2_7b_nf4,
    "gpt_1p3b_fp16.pt": make_gpt_1p3b,
    "gpt_1p3b_fp16.safetensors": make_gpt_1p3b,
    "gpt2_medium_full.pt": make_gpt2_medium_full,
    "state_dict_100k.pt": make_state_dict_100k,
}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in MAKERS:
        print(f"usage: {Path(__file__).name} {{{','.join(MAKERS)}}} OUT_PATH", file=sys.stderr)
        return 2
    name, out = argv[0], Path(argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    MAKERS[name](out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
