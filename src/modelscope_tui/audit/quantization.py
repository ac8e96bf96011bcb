"""Quantization: which scheme each quantized layer uses (quant.py recognised them when the file
was opened), and layers left unquantized next to quantized siblings. Metadata only.

A layer left in full precision beside quantized ones is often deliberate (the checkpoint's
`modules_to_not_convert` / `ignore` list says so, and such layers are not flagged), but when it is
not listed it is the mark of a conversion that stopped part way or a name its quantizer missed;
either way it costs memory that a memory estimate built from the scheme does not expect.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import TYPE_CHECKING

from ..checkpoint import GRAD_DTYPES, PARAMETER, Checkpoint
from ..quant import QuantConfig
from ..units import fmt_bytes
from .checks import AuditRun, Check
from .findings import Finding, finding

if TYPE_CHECKING:
    from .findings import AuditReport

# MoE routers stay in full precision in every quantizer's defaults (gpt-oss's config,
# llm-compressor's `re:.*mlp.gate$`): tiny, and their logits pick the experts.
ROUTERS = frozenset({"router", "gate"})
MAX_LISTED = 50  # unquantized layers reported one by one; the rest in one finding
_BLOCK = re.compile(r"(?<=\.)\d+(?=\.)")


def check_quantization(ckpt: Checkpoint) -> list[Finding]:
    model = [t for t in ckpt.tensors if t.section == ""]
    quantized = [t for t in model if t.quant is not None]
    if not quantized:
        return []
    out: list[Finding] = []
    by_scheme: dict[str, list] = defaultdict(list)
    for t in quantized:
        by_scheme[t.quant.scheme].append(t)
    for scheme, ts in sorted(by_scheme.items(), key=lambda kv: -len(kv[1])):
        logical = sum(t.quant.logical_numel for t in ts)
        nbytes = sum(t.quant.nbytes for t in ts)
        out.append(
            finding(
                "quantized-layers",
                f"{len(ts):,} weight(s) quantized as {scheme}: {logical:,} parameters in {fmt_bytes(nbytes)} "
                f"({8 * nbytes / max(logical, 1):.2f} bits/param), e.g. {ts[0].quant.logical_name}",
                ts[0].name,
                scheme=scheme,
                method=ts[0].quant.method,
                weights=len(ts),
                parameters=logical,
                bytes=nbytes,
                layers={t.quant.logical_name: scheme for t in ts},
            )
        )

    config = ckpt.metadata.get("quantization_config") or {}
    skipped = QuantConfig(skipped=tuple(config.get("skipped_modules") or ()))
    # Modules holding a quantized weight, by parent (siblings) and by name with block numbers
    # masked (the same layer in another block).
    quantized_modules = {t.quant.logical_name.rpartition(".")[0] for t in quantized}
    parents_with_quant = {m.rpartition(".")[0] for m in quantized_modules}
    masked_quant = {_BLOCK.sub("*", m) for m in quantized_modules}
    plain = []
    # llama-quantize keeps some tensors wider on purpose (rows that are not whole blocks, the
    # K-quant mixes' ffn_down): its GGUF files have no config to check a choice against.
    judged = model if any(t.quant.method != "gguf" for t in quantized) else []
    for t in judged:
        if t.kind != PARAMETER or t.quant is not None or t.companion_of is not None:
            continue
        if len(t.shape) < 2 or t.dtype not in GRAD_DTYPES or t.name.rpartition(".")[2] != "weight":
            continue
        module = t.name.rpartition(".")[0]
        if (
            module in quantized_modules
            or skipped.skips(module)
            or module.rpartition(".")[2] in ROUTERS
        ):
            continue
        parent = module.rpartition(".")[0]
        if (module and parent in parents_with_quant) or _BLOCK.sub("*", module) in masked_quant:
            plain.append(t)
    for t in plain[:MAX_LISTED]:
        module = t.name.rpartition(".")[0]
        out.append(
            finding(
                "unquantized-layer",
                f"{module} keeps {t.dtype} weights ({fmt_bytes(t.nbytes)}) next to quantized siblings "
                "and is not in the config's modules_to_not_convert / ignore list",
                t.name,
                dtype=t.dtype,
                bytes=t.nbytes,
            )
        )
    if len(plain) > MAX_LISTED:
        rest = plain[MAX_LISTED:]
        out.append(
            finding(
                "unquantized-layer",
                f"{len(rest):,} more layer(s) keep full-precision weights next to quantized siblings "
                f"({fmt_bytes(sum(t.nbytes for t in rest))}), e.g. {rest[0].name}",
                rest[0].name,
                layers=len(rest),
            )
        )
    return out


class Quantization(Check):
    order = 35

    def run(self, run: AuditRun, report: AuditReport) -> None:
        report.findings += check_quantization(run.ckpt)
