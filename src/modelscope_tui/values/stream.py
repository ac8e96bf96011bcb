"""Statistics computed: one tensor (`tensor_stats`, `tensor_histogram`) or many at once
(`stream_stats`: a thread pool over chunks, progress and cancel). Memory is bounded by the chunk
size whatever the file or the largest tensor; tensor bytes come only through TensorData.

Threads: one per physical core; numpy and ctypes release the GIL inside each loop. Chunks of 2 MB
(in tasks of 4) keep 2 threads 1.4-1.6x faster than one on a 2-core box; 1 MB chunks gain less
(more GIL hand-offs), 4 MB ones fall out of cache.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..checkpoint import TensorRecord
from ..errors import Cancelled, MscopeError, TensorDataError
from .chunks import LAYOUT, TensorChunks
from .kernels import Part, as_float, chunk_part, numpy_module
from .stats import DEFAULT_CHUNK_BYTES, Histogram, Progress, ProgressFn, TensorStats, stat_flags

if TYPE_CHECKING:
    from .data import TensorData


def stats_from_part(record: TensorRecord, part: Part, name: str | None = None) -> TensorStats:
    """The TensorStats (flags included) of a record from the merged Part of all its chunks."""
    st = TensorStats(
        name=name or record.qualified_name,
        dtype=record.dtype,
        shape=tuple(record.shape),
        numel=record.numel,
        min=part.mn,
        max=part.mx,
        zeros=part.zeros,
        nan=part.nan,
        inf=part.inf,
        finite=part.finite,
        sumsq=part.sumsq,
    )
    if part.finite:
        st.mean = part.mean
        st.std = math.sqrt(part.m2 / part.finite)
    layout = LAYOUT.get(record.dtype)
    if layout is not None and layout.per == 2:
        st.numel = part.n  # complex: statistics are over the real and imaginary parts
    st.flags = stat_flags(record, st)
    return st


def tensor_stats(
    data: TensorData,
    record: TensorRecord,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    cancel: threading.Event | None = None,
) -> TensorStats:
    """One tensor's statistics in one streamed pass (memory: one chunk).

    Raises TensorDataError when its bytes cannot be read, Cancelled when `cancel` is set,
    and MscopeError for a dtype without statistics (see `stats_supported`).
    """
    if record.dtype not in LAYOUT:
        raise MscopeError(f"no statistics for dtype {record.dtype}")
    src = TensorChunks(data, record, chunk_bytes, native=True)
    total = Part()
    kernel = src.chunk_kernel
    for _, comps in src.chunks():
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        total.merge(chunk_part(comps, kernel))
    return stats_from_part(record, total)


def tensor_histogram(
    data: TensorData,
    record: TensorRecord,
    bins: int = 40,
    stats: TensorStats | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    cancel: threading.Event | None = None,
) -> Histogram:
    """Counts of the finite values in `bins` equal bins between their min and max (a second pass;
    pass `stats` when you have them, or they are computed first)."""
    np = numpy_module()
    if stats is None:
        stats = tensor_stats(data, record, chunk_bytes, cancel)
    lo = stats.min if stats.min is not None and math.isfinite(stats.min) else None
    hi = stats.max if stats.max is not None and math.isfinite(stats.max) else None
    if stats.inf or lo is None or hi is None:  # range of the finite values needs its own pass
        lo, hi = _finite_range(data, record, chunk_bytes, cancel)
    if lo is None:
        return Histogram(0.0, 0.0, [0] * bins, stats.nan, stats.inf)
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0) * 1e-6
    counts = np.zeros(bins, dtype=np.int64)
    src = TensorChunks(data, record, chunk_bytes)
    for _, comps in src.chunks():
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        f = as_float(comps, src.chunk_kernel)
        # float64: numpy refuses bins narrower than the data's own precision ("Too many bins
        # for data range"), e.g. a float32 constant 1.0 whose range is widened by 1e-6 above
        f = f[np.isfinite(f)].astype(np.float64, copy=False)
        counts += np.histogram(f, bins=bins, range=(lo, hi))[0]
    return Histogram(lo, hi, [int(c) for c in counts], stats.nan, stats.inf)


def _finite_range(data, record, chunk_bytes, cancel) -> tuple[float | None, float | None]:
    np = numpy_module()
    lo = hi = None
    src = TensorChunks(data, record, chunk_bytes)
    for _, comps in src.chunks():
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        f = as_float(comps, src.chunk_kernel)
        f = f[np.isfinite(f)]
        if f.size:
            a, b = float(f.min()), float(f.max())
            lo = a if lo is None else min(lo, a)
            hi = b if hi is None else max(hi, b)
    return lo, hi


_TASK_CHUNKS = 4  # chunks per pool task (see stream_stats)


def _chunk_parts(work: list[tuple[Any, str]]) -> list[Part]:
    """chunk_part of each (components, kernel); None components (an empty tensor): no part."""
    return [Part() if comps is None else chunk_part(comps, kernel) for comps, kernel in work]


def default_threads() -> int:
    """One per physical core of the usable CPUs (SMT siblings share the SIMD units the kernels
    run on), 1 to 8. Where the topology cannot be read: half the CPUs."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as fh:
                cores.add(fh.read().strip())
        except OSError:
            return max(1, min(8, len(cpus) // 2))
    return max(1, min(8, len(cores)))


def stream_stats(
    data: TensorData,
    records: list[TensorRecord],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    threads: int | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    on_error: Callable[[TensorRecord, MscopeError], None] | None = None,
) -> Iterator[tuple[TensorRecord, TensorStats]]:
    """Statistics of many tensors, yielded in order as each completes.

    Chunks go to a pool of `threads` workers (numpy releases the GIL in its loops) in tasks of a
    few chunks; at most 2 x threads tasks are in flight, each holding views of the mapped file
    (a strided tensor's chunks are copies: one per task), so memory is bounded by the chunk size. A tensor whose bytes
    cannot be read goes to `on_error` and the stream continues. Raises Cancelled.
    """
    threads = threads or default_threads()
    data.plan(records)  # remote storages: fetched several at a time, in this order
    total = sum(r.nbytes for r in records)
    state = {"done": 0, "last": 0.0}
    t0 = time.perf_counter()

    def report(name: str, force: bool = False) -> None:
        if progress is None:
            return
        now = time.perf_counter()
        if force or now - state["last"] >= 0.1:
            state["last"] = now
            progress(Progress(state["done"], total, now - t0, name))

    def check_cancel() -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled()

    report("", force=True)
    if threads <= 1:
        for r in records:
            check_cancel()
            try:
                src = TensorChunks(data, r, chunk_bytes, native=True)
                part = Part()
                kernel = src.chunk_kernel
                for nbytes, comps in src.chunks():
                    check_cancel()
                    part.merge(chunk_part(comps, kernel))
                    state["done"] += nbytes
                    report(r.qualified_name)
            except TensorDataError as exc:
                if on_error is None:
                    raise
                on_error(r, exc)
                continue
            yield r, stats_from_part(r, part)
        report("", force=True)
        return

    from concurrent.futures import ThreadPoolExecutor

    # Chunks go to the pool in tasks of up to _TASK_CHUNKS chunks (whole small tensors share a
    # task): fewer futures and thread wake-ups. Each task's parts come back one per chunk and are
    # merged here in stream order, so the numbers equal the single-thread ones bit for bit.
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mscope-stats")
    pending: deque = deque()  # (items, future); items: (record, nbytes, last chunk?)
    parts: dict[int, Part] = {}
    dropped: set[int] = set()  # records whose bytes failed part way: queued chunks are ignored
    limit = 2 * threads
    items: list[tuple[TensorRecord, int, bool]] = []
    work: list[tuple[Any, str]] = []
    task_bytes = 0

    def submit() -> None:
        nonlocal items, work, task_bytes
        if items:
            pending.append((items, pool.submit(_chunk_parts, work)))
            items, work, task_bytes = [], [], 0

    def drain(until: int) -> Iterator[tuple[TensorRecord, TensorStats]]:
        while len(pending) > until:
            done_items, fut = pending.popleft()
            for (r, nbytes, last), part in zip(done_items, fut.result()):
                key = id(r)
                if key in dropped:
                    continue
                parts.setdefault(key, Part()).merge(part)
                state["done"] += nbytes
                if last:
                    yield r, stats_from_part(r, parts.pop(key))
            report(done_items[-1][0].qualified_name)

    try:
        for r in records:
            check_cancel()
            start = len(items)
            try:
                src = TensorChunks(data, r, chunk_bytes, native=True)
                kernel = src.chunk_kernel
                copies = src.copies
                for nbytes, comps in src.chunks():
                    items.append((r, nbytes, False))
                    work.append((comps, kernel))
                    task_bytes += nbytes
                    if copies or task_bytes >= _TASK_CHUNKS * chunk_bytes:
                        submit()
                        start = 0
                        check_cancel()
                        if len(pending) >= limit:
                            yield from drain(threads)
            except TensorDataError as exc:
                del items[start:], work[start:]
                task_bytes = sum(n for _, n, _ in items)
                dropped.add(id(r))
                if on_error is None:
                    raise
                on_error(r, exc)
                continue
            items.append((r, 0, True))  # the tensor ends: yield it once everything before is in
            work.append((None, kernel))
            if len(items) >= 256:
                submit()
                if len(pending) >= limit:
                    yield from drain(threads)
        submit()
        yield from drain(0)
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
    report("", force=True)
