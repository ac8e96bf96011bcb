"""Statistics (--stats): every tensor's values streamed once (values.stream.stream_stats), the
flags turned into findings by where the tensor lives, and the per-block norm profile with its
outliers (norms.norm_profile).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from ..checkpoint import GRAD_DTYPES, Checkpoint, TensorRecord
from ..errors import MscopeError
from ..summary import optimizer_param_names
from ..values.chunks import LAYOUT
from ..values.stats import EXPLODING_ABS
from ..values.stream import default_threads, stream_stats
from .checks import AuditRun, Check
from .findings import INFO, Finding, finding
from .norms import norm_profile

if TYPE_CHECKING:
    from .findings import AuditReport


def _run_stats(report: AuditReport, run: AuditRun) -> None:
    """Statistics of every readable tensor into `report.stats` (a view repeated over the same
    storage is read once), then their findings, also when cancelled part way."""
    from ..values.data import TensorData

    ckpt, bad, chunk_bytes, threads = run.ckpt, run.unreadable, run.chunk_bytes, run.threads

    records = []
    by_view: dict[tuple, TensorRecord] = {}
    copies: list[tuple[TensorRecord, TensorRecord]] = []
    skipped: list[dict[str, Any]] = []
    no_stats = Counter()
    for t in ckpt.tensors:
        if id(t) in bad or t.storage is None:
            continue
        if t.dtype not in LAYOUT:
            no_stats[t.dtype] += 1
            skipped.append({"tensor": t.qualified_name, "reason": f"dtype {t.dtype}"})
            continue
        view = (id(t.storage), t.storage_offset, t.shape, t.stride, t.dtype)
        first = by_view.get(view)
        if first is not None:  # the same view of the same storage: same values
            copies.append((t, first))
            continue
        by_view[view] = t
        records.append(t)
    # Read in file order: sequential pages, one pass over each file.
    records.sort(key=lambda t: (str(t.storage.file), t.storage.data_offset or 0, t.storage_offset))
    for dtype, n in no_stats.items():
        report.findings.append(
            finding("no-stats", f"{n} tensor(s) of dtype {dtype}: no statistics")
        )
    cluster = run.cluster
    threads = cluster.threads if cluster is not None else (threads or default_threads())
    report.param_names = optimizer_param_names(ckpt)
    t0 = time.perf_counter()
    errors: list[Finding] = []

    def on_error(r: TensorRecord, exc: MscopeError) -> None:
        errors.append(
            finding("unreadable-tensor", f"{r.qualified_name}: {exc.message}", r.qualified_name)
        )

    done = 0
    try:
        if cluster is not None:  # workers read; the same stats in the same order
            from ..values.cluster import cluster_stats

            for r, st in cluster_stats(
                cluster, ckpt, records, chunk_bytes, run.progress, run.cancel, on_error
            ):
                report.stats[r.qualified_name] = st
                done += r.nbytes
        else:
            with TensorData() as data:
                for r, st in stream_stats(
                    data, records, chunk_bytes, threads, run.progress, run.cancel, on_error
                ):
                    report.stats[r.qualified_name] = st
                    done += r.nbytes
    finally:
        report.findings += errors
        for t, first in copies:
            st = report.stats.get(first.qualified_name)
            if st is not None:
                report.stats[t.qualified_name] = dataclasses.replace(
                    st, name=t.qualified_name, flags=list(st.flags)
                )
        seconds = time.perf_counter() - t0
        report.stats_info = {
            "bytes_read": done,
            "seconds": round(seconds, 3),
            "threads": threads,
            "chunk_bytes": chunk_bytes,
            "skipped": skipped,
        }
        _stat_findings(report, ckpt)


def _stat_findings(report: AuditReport, ckpt: Checkpoint) -> None:
    """Findings from the flags. Model tensors get every flag (all-zero / constant 1-D tensors,
    biases and norm weights at init, as notes). Optimizer state: only NaN / Inf (tiny or zero
    moments are normal). Anything else (callbacks, metrics): NaN / Inf as notes, since
    `best_score = inf` is a common sentinel."""
    records = {t.qualified_name: t for t in ckpt.tensors}
    for name, st in report.stats.items():
        t = records.get(name)
        one_d = t is not None and len(t.shape) <= 1
        section = t.section.split(".", 1)[0] if t is not None else ""
        role = "model" if not section else ckpt.sections.get(section, "other")
        if role != "model":
            st.flags = [f for f in st.flags if f in ("nan", "inf")]
        elif t is not None and (t.companion_of is not None or (t.quant is not None and t.dtype not in GRAD_DTYPES)):
            # Packed codes and a quantizer's scales, zero points and format tags: zeros and
            # repeats are what they encode, not a defect; NaN / Inf in float scales still are.
            st.flags = [f for f in st.flags if f in ("nan", "inf")]
        for flag in st.flags:
            if flag == "nan":
                msg = f"{name}: {st.nan:,} NaN value(s) of {st.numel:,}"
            elif flag == "inf":
                msg = f"{name}: {st.inf:,} infinite value(s) of {st.numel:,}"
            elif flag == "all-zero":
                msg = f"{name} {list(st.shape)}: every value is 0"
            elif flag == "constant":
                msg = f"{name} {list(st.shape)}: every value is {st.min:g}"
            elif flag == "exploding":
                msg = f"{name}: |value| up to {st.abs_max:.4g} (> {EXPLODING_ABS:g})"
            elif flag == "dead":
                msg = f"{name}: {100 * st.zero_fraction:.1f}% zeros, max |value| {st.abs_max:.3g}"
            else:
                msg = f"{name}: {flag}"
            severity = None
            if flag in ("all-zero", "constant") and one_d:
                severity = INFO
            elif role not in ("model", "optimizer"):
                severity = INFO
                msg += f" (in {section}, outside the model and optimizer)"
            report.findings.append(finding(flag, msg, name, severity))
    profile, found = norm_profile(report.stats, ckpt)
    report.norm_profile = profile
    report.findings += found


class Statistics(Check):
    order = 50

    def applies(self, run: AuditRun) -> bool:
        return run.stats

    def run(self, run: AuditRun, report: AuditReport) -> None:
        _run_stats(report, run)
