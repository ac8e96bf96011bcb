"""Waste: views saved with their whole base storage, optimizer state's share of the file, and
float32 copies next to half-precision weights. Metadata only (duplicates read bytes: see
duplicates.py).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

from ..checkpoint import DTYPE_ITEMSIZE, Checkpoint, TensorRecord, dims_key
from ..units import fmt_bytes
from .checks import AuditRun, Check
from .findings import Finding, finding

if TYPE_CHECKING:
    from .findings import AuditReport

OVERSIZED_RATIO = 2.0
OVERSIZED_MIN_WASTE = 64 << 10
_OPT_MOMENTS = (
    "exp_avg",
    "exp_avg_sq",
    "momentum_buffer",
    "square_avg",
    "max_exp_avg_sq",
    "sum",
    "acc_delta",
)
HALF_DTYPES = ("float16", "bfloat16")


def check_waste(ckpt: Checkpoint) -> tuple[list[Finding], dict[str, Any]]:
    out: list[Finding] = []
    totals = ckpt.totals()
    info: dict[str, Any] = {"file_tensor_bytes": totals.file_bytes}

    # A view saved with its whole base: torch.save writes the entire storage.
    views: dict[int, list[TensorRecord]] = defaultdict(list)
    storages = {}
    for t in ckpt.tensors:
        if t.storage is not None:
            views[id(t.storage)].append(t)
            storages[id(t.storage)] = t.storage
    oversized = []
    for sid, ts in views.items():
        s = storages[sid]
        if s.nbytes == 0:
            continue
        spans = []
        for t in ts:
            if t.numel == 0:
                continue
            last = t.storage_offset + sum((n - 1) * st for n, st in zip(t.shape, t.stride))
            spans.append((t.storage_offset, last + 1))
        used = _union_length(spans) * DTYPE_ITEMSIZE.get(s.dtype, 1)
        wasted = s.nbytes - used
        if wasted >= OVERSIZED_MIN_WASTE and s.nbytes >= OVERSIZED_RATIO * max(used, 1):
            t = max(ts, key=lambda x: x.nbytes)
            ratio = s.nbytes / max(used, 1)
            oversized.append(
                {"tensor": t.qualified_name, "storage_bytes": s.nbytes, "used_bytes": used}
            )
            out.append(
                finding(
                    "oversized-storage",
                    f"{t.qualified_name} {list(t.shape)} uses {fmt_bytes(used)} of a "
                    f"{fmt_bytes(s.nbytes)} storage ({ratio:.0f}x): it was saved with its whole base; "
                    "save tensor.clone() instead",
                    t.qualified_name,
                    storage_bytes=s.nbytes,
                    used_bytes=used,
                )
            )
    info["oversized_storages"] = oversized
    info["oversized_waste_bytes"] = sum(o["storage_bytes"] - o["used_bytes"] for o in oversized)

    # Optimizer state.
    opt_bytes = sum(
        totals.sections.get(name.split(".", 1)[0], {}).get("bytes", 0)
        for name, role in ckpt.sections.items()
        if role == "optimizer"
    )
    info["optimizer_bytes"] = opt_bytes
    info["optimizer_share"] = opt_bytes / totals.file_bytes if totals.file_bytes else 0.0
    if opt_bytes:
        out.append(
            finding(
                "optimizer-state",
                f"optimizer state is {fmt_bytes(opt_bytes)} ({100 * info['optimizer_share']:.0f}% of the "
                f"file's tensor bytes); an inference copy needs only the model ({fmt_bytes(totals.nbytes)})",
                bytes=opt_bytes,
            )
        )

    # fp32 copies next to half-precision weights.
    model = [t for t in ckpt.tensors if t.section == "" and t.alias_of is None]
    half_shapes = Counter(dims_key(t.shape) for t in model if t.dtype in HALF_DTYPES and len(t.shape) >= 1)
    copies = []
    if half_shapes:
        half_bytes = sum(t.nbytes for t in model if t.dtype in HALF_DTYPES)
        model_bytes = sum(t.nbytes for t in model) or 1
        for t in ckpt.tensors:
            if (
                t.dtype != "float32"
                or t.alias_of is not None
                or t.numel < 2
                or dims_key(t.shape) not in half_shapes
            ):
                continue
            leaf = t.name.rsplit(".", 1)[-1]
            if t.section:
                if (
                    ckpt.sections.get(t.section.split(".", 1)[0]) == "optimizer"
                    and leaf in _OPT_MOMENTS
                ):
                    continue
                copies.append(t)
            elif half_bytes >= model_bytes / 2 and len(t.shape) >= 2:
                copies.append(t)
    if copies:
        b = sum(t.nbytes for t in copies)
        info["fp32_copies"] = {
            "tensors": len(copies),
            "bytes": b,
            "examples": [t.qualified_name for t in copies[:5]],
        }
        out.append(
            finding(
                "fp32-copies",
                f"{len(copies)} float32 tensor(s) ({fmt_bytes(b)}) have the shapes of half-precision "
                f"weights (master copies?), e.g. {copies[0].qualified_name}",
                copies[0].qualified_name,
                tensors=len(copies),
                bytes=b,
            )
        )
    else:
        info["fp32_copies"] = {"tensors": 0, "bytes": 0, "examples": []}
    return out, info


def _union_length(spans: list[tuple[int, int]]) -> int:
    total = 0
    end = None
    for a, b in sorted(spans):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


class Waste(Check):
    order = 30

    def run(self, run: AuditRun, report: AuditReport) -> None:
        found, report.waste = check_waste(run.ckpt)
        report.findings += found
