"""Duplicates: tensors with identical dtype, shape and bytes stored twice instead of tied. Reads
bytes: candidates are compared through the statistics when --stats computed them (identical
bytes give identical statistics), else hashed.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from ..checkpoint import Checkpoint, TensorRecord, dims_key
from ..errors import Cancelled, TensorDataError
from ..units import fmt_bytes
from ..values.chunks import LAYOUT
from ..values.digest import digest, is_constant, same_bytes
from ..values.stats import TensorStats
from .checks import AuditRun, Check
from .findings import finding

if TYPE_CHECKING:
    from ..values.data import TensorData
    from .findings import AuditReport

DUPLICATE_MIN_BYTES = 1 << 10


def find_duplicates(
    data: TensorData,
    ckpt: Checkpoint,
    stats: Mapping[str, TensorStats] | None = None,
    skip: set[int] | None = None,
    chunk_bytes: int = 4 << 20,
    cancel: threading.Event | None = None,
    hashes: Callable[[list[TensorRecord]], Mapping[int, bytes | None]] | None = None,
) -> list[list[TensorRecord]]:
    """Groups of tensors with identical dtype, shape and bytes that do not share a storage.

    Only same-dtype, same-shape candidates are read. With `stats` (from --stats) the statistics
    are the first filter (identical bytes give identical statistics, bit for bit), so usually
    nothing is read again; without, candidates are hashed (BLAKE2b). Constant tensors (zero
    biases, unit norms) are left out: two equal constants are not waste worth tying.

    `hashes` (with `stats`: a Dask cluster's values.cluster.cluster_digests) hashes all the
    candidates in one batch, id(record) -> digest or None (unreadable); a member then matches
    the first when their digests do, as `same_bytes` would say.
    """
    skip = skip or set()
    groups: dict[tuple, list[TensorRecord]] = defaultdict(list)
    seen_storage: dict[int, TensorRecord] = {}
    for t in ckpt.tensors:
        if (
            t.storage is None
            or t.alias_of is not None
            or id(t) in skip
            or t.nbytes < DUPLICATE_MIN_BYTES
            or t.companion_of is not None  # a quantizer's code book repeats in every layer by design
        ):
            continue
        if t.dtype not in LAYOUT:
            continue
        if (
            id(t.storage) in seen_storage
            and seen_storage[id(t.storage)].storage_offset == t.storage_offset
        ):
            continue  # tied: shares the storage already
        seen_storage.setdefault(id(t.storage), t)
        key: tuple = (t.dtype, dims_key(t.shape))
        if stats is not None:
            st = stats.get(t.qualified_name)
            if st is None or st.min == st.max:
                continue
            key = (*key, st.min, st.max, st.mean, st.std, st.sumsq, st.zeros, st.nan, st.inf)
        groups[key].append(t)
    out = []
    digests: Mapping[int, bytes | None] | None = None
    if hashes is not None and stats is not None:
        digests = hashes([t for members in groups.values() if len(members) > 1 for t in members])
    for members in groups.values():
        if len(members) < 2:
            continue
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        if digests is not None:
            if any(digests.get(id(m)) is None for m in members):
                continue  # as a read error below: the group is skipped
            first = digests[id(members[0])]
            same = [members[0]] + [m for m in members[1:] if digests[id(m)] == first]
            if len(same) > 1:
                out.append(same)
            continue
        try:
            if stats is not None:
                first = members[0]
                same = [first] + [
                    m for m in members[1:] if same_bytes(data, first, m, chunk_bytes)
                ]
                if len(same) > 1:
                    out.append(same)
                continue
            by_digest: dict[bytes, list[TensorRecord]] = defaultdict(list)
            for m in members:
                by_digest[digest(data, m, chunk_bytes)].append(m)
            for same in by_digest.values():
                if len(same) > 1 and not is_constant(data, same[0], chunk_bytes):
                    out.append(same)
        except TensorDataError:
            continue
    return out



def duplicate_findings(report: AuditReport, groups: list[list[TensorRecord]]) -> None:
    """One `duplicate-tensor` finding per group, and the waste they add up to."""
    dupes = []
    for g in groups:
        extra = sum(t.nbytes for t in g[1:])
        names = [t.qualified_name for t in g]
        dupes.append({"tensors": names, "bytes_each": g[0].nbytes, "wasted_bytes": extra})
        others = ", ".join(names[1:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        report.findings.append(
            finding(
                "duplicate-tensor",
                f"{names[0]} is stored {len(g)} times with identical bytes ({others}); "
                f"{fmt_bytes(extra)} could be saved by tying them",
                names[1],
                tensors=names,
                wasted_bytes=extra,
            )
        )
    report.waste["duplicates"] = dupes
    report.waste["duplicate_waste_bytes"] = sum(d["wasted_bytes"] for d in dupes)


class Duplicates(Check):
    order = 60

    def applies(self, run: AuditRun) -> bool:
        return run.dedupe or run.stats

    def run(self, run: AuditRun, report: AuditReport) -> None:
        from ..values.data import TensorData

        hashes = None
        if run.cluster is not None:  # candidates hashed by the workers, like the statistics
            from ..values.cluster import cluster_digests

            def hashes(records: list[TensorRecord]) -> dict[int, bytes | None]:
                return cluster_digests(run.cluster, run.ckpt, records, 4 << 20, run.cancel)

        with TensorData() as data:
            groups = find_duplicates(
                data, run.ckpt, report.stats if run.stats else None, run.unreadable,
                cancel=run.cancel, hashes=hashes,
            )  # fmt: skip
        duplicate_findings(report, groups)
