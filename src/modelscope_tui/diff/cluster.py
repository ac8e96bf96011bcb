"""The diff's value comparison on a Dask cluster (`mscope diff --dask`): pairs split into ranges
of chunk pairs (values/cluster.py plans, runs and explains the scheme), each worker opening both
checkpoints itself and returning one `ChunkSums` per chunk pair, which the client adds in chunk
order with `Sums.add`, exactly as compare_values does locally.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from ..checkpoint import Checkpoint, TensorRecord
from ..errors import TensorDataError
from ..values.cluster import (
    Cluster,
    Job,
    location_of,
    plan_jobs,
    run_jobs,
    signature,
    task_bytes_default,
    worker_record,
)
from ..values.stats import ProgressFn
from .compare import Sums, pair_chunk_count, pair_elements, range_sums


def sums_task(
    location_a: str,
    location_b: str,
    token: str,
    pieces: list[tuple],
    chunk_bytes: int,
    atol: float,
    rtol: float,
) -> list[tuple]:
    """Runs on a worker: per piece (index A, signature A, index B, signature B, first, stop,
    unpermute), (True, [ChunkSums, ...]) or (False, message) when bytes cannot be read."""
    from ..values.data import TensorData

    out: list[tuple] = []
    with TensorData() as da, TensorData() as db:
        for ia, sa, ib, sb, first, stop, unpermute in pieces:
            try:
                ra = worker_record(location_a, token, ia, sa)
                rb = worker_record(location_b, token, ib, sb)
                sums = list(range_sums(da, db, ra, rb, atol, rtol, chunk_bytes, first, stop, unpermute=unpermute))
            except TensorDataError as exc:
                out.append((False, exc.message))
                continue
            out.append((True, sums))
    return out


def cluster_compare(
    cluster: Cluster,
    a: Checkpoint,
    b: Checkpoint,
    pairs: list[tuple[TensorRecord, TensorRecord]],
    atol: float,
    rtol: float,
    chunk_bytes: int,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    task_bytes: int | None = None,
    unpermutes: list | None = None,
) -> Iterator[tuple[int, Sums | TensorDataError]]:
    """(pair index, its Sums or the TensorDataError that stopped it), in pair order, computed
    on the cluster with the same numbers compare_values gives (`unpermutes`: each pair's
    compare.Unpermute, as compare_values takes it). Raises Cancelled, MscopeError."""
    unpermutes = unpermutes or [None] * len(pairs)
    task_bytes = task_bytes or task_bytes_default()
    index_a = {id(t): i for i, t in enumerate(a.tensors)}
    index_b = {id(t): i for i, t in enumerate(b.tensors)}
    items = []
    for (ra, rb), unpermute in zip(pairs, unpermutes):
        elems = pair_elements(ra, rb, chunk_bytes, unpermute)
        file = (ra.storage.file if ra.storage else None, rb.storage.file if rb.storage else None)
        per = elems * (ra.itemsize + rb.itemsize)
        items.append((pair_chunk_count(ra, rb, chunk_bytes, unpermute), per, file, ra.nbytes + rb.nbytes))
    jobs = plan_jobs(items, task_bytes)
    loc_a, loc_b, token = location_of(a), location_of(b), cluster.token

    def args(job: Job) -> tuple:
        pieces = []
        for i, first, stop in job.pieces:
            ra, rb = pairs[i]
            pieces.append((index_a[id(ra)], signature(ra), index_b[id(rb)], signature(rb), first, stop, unpermutes[i]))
        return (loc_a, loc_b, token, pieces, chunk_bytes, atol, rtol)

    sums: dict[int, Sums] = {}
    dropped: set[int] = set()
    total = sum(ra.nbytes + rb.nbytes for ra, rb in pairs)
    for job, result in run_jobs(
        cluster, sums_task, jobs, args, total, progress, cancel,
        lambda job: pairs[job.pieces[-1][0]][1].qualified_name,
    ):  # fmt: skip
        for (i, _first, stop), (ok, payload) in zip(job.pieces, result):
            if i in dropped:
                continue
            if not ok:
                dropped.add(i)
                sums.pop(i, None)
                yield i, TensorDataError(payload)
                continue
            acc = sums.setdefault(i, Sums())
            for chunk in payload:
                acc.add(chunk)
            if stop >= items[i][0]:
                yield i, sums.pop(i)
