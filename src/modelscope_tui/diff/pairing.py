"""Which tensor of A is which tensor of B: by name, within the model (or every section), and
through a common prefix one side adds or strips (DDP's `module.`, torch.compile's `_orig_mod.`).
"""

from __future__ import annotations

from ..checkpoint import Checkpoint, TensorRecord

PREFIXES = (
    "module.",
    "model.",
    "_orig_mod.",
    "model.module.",
    "transformer.",
    "base_model.model.",
)


def tensors_by_name(ckpt: Checkpoint, sections: str) -> dict[str, TensorRecord]:
    """The tensors a diff compares, by name: the model's ("model"), or every section's under
    qualified names ("all"). The first of a repeated name wins."""
    out: dict[str, TensorRecord] = {}
    for t in ckpt.tensors:
        if sections == "model" and t.section != "":
            continue
        out.setdefault(t.name if sections == "model" else t.qualified_name, t)
    return out


def prefix_map(
    a: dict[str, TensorRecord], b: dict[str, TensorRecord]
) -> tuple[dict[str, str], str | None]:
    """A name -> B name. Identity, unless stripping or adding a common prefix ("module." from
    DDP, "_orig_mod." from torch.compile...) matches clearly more names."""
    best = {n: n for n in a if n in b}
    note = None
    if len(best) >= 0.5 * min(len(a), len(b)):
        return best, None
    for p in PREFIXES:
        strip_a = {n: n[len(p) :] for n in a if n.startswith(p) and n[len(p) :] in b}
        add_a = {n: p + n for n in a if p + n in b}
        for mapping, how in (
            (strip_a, f"A's names start with {p!r}"),
            (add_a, f"B's names start with {p!r}"),
        ):
            if len(mapping) > len(best):
                best, note = mapping, f"{how}; matched {len(mapping):,} tensors without it"
    return best, note
