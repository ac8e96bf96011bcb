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


MAKERS = {
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
