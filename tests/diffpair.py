"""A before/after pair of real checkpoints for diff-mode tests (deterministic values, no RNG).

A (`before.pt`, torch.save zip): embed, blocks.0-2 (attn, mlp, norm), head, old_proj, dropped.
B (`after.safetensors`): blocks.2 fine-tuned (changed), blocks.1.norm.weight moved within
tolerance (close), head reshaped 10x16 -> 12x16, blocks.0.mlp.bias cast to float16, old_proj
renamed to proj (same bytes), blocks.1.attn.bias removed, the `dropped` module removed, and an
`adapter` module added.

`python tests/diffpair.py DIR` writes the pair into DIR (for trying diff mode by hand).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path


def _values(n: int, seed: float):
    import torch

    return torch.sin(torch.arange(n, dtype=torch.float64) * 0.7 + seed).float()


def before_state_dict() -> OrderedDict:
    sd = OrderedDict()
    sd["embed.weight"] = _values(32 * 16, 0.1).reshape(32, 16)
    for i in range(3):
        sd[f"blocks.{i}.attn.weight"] = _values(256, 1 + i).reshape(16, 16)
        sd[f"blocks.{i}.attn.bias"] = _values(16, 2 + i) * 0.1
        sd[f"blocks.{i}.mlp.weight"] = _values(512, 3 + i).reshape(32, 16)
        sd[f"blocks.{i}.mlp.bias"] = _values(32, 4 + i) * 0.1
        sd[f"blocks.{i}.norm.weight"] = 1 + 0.01 * _values(16, 5 + i)
        sd[f"blocks.{i}.norm.bias"] = 0.01 * _values(16, 6 + i)
    sd["head.weight"] = _values(160, 7).reshape(10, 16)
    sd["old_proj.weight"] = _values(128, 8).reshape(8, 16)
    sd["dropped.weight"] = _values(16, 9).reshape(4, 4)
    return sd


def after_state_dict(before: OrderedDict) -> OrderedDict:
    import torch

    sd = OrderedDict((k, v.clone()) for k, v in before.items())
    for k in [k for k in sd if k.startswith("blocks.2.")]:
        sd[k] = sd[k] + 0.01 * _values(sd[k].numel(), 11).reshape(sd[k].shape)  # fine-tuned
    sd["blocks.1.norm.weight"] = sd["blocks.1.norm.weight"] * (1 + 1e-7)  # within tolerance
    sd["head.weight"] = _values(192, 12).reshape(12, 16)  # a new head size
    sd["blocks.0.mlp.bias"] = sd["blocks.0.mlp.bias"].to(torch.float16)  # cast
    sd["proj.weight"] = sd.pop("old_proj.weight")  # renamed, same bytes
    del sd["blocks.1.attn.bias"]
    del sd["dropped.weight"]
    sd["adapter.lora_A"] = _values(64, 13).reshape(4, 16)
    sd["adapter.lora_B"] = torch.zeros(16, 4)
    return sd


def write_pair(directory: Path) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    a = before_state_dict()
    b = after_state_dict(a)
    torch.save(a, directory / "before.pt")
    save_file({k: v.contiguous() for k, v in b.items()}, directory / "after.safetensors")
    return directory / "before.pt", directory / "after.safetensors"


if __name__ == "__main__":
    print(*write_pair(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
