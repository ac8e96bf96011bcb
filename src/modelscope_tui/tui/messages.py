"""What worker threads report to the app. Threads reach the UI only by posting these; the app
handles each with `@on` on its own thread. Jobs (controllers.jobs) tell a replaced run's
results from the current one's; bursty progress messages let a newer one replace those queued."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from textual.message import Message

if TYPE_CHECKING:
    from ..audit.findings import AuditReport
    from ..checkpoint import Checkpoint
    from ..diff.live import LiveDiff
    from ..gpu.snapshot import GpuSample
    from ..training.estimate import MemoryEstimate
    from ..training.placement import DeviceInfo
    from .controllers.diff import Batch, DiffJob
    from .controllers.estimate import EstimateJob
    from .controllers.filter import FilterJob, FilterResult
    from .controllers.values import NormsJob, NormsResult
    from .screens.progress import ProgressScreen


class _Progress(Message):
    """Progress of one job: a queued older report of the same job is skipped."""

    def can_replace(self, message: Message) -> bool:
        return type(message) is type(self) and getattr(message, "job", None) is getattr(self, "job", None)


@dataclass
class CheckpointOpened(Message):
    ckpt: Checkpoint


@dataclass
class CheckpointFailed(Message):
    line: str


@dataclass
class StatsReady(Message):
    """One tensor's statistics and histogram, or an error line (TensorStats.compute)."""

    name: str
    result: tuple


@dataclass
class NormsProgress(_Progress):
    job: NormsJob
    done: int
    total: int


@dataclass
class NormsReady(Message):
    job: NormsJob
    result: NormsResult


@dataclass
class EstimateReady(Message):
    job: EstimateJob
    estimate: MemoryEstimate


@dataclass
class FilterReady(Message):
    job: FilterJob
    result: FilterResult


@dataclass
class DiffOpened(Message):
    job: DiffJob
    live: LiveDiff


@dataclass
class DiffFailed(Message):
    job: DiffJob
    line: str


@dataclass
class DiffProgress(_Progress):
    job: DiffJob
    done: int


@dataclass
class DiffResults(Message):
    job: DiffJob
    batch: Batch


@dataclass
class DevicesListed(Message):
    devices: list[DeviceInfo]
    names: list[str]
    what: str


@dataclass
class Moved(Message):
    screen: ProgressScreen  # to close
    message: str
    severity: str


@dataclass
class Audited(Message):
    screen: ProgressScreen
    report: AuditReport


@dataclass
class Notice(Message):
    """A background save finished (or failed): one notification."""

    message: str
    severity: str = "information"
    timeout: float = 5


@dataclass
class GpuSampled(Message):
    sample: GpuSample

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, GpuSampled)  # only the newest sample is drawn
