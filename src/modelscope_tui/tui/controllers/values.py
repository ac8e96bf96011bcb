"""Value figures for the details pane: one tensor's statistics and histogram, and the norm
profile of a module's children. Both are cached for the session; the profile reuses every
statistic any job (a tensor's, a profile's, the audit's) has computed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...errors import Cancelled, MscopeError
from ...units import fmt_bytes
from .jobs import Job, Latest

if TYPE_CHECKING:
    from ...audit.norms import NormRow
    from ...checkpoint import Checkpoint, TensorRecord

HISTOGRAM_BINS = 30
AUDIT_HINT = "A (audit) computes it for the whole model"
COMPUTING = "computing norms…"


class StatsJob(Job):
    def __init__(self, record: TensorRecord) -> None:
        super().__init__()
        self.record = record


class TensorStats:
    """Statistics and histogram per tensor (qualified name -> (stats, histogram), or (error
    line, None)). One tensor at a time: the row under the cursor; moving on cancels the last."""

    def __init__(self) -> None:
        self.cache: dict[str, tuple] = {}
        self._jobs = Latest()

    def get(self, name: str) -> tuple | None:
        return self.cache.get(name)

    def start(self, record: TensorRecord) -> StatsJob:
        return self._jobs.start(StatsJob(record))

    @staticmethod
    def compute(job: StatsJob) -> tuple | None:
        """Worker thread: stream the tensor's values twice (statistics, then the histogram).
        None when the job was cancelled."""
        from ...values.chunks import stats_supported
        from ...values.data import TensorData
        from ...values.stream import tensor_histogram, tensor_stats

        record = job.record
        if not stats_supported(record.dtype):
            return (f"no statistics for {record.dtype}", None)
        try:
            with TensorData() as data:
                stats = tensor_stats(data, record, cancel=job.cancel)
                histogram = tensor_histogram(data, record, bins=HISTOGRAM_BINS, stats=stats, cancel=job.cancel)
                return (stats, histogram)
        except Cancelled:
            return None
        except MscopeError as exc:
            return (exc.message, None)

    def store(self, name: str, result: tuple) -> Any:
        """Keep a result (from any job, current or not: figures do not go stale). Returns the
        statistics when there are some, for the norm profiles."""
        self.cache[name] = result
        return None if isinstance(result[0], str) else result[0]

    def add(self, name: str, stats) -> None:
        """Statistics from elsewhere (the audit); a histogram computed before is kept."""
        self.cache.setdefault(name, (stats, None))

    def close(self) -> None:
        self._jobs.cancel()


class NormsJob(Job):
    def __init__(self, module: str, known: dict, errors: dict) -> None:
        super().__init__()
        self.module = module
        self.known = known  # copies: the worker reads them while the UI thread adds to the originals
        self.errors = errors


@dataclass
class NormsResult:
    stats: dict = field(default_factory=dict)  # statistics the job computed (qualified name ->)
    errors: dict = field(default_factory=dict)
    complete: bool = True  # False: cancelled before every tensor was read


@dataclass
class Profile:
    """What the details pane shows for a module: its rows, a status line while incomplete, and
    the job to start (the caller runs `NormProfiler.compute` on a worker) when one is needed."""

    rows: list[NormRow]
    status: str | None = None
    job: NormsJob | None = None


class NormProfiler:
    """Norm profiles of modules. Statistics are shared by every profile (a parent's reuses its
    children's), a profile is computed once, and only the module being looked at is computed."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.stats: dict = {}  # qualified tensor name -> TensorStats
        self.errors: dict[str, str] = {}
        self.done: set[str] = set()  # modules whose profile is complete
        self.running: str | None = None
        self._status: dict[str, str] = {}
        self._rows: dict[tuple[str, int], list] = {}
        self._jobs = Latest()

    def rows(self, module: str) -> list[NormRow]:
        """Cached until new statistics arrive (the dict only grows): the details are redrawn
        after every freeze, and the root's rows walk every tensor (200 ms at 100k)."""
        from ...audit.norms import norm_rows

        key = (module, len(self.stats))
        rows = self._rows.get(key)
        if rows is None:
            rows = norm_rows(self.ckpt, module, self.stats)
            self._rows = {key: rows, **{k: v for k, v in self._rows.items() if k[1] == key[1]}}
        return rows

    def profile(self, module: str, start: bool = True, visible: bool = True) -> Profile:
        """The profile from the statistics at hand. start=False: never start a job (the root's
        reads the whole model: shown once the audit or the top-level profiles have the figures);
        visible=False: the details pane is hidden, so nothing is computed for it."""
        rows = self.rows(module)
        if module in self.done:
            return Profile(rows)
        if all(r.complete for r in rows):
            self.done.add(module)
            return Profile(rows)
        if not start:
            return Profile(rows, AUDIT_HINT)
        job: NormsJob | None = None
        if self.running != module and visible:
            job = self._jobs.start(NormsJob(module, dict(self.stats), dict(self.errors)))
            self.running = module
            self._status[module] = COMPUTING
        return Profile(rows, self._status.get(module, COMPUTING), job)

    def compute(self, job: NormsJob, progress=None) -> NormsResult:
        """Worker thread: statistics of the tensors under the job's module that have none yet
        (streamed; a cancelled job keeps what it finished)."""
        from ...audit.norms import module_norms

        result = NormsResult(errors=job.errors)
        try:
            module_norms(
                self.ckpt, job.module, job.known, progress=progress, cancel=job.cancel, errors=job.errors,
                on_stats=lambda r, st: result.stats.__setitem__(r.qualified_name, st),
            )  # fmt: skip
        except Cancelled:
            result.complete = False
        return result

    def progress(self, job: NormsJob, done: int, total: int) -> bool:
        """A progress report; True when it is the current job's (its module's status changed)."""
        if not self._jobs.is_current(job):
            return False
        self._status[job.module] = f"{COMPUTING} {done / total:.0%} of {fmt_bytes(total)}" if total else COMPUTING
        return True

    def finish(self, job: NormsJob, result: NormsResult) -> bool:
        """Merge a job's statistics (even a replaced job's: they are still right). True when the
        module's profile is complete now."""
        self.stats.update(result.stats)
        self.errors.update(result.errors)
        if self._jobs.is_current(job):
            self.running = None
        if not result.complete:
            return False
        self.done.add(job.module)
        self._status.pop(job.module, None)
        return True

    def add(self, name: str, stats) -> None:
        """Statistics computed elsewhere (a tensor's details, the audit)."""
        self.stats.setdefault(name, stats)

    def close(self) -> None:
        self._jobs.cancel()
