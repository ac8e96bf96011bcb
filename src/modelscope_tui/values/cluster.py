"""Values read on a Dask cluster (`--dask ADDRESS`): the client splits the work, workers read,
the client merges. Numbers equal a local run's bit for bit.

- Split: tensors in file order (a task never spans two files, so by shard), each tensor cut into
  the same chunks a local run reads (`chunks.chunk_count`), whole small tensors grouped and big
  ones split into ranges of chunks, `task_bytes` of source bytes per task at most.
- Tasks carry a location string (the checkpoint's path; a URL once remote sources land), a
  token for this run, and for each tensor its index in `Checkpoint.tensors` with a signature
  (name, dtype, shape, stride, offsets) the worker checks against what it opened. Never tensor
  bytes and never records: a worker opens the checkpoint itself (metadata, cached per run) and
  maps only the ranges it reads.
- Merge: a task returns one result per chunk (a statistics `Part`, a diff's chunk sums), or,
  for a range that starts a tensor, the running total from an empty one: exactly the
  additions a local run makes, in the same order. The client adds the rest in chunk order with
  the same function (`Part.merge`, `Sums.add`), so no float depends on which worker ran what.
- Progress comes back as futures complete (as_completed), into the same Progress callback.

Workers must run the same mscope (same kernel: the compiled statistics loop and numpy's can
differ in the last bits) and reach the same paths. dask and distributed are imported by
`connect` only: without --dask nothing here imports them.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..checkpoint import Checkpoint, TensorRecord
from ..errors import Cancelled, MscopeError, TensorDataError
from ..readers.sources.location import redact
from .chunks import TensorChunks, chunk_count
from .stats import Progress, ProgressFn, TensorStats

if TYPE_CHECKING:
    from distributed import Client

DEFAULT_TASK_BYTES = 64 << 20  # source bytes per task (both sides of a diff counted)
TASK_PIECES = 512  # tensors per task at most (small ones are grouped)
CONNECT_TIMEOUT = 10.0  # seconds to reach the scheduler and to see a worker
ENV_ADDRESS = "MSCOPE_DASK"
ENV_TASK_MB = "MSCOPE_DASK_TASK_MB"
ENV_TIMEOUT = "MSCOPE_DASK_TIMEOUT"


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise MscopeError(f"{name}={raw!r} is not a positive number")
    return value


def task_bytes_default() -> int:
    """DEFAULT_TASK_BYTES, or MSCOPE_DASK_TASK_MB (in MiB) when set."""
    return max(1, int(_env_number(ENV_TASK_MB, DEFAULT_TASK_BYTES / (1 << 20)) * (1 << 20)))


class Cluster:
    """A connected distributed.Client; a context manager that closes it."""

    def __init__(self, client: Client, address: str) -> None:
        self.client = client
        self.address = address
        self.token = uuid.uuid4().hex  # workers' opened checkpoints are cached per run

    @property
    def threads(self) -> int:
        """Worker threads in the cluster now (the parallelism a task list can use)."""
        workers = self.client.scheduler_info().get("workers", {})
        return sum(int(w.get("nthreads", 1)) for w in workers.values()) or 1

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001 - a scheduler gone already: nothing left to close
            pass

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(address: str, timeout: float | None = None) -> Cluster:
    """A Client on the scheduler at `address` (tcp://host:8786, or host:port) with at least one
    worker, waiting `timeout` seconds (MSCOPE_DASK_TIMEOUT, default 10) for each. MscopeError
    (one line) when distributed is missing, the address is bad, the scheduler does not answer
    or has no worker."""
    timeout = timeout or _env_number(ENV_TIMEOUT, CONNECT_TIMEOUT)
    address = address.strip()
    if not address:
        raise MscopeError("--dask needs a scheduler address (e.g. tcp://10.0.0.5:8786)")
    try:
        import logging

        from distributed import Client
    except ImportError as exc:
        raise MscopeError(
            "--dask needs dask and distributed", hint="pip install 'modelscope-tui[dask]'"
        ) from exc
    # distributed logs each failed attempt; the one line below says it all.
    log = logging.getLogger("distributed")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        try:
            client = Client(address, timeout=timeout, set_as_default=False)
        except Exception as exc:  # noqa: BLE001 - ValueError, OSError, TimeoutError, ...
            raise MscopeError(
                f"cannot reach the Dask scheduler at {address}: {_reason(exc)}",
                hint="start one with `dask scheduler` and workers with `dask worker ADDRESS`; see docs/dask.md",
            ) from None
        try:
            client.wait_for_workers(1, timeout=timeout)
        except Exception:  # noqa: BLE001 - TimeoutError
            client.close()
            raise MscopeError(
                f"the Dask scheduler at {address} has no workers",
                hint="start some with `dask worker ADDRESS`",
            ) from None
    finally:
        log.setLevel(level)
    return Cluster(client, address)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def location_of(ckpt: Checkpoint) -> str:
    """The string a worker opens the checkpoint from: an absolute path (workers need not share
    the client's working directory), a URL as it is."""
    url = getattr(ckpt.path, "url", None)  # a RemotePath: the full URL (str() redacts a signed one)
    if url is not None:
        return url
    text = str(ckpt.path)
    return text if "://" in text else os.path.abspath(text)


def signature(t: TensorRecord) -> tuple:
    """What a worker's record must match for an index to mean the same tensor."""
    s = t.storage
    return (
        t.qualified_name,
        t.dtype,
        tuple(t.shape),
        tuple(t.stride),
        t.storage_offset,
        None if s is None else s.data_offset,
        None if s is None else s.nbytes,
    )


# --- the worker side ------------------------------------------------------------------------

_opened: OrderedDict[tuple[str, str], Checkpoint] = OrderedDict()
_opened_lock = threading.Lock()
_OPENED_MAX = 4


def worker_record(location: str, token: str, index: int, sig: tuple) -> TensorRecord:
    """The record at `index` of the checkpoint at `location`, opened once per run and worker
    (metadata only). MscopeError when it is not the tensor the client meant."""
    from ..readers import open_checkpoint

    key = (location, token)
    with _opened_lock:
        ckpt = _opened.get(key)
        if ckpt is None:
            ckpt = _opened[key] = open_checkpoint(location, strict=False)
            while len(_opened) > _OPENED_MAX:
                _opened.popitem(last=False)
        else:
            _opened.move_to_end(key)
    tensors = ckpt.tensors
    if not 0 <= index < len(tensors) or signature(tensors[index]) != sig:
        raise MscopeError(
            f"{redact(location)} is not the checkpoint the client opened (tensor {sig[0]!r} differs); "
            "workers must see the same files"
        )
    return tensors[index]


Piece = tuple[int, int, int]  # (item, first chunk, stop chunk)


def stats_task(location: str, token: str, pieces: list[tuple], chunk_bytes: int) -> list[tuple]:
    """Runs on a worker: per piece (index, signature, first, stop), (True, [Part fields...])
    with one Part per chunk, or the running total when first == 0; (False, message) when the
    tensor's bytes cannot be read."""
    from .data import TensorData
    from .kernels import Part, chunk_part

    out: list[tuple] = []
    with TensorData() as data:
        for index, sig, first, stop in pieces:
            try:
                r = worker_record(location, token, index, sig)
                src = TensorChunks(data, r, chunk_bytes, native=True)
                kernel = src.chunk_kernel
                parts = [chunk_part(c, kernel) for _, c in src.chunks(first, stop)]
            except TensorDataError as exc:
                out.append((False, exc.message))
                continue
            if first == 0:  # the same additions as a local run's, from the same empty Part
                total = Part()
                for p in parts:
                    total.merge(p)
                parts = [total]
            out.append((True, [_fields(p) for p in parts]))
    return out


def digest_task(location: str, token: str, pieces: list[tuple], chunk_bytes: int) -> list[tuple]:
    """Runs on a worker: per piece (index, signature, first, stop), (True, [BLAKE2b of each
    chunk, row-major order]) or (False, message)."""
    import hashlib

    from .data import TensorData
    from .kernels import numpy_module

    np = numpy_module()
    out: list[tuple] = []
    with TensorData() as data:
        for index, sig, first, stop in pieces:
            try:
                r = worker_record(location, token, index, sig)
                src = TensorChunks(data, r, chunk_bytes, ordered=True)
                hashes = [
                    hashlib.blake2b(np.ascontiguousarray(c).view(np.uint8).data, digest_size=16).digest()
                    for _, c in src.chunks(first, stop)
                ]
            except TensorDataError as exc:
                out.append((False, exc.message))
                continue
            out.append((True, hashes))
    return out


def _fields(p: Any) -> tuple:
    return (p.n, p.finite, p.nan, p.inf, p.zeros, p.mn, p.mx, p.mean, p.m2, p.sumsq)


# --- the client side ------------------------------------------------------------------------


@dataclass(slots=True)
class Job:
    """One task: its pieces (item index into the caller's list, first and stop chunk) and the
    source bytes they read."""

    pieces: list[Piece]
    nbytes: int


def plan_jobs(items: Sequence[tuple[int, int, Any, int]], task_bytes: int) -> list[Job]:
    """Jobs over `items` (chunks, bytes per chunk, file, bytes), in order: a tensor bigger than
    `task_bytes` is split into ranges of chunks, small ones share a job, no job spans two
    files. Each item appears at least once (an empty tensor as the range 0..0)."""
    jobs: list[Job] = []
    pieces: list[Piece] = []
    size = read = 0  # chunks x their size (the budget), and the bytes they hold
    last_file: Any = None

    def close() -> None:
        nonlocal pieces, size, read
        if pieces:
            jobs.append(Job(pieces, read))
            pieces, size, read = [], 0, 0

    for i, (count, per_chunk, file, nbytes) in enumerate(items):
        if file != last_file:
            close()
            last_file = file
        per_chunk = max(1, per_chunk)
        first = 0
        while True:
            room = (task_bytes - size) // per_chunk  # whole chunks that still fit this task
            if room < 1 and size and count:
                close()
                room = task_bytes // per_chunk
            stop = min(count, first + max(1, room))
            pieces.append((i, first, stop))
            size += (stop - first) * per_chunk
            read += min(stop * per_chunk, nbytes) - min(first * per_chunk, nbytes)
            if size >= task_bytes or len(pieces) >= TASK_PIECES:
                close()
            if stop >= count:
                break
            first = stop
    close()
    return jobs


def run_jobs(
    cluster: Cluster,
    fn: Callable[..., Any],
    jobs: list[Job],
    args: Callable[[Job], tuple],
    total: int,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    name: Callable[[Job], str] = lambda job: "",
) -> Iterator[tuple[Job, Any]]:
    """Each job's result, in job order, as soon as it and every one before it are in. A window
    of jobs is in flight (results wait only for the ones before them); progress counts a job's
    bytes when it completes, whatever its order. Raises Cancelled, and MscopeError when a worker
    fails (its message, one line)."""
    from distributed import as_completed

    client = cluster.client
    window = max(16, 8 * cluster.threads)
    t0 = time.perf_counter()
    state = {"done": 0}
    futures: dict[Any, int] = {}
    queue = as_completed(loop=client.loop)
    submitted = 0

    def report(label: str) -> None:  # every job: they are few (tens of MB each)
        if progress is not None:
            progress(Progress(state["done"], total, time.perf_counter() - t0, label))

    def submit() -> None:
        nonlocal submitted
        if submitted < len(jobs):
            job = jobs[submitted]
            fut = client.submit(fn, *args(job), pure=False, key=f"mscope-{fn.__name__}-{uuid.uuid4().hex}")
            futures[fut] = submitted
            queue.add(fut)
            submitted += 1

    report("")
    results: dict[int, Any] = {}
    following = 0
    try:
        for _ in range(window):
            submit()
        for fut in queue:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            i = futures.pop(fut)
            results[i] = _result(fut)
            state["done"] += jobs[i].nbytes
            report(name(jobs[i]))
            submit()
            while following in results:
                yield jobs[following], results.pop(following)
                following += 1
    finally:
        if futures:
            try:
                client.cancel(list(futures))
            except Exception:  # noqa: BLE001 - best effort; the client closes next anyway
                pass
    report("")


def _result(fut: Any) -> Any:
    try:
        return fut.result()
    except MscopeError as exc:
        raise MscopeError(f"on a Dask worker: {exc.message}") from None
    except Exception as exc:  # noqa: BLE001 - KilledWorker, a lost connection, a worker bug
        raise MscopeError(
            f"a Dask worker failed: {type(exc).__name__}: {_reason(exc)}",
            hint="check the workers' logs; they need the same mscope and the same paths",
        ) from None


def cluster_stats(
    cluster: Cluster,
    ckpt: Checkpoint,
    records: list[TensorRecord],
    chunk_bytes: int,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    on_error: Callable[[TensorRecord, MscopeError], None] | None = None,
    task_bytes: int | None = None,
) -> Iterator[tuple[TensorRecord, TensorStats]]:
    """`stream.stream_stats` on the cluster: the same (record, stats) in the same order, with
    the same numbers. `records` must belong to `ckpt`."""
    from .kernels import Part
    from .stream import stats_from_part

    task_bytes = task_bytes or task_bytes_default()
    index = {id(t): i for i, t in enumerate(ckpt.tensors)}
    items = []
    for r in records:
        per = max(1, chunk_bytes // max(1, r.itemsize)) * r.itemsize
        file = r.storage.file if r.storage else None
        items.append((chunk_count(r, chunk_bytes), per, file, r.nbytes))
    jobs = plan_jobs(items, task_bytes)
    location, token = location_of(ckpt), cluster.token

    def args(job: Job) -> tuple:
        pieces = [
            (index[id(records[i])], signature(records[i]), first, stop)
            for i, first, stop in job.pieces
        ]
        return (location, token, pieces, chunk_bytes)

    totals: dict[int, Part] = {}
    dropped: set[int] = set()
    for job, result in run_jobs(
        cluster,
        stats_task,
        jobs,
        args,
        sum(r.nbytes for r in records),
        progress,
        cancel,
        lambda job: records[job.pieces[-1][0]].qualified_name,
    ):
        for (i, first, stop), (ok, payload) in zip(job.pieces, result):
            if i in dropped:
                continue
            r = records[i]
            if not ok:
                dropped.add(i)
                totals.pop(i, None)
                if on_error is None:
                    raise TensorDataError(payload)
                on_error(r, TensorDataError(payload))
                continue
            if first == 0:
                totals[i] = Part(*payload[0])
            else:
                total = totals[i]
                for fields in payload:
                    total.merge(Part(*fields))
            if stop >= items[i][0]:
                yield r, stats_from_part(r, totals.pop(i))


def cluster_digests(
    cluster: Cluster,
    ckpt: Checkpoint,
    records: list[TensorRecord],
    chunk_bytes: int,
    cancel: threading.Event | None = None,
    task_bytes: int | None = None,
) -> dict[int, bytes | None]:
    """id(record) -> a BLAKE2b of its elements in row-major order (a hash of its chunks'
    hashes: equal for equal dtype, shape and values, like values.digest.digest, though not the
    same bytes), or None when its bytes cannot be read. Read on the cluster."""
    import hashlib

    if not records:
        return {}
    task_bytes = task_bytes or task_bytes_default()
    records = list({id(r): r for r in records}.values())
    index = {id(t): i for i, t in enumerate(ckpt.tensors)}
    items = []
    for r in records:
        per = max(1, chunk_bytes // max(1, r.itemsize)) * r.itemsize
        file = r.storage.file if r.storage else None
        items.append((chunk_count(r, chunk_bytes, ordered=True), per, file, r.nbytes))
    location, token = location_of(ckpt), cluster.token

    def args(job: Job) -> tuple:
        pieces = [
            (index[id(records[i])], signature(records[i]), first, stop)
            for i, first, stop in job.pieces
        ]
        return (location, token, pieces, chunk_bytes)

    hashers: dict[int, Any] = {}
    out: dict[int, bytes | None] = {}
    jobs = plan_jobs(items, task_bytes)
    for job, result in run_jobs(cluster, digest_task, jobs, args, 0, None, cancel):
        for (i, _first, stop), (ok, payload) in zip(job.pieces, result):
            key = id(records[i])
            if key in out:
                continue
            if not ok:
                out[key] = None
                continue
            h = hashers.setdefault(key, hashlib.blake2b(digest_size=16))
            for chunk in payload:
                h.update(chunk)
            if stop >= items[i][0]:
                out[key] = hashers.pop(key).digest()
    return out
