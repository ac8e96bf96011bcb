"""Running an audit: `run_audit` on an opened checkpoint runs every registered check (checks.py)
that applies, in order; `audit_path` opens the file first, and a file that does not open becomes
a report with findings (a broken shard set is checked shard by shard) instead of an error.

Every check works on a metadata-only `Checkpoint` and reads tensor bytes only through the value
layer, chunk by chunk, so memory stays bounded by the chunk size whatever the file or the
largest tensor. No Textual, no rich, and no torch unless a tensor's dtype needs it (float8).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import Any

from ..checkpoint import Checkpoint
from ..errors import Cancelled, MscopeError, TensorDataError
from ..values.data import unreadable_records
from ..values.stats import DEFAULT_CHUNK_BYTES, ProgressFn

# The check families: importing them registers their checks (Check.__init_subclass__).
from . import duplicates, integrity, loadability, quantization, statistics, waste  # noqa: F401
from .checks import AuditRun, Check
from .findings import DEFAULT_FAIL_ON, AuditReport, finding
from .integrity import check_shard_set
from .loadability import dangerous_findings


def run_audit(
    ckpt: Checkpoint,
    stats: bool = False,
    dedupe: bool = False,
    crc: bool = False,
    fail_on: Iterable[str] = DEFAULT_FAIL_ON,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    threads: int | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    dask: str | None = None,
) -> AuditReport:
    """Every check on an opened checkpoint (open it with `strict=False`).

    Metadata checks always run and read no tensor bytes. `stats` streams every tensor's values
    (and finds duplicates from them); `dedupe` finds duplicates without statistics (hashes
    same-shape candidates); `crc` checks every zip member's CRC-32. When `cancel` is set the
    report comes back early with `cancelled=True` and what was found so far. `dask`: the
    address of a Dask scheduler whose workers compute the statistics (values/cluster.py; the
    same report); MscopeError when it cannot be reached.
    """
    totals = ckpt.totals()
    report = AuditReport(
        ckpt.path,
        ckpt.format,
        ckpt.kind,
        fail_on=tuple(fail_on),
        stats_requested=stats,
        tensors=len(ckpt.tensors),
        file_bytes=totals.file_bytes,
    )
    run = AuditRun(
        ckpt, unreadable_records(ckpt), stats, dedupe, crc, chunk_bytes, threads, progress, cancel
    )
    if dask is not None and stats:
        from ..values.cluster import connect

        run.cluster = connect(dask)
    try:
        for check in Check.registry:
            instance = check()
            if instance.applies(run):
                instance.run(run, report)
    except Cancelled:
        report.cancelled = True
    finally:
        if run.cluster is not None:
            run.cluster.close()
    if stats or dedupe:
        from ..readers.sources import check_unchanged

        check_unchanged(ckpt.files)  # a remote file replaced mid-run: no report mixing versions
    return report


def audit_path(path: str | os.PathLike, **kwargs: Any) -> AuditReport:
    """Open and audit. Files that cannot be opened become a report with an `unreadable-file`
    finding; a sharded set that does not open is checked shard by shard. NotFoundError and
    UnsupportedFormatError still raise (nothing to audit)."""
    from ..errors import CorruptCheckpointError, UnsafePickleError, UnsupportedFormatError
    from ..readers import open_checkpoint, sniff
    from ..readers.sources.location import RemotePath, as_location

    path = as_location(path)
    try:
        ckpt = open_checkpoint(path, strict=False)
    except (CorruptCheckpointError, UnsafePickleError, TensorDataError, UnsupportedFormatError) as exc:
        # A payload counts even where the checkpoint does not: pickle.load runs it before it
        # notices the damage (the reader searched the file, see readers.payloads).
        payloads = [g for g in getattr(exc, "pickle_globals", ()) if g.safety == "dangerous"]
        if isinstance(exc, UnsupportedFormatError) and not payloads:
            raise
        kind = None
        try:
            kind = sniff(path) if not isinstance(path, RemotePath) else None
        except MscopeError:
            pass
        report = AuditReport(
            path,
            kind or "unknown",
            "unknown",
            fail_on=tuple(kwargs.get("fail_on", DEFAULT_FAIL_ON)),
        )
        report.stats_requested = bool(kwargs.get("stats"))
        if kind in ("index-json", "index-dir"):
            report.format = "sharded"
            report.findings += check_shard_set(path)
        if not report.findings:
            report.findings.append(finding("unreadable-file", exc.message, None, hint=exc.hint))
        report.findings += dangerous_findings(payloads)
        if payloads:
            report.loadability["dangerous_globals"] = [g.qualname for g in payloads]
        return report
    return run_audit(ckpt, **kwargs)

