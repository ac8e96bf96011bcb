"""Which tensor of A is which tensor of B: by name, within the model (or every section), and
through a common prefix one side adds or strips (DDP's `module.`, torch.compile's `_orig_mod.`).
"""

from __future__ import annotations

from ..checkpoint import BLOCK_DTYPES, Checkpoint, Format, TensorRecord, block_index

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


MAX_NAME_MAP_BLOCKS = 4096  # llama.cpp's map is built per block: bounded, whatever a file says


def llama_cpp_map(
    a: Checkpoint, b: Checkpoint, ta: dict[str, TensorRecord], tb: dict[str, TensorRecord]
) -> tuple[dict[str, str], str | None]:
    """A name -> B name when exactly one side is GGUF: the other side's (Hugging Face) names
    through llama.cpp's naming map (gguf-py's TensorNameMap for the GGUF's architecture), e.g.
    `model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`. Empty when neither or
    both are GGUF; the note says why no map was used, or what it matched."""
    if (a.format == Format.GGUF) == (b.format == Format.GGUF):
        return {}, None
    gguf_side, hf_names, gguf_names = (b, ta, tb) if b.format == Format.GGUF else (a, tb, ta)
    arch = (gguf_side.metadata.get("gguf") or {}).get("architecture")
    try:
        import gguf
    except ImportError:
        return {}, "pairing with a GGUF file by llama.cpp's names needs the gguf package: pip install 'modelscope-tui[gguf]'"
    model_arch = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    if model_arch is None:
        return {}, f"llama.cpp's naming map has no architecture {str(arch)[:40]!r}: tensors paired by name only"
    blocks = 0
    for name in list(hf_names) + list(gguf_names):
        for part in name.split("."):
            n = block_index(part)
            if n is not None and n < MAX_NAME_MAP_BLOCKS:
                blocks = max(blocks, n + 1)
    try:
        name_map = gguf.get_tensor_name_map(model_arch, blocks)
    except Exception as exc:  # a gguf-py bug must not end the diff
        return {}, f"llama.cpp's naming map failed ({type(exc).__name__}): tensors paired by name only"
    pairs: dict[str, str] = {}
    taken: set[str] = set()
    for name in hf_names:
        mapped = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is not None and mapped in gguf_names and mapped not in taken:
            taken.add(mapped)
            pairs[name] = mapped
    if gguf_side is a:
        pairs = {g: h for h, g in pairs.items()}
    return pairs, f"paired through llama.cpp's naming map ({arch}, {blocks} blocks): {len(pairs):,} tensors"


def logical_map(
    ta: dict[str, TensorRecord], tb: dict[str, TensorRecord], mapping: dict[str, str]
) -> tuple[dict[str, str], set[str], set[str]]:
    """`mapping` with each quantized weight paired to the plain weight of the other side that
    has its logical name and shape (`q_proj.weight` bf16 [4096, 4096] <-> packed nf4, or GPTQ's
    `q_proj.qweight`), and the companions (scales, zero points, quant state) of those weights
    that nothing pairs: (mapping, A's, B's), to fold under their weight rather than list as
    removed / added."""
    mapping = dict(mapping)
    drop_a: set[str] = set()
    drop_b: set[str] = set()
    for side, quant_side, plain_side in (("b", tb, ta), ("a", ta, tb)):
        for qname, rq in quant_side.items():
            info = rq.quant
            if info is None or info.method == "gguf":  # GGUF pairs through llama.cpp's names
                continue
            plain = plain_side.get(info.logical_name)
            if plain is None or plain.quant is not None or tuple(plain.shape) != info.logical_shape:
                continue
            an, bn = (info.logical_name, qname) if side == "b" else (qname, info.logical_name)
            for other, target in list(mapping.items()):
                if other == an or target == bn:
                    del mapping[other]
            mapping[an] = bn
            (drop_b if side == "b" else drop_a).update(info.companions)
    paired_a, paired_b = set(mapping), set(mapping.values())
    return mapping, drop_a - paired_a, drop_b - paired_b


def quantized_note(pairs: list[tuple[TensorRecord, TensorRecord]]) -> str | None:
    """Which paired tensors went from a plain dtype to a GGML block type or a quantization
    scheme (or back), and to what: `26 tensor(s) quantized: bfloat16 -> Q8_0 x17, ...`."""
    moves: dict[str, dict[str, int]] = {"quantized": {}, "dequantized": {}}
    for ra, rb in pairs:
        if (ra.quant is None) != (rb.quant is None) and ra.dtype not in BLOCK_DTYPES and rb.dtype not in BLOCK_DTYPES:
            way = moves["quantized" if rb.quant is not None else "dequantized"]
            key = f"{quant_label(ra)} -> {quant_label(rb)}"
            way[key] = way.get(key, 0) + 1
        elif ra.dtype != rb.dtype and (ra.dtype in BLOCK_DTYPES or rb.dtype in BLOCK_DTYPES):
            way = moves["quantized" if rb.dtype in BLOCK_DTYPES else "dequantized"]
            key = f"{ra.dtype} -> {rb.dtype}"
            way[key] = way.get(key, 0) + 1
    lines = []
    for way, counts in moves.items():
        if counts:
            listed = ", ".join(f"{k} x{v:,}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
            lines.append(f"{sum(counts.values()):,} tensor(s) {way}: {listed}")
    return "; ".join(lines) or None


def quant_label(r: TensorRecord) -> str:
    """A record's scheme when it is a quantized weight, else its dtype."""
    return r.quant.scheme if r.quant is not None else r.dtype


# llama.cpp's converter reorders the rows of these for its rotary layout (convert_hf_to_gguf.py,
# LlamaModel.permute): per head, the two halves of the rows are interleaved.
ROTARY_PERMUTED = {"attn_q": "head_count", "attn_k": "head_count_kv"}


def rotary_heads(a: Checkpoint, b: Checkpoint, pairs: dict[str, str]) -> dict[str, tuple[str, int]]:
    """A name -> (the GGUF side, "a" or "b"; heads) for paired llama tensors whose GGUF rows
    llama.cpp permuted, so the comparison can put them back in the Hugging Face order."""
    if (a.format == Format.GGUF) == (b.format == Format.GGUF):
        return {}
    side = "b" if b.format == Format.GGUF else "a"
    meta = (b if side == "b" else a).metadata.get("gguf") or {}
    if meta.get("architecture") != "llama":
        return {}
    out: dict[str, tuple[str, int]] = {}
    for an, bn in pairs.items():
        gguf_name = bn if side == "b" else an
        parts = gguf_name.split(".")
        key = ROTARY_PERMUTED.get(parts[2]) if len(parts) == 4 and parts[0] == "blk" else None
        heads = meta.get(key) if key else None
        if key == "head_count_kv" and heads is None:
            heads = meta.get("head_count")
        if isinstance(heads, int) and not isinstance(heads, bool) and heads > 0:
            out[an] = (side, heads)
    return out
