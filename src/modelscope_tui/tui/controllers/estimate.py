"""The fine-tune estimate under the GPU panel: training precision and optimizer to estimate
for, the current estimate (recomputed after each freeze change: the first one on a worker, the
later ones at once), and its lines with one fit line per GPU."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .jobs import Job, Latest

if TYPE_CHECKING:
    from ...training.session import Session

HINT = "t / T: precision / optimizer"


class EstimateJob(Job):
    def __init__(self, session: Session, precision: str, optimizer: str) -> None:
        super().__init__()
        self.session, self.precision, self.optimizer = session, precision, optimizer


class Estimator:
    def __init__(self, precision: str = "bf16-mixed", optimizer: str = "adamw") -> None:
        self.precision = precision
        self.optimizer = optimizer
        self.estimate = None  # the newest finished MemoryEstimate
        self.drawn = None  # fit_key() of what the panel shows; None: draw again
        self._jobs = Latest()

    def cycle_precision(self) -> str:
        from ...training.estimate import PRECISIONS

        names = [p for p in PRECISIONS if p != "as-saved"]
        self.precision = names[(names.index(self.precision) + 1) % len(names)]
        return self.precision

    def cycle_optimizer(self) -> str:
        from ...training.estimate import OPTIMIZERS

        names = list(OPTIMIZERS)
        self.optimizer = names[(names.index(self.optimizer) + 1) % len(names)]
        return self.optimizer

    def start(self, session: Session) -> EstimateJob | None:
        """A new estimate is needed (freeze state, precision or optimizer changed). Computed here
        when that is cheap (None): the panel then repaints in the same frame as the tree, not in
        a second full pass when a worker reports (a freeze of 50k tensors cost twice the target
        that way). Otherwise the job a worker must run (`compute`, then `ready`)."""
        from ...training.estimate import estimate_for_session, inventory_is_cheap

        if inventory_is_cheap(session):
            self._jobs.drop()  # a slower estimate still running describes an older state
            self.estimate = estimate_for_session(session, self.precision, self.optimizer)
            return None
        return self._jobs.start(EstimateJob(session, self.precision, self.optimizer))

    @staticmethod
    def compute(job: EstimateJob):
        """Worker thread: the first estimate of a checkpoint tallies every tensor (~100 ms for 100k)."""
        from ...training.estimate import estimate_for_session

        return estimate_for_session(job.session, job.precision, job.optimizer)

    def ready(self, job: EstimateJob, estimate) -> bool:
        """Keep a finished estimate unless a newer change is being estimated."""
        if not self._jobs.is_current(job):
            return False
        self.estimate = estimate
        return True

    @staticmethod
    def gpus_with_memory(sample) -> list:
        if sample is None or not sample.ok:
            return []
        return [g for g in sample.gpus if isinstance(g.memory_free, int)]

    def fit_key(self, sample) -> tuple:
        """Changes when the estimate does, or a GPU's free memory moves by 64 MiB or more: the fit
        lines are redrawn then, not on every tick."""
        return (id(self.estimate), tuple((g.nvml_index, g.memory_free >> 26) for g in self.gpus_with_memory(sample)))

    def lines(self, sample, width: int) -> list[tuple[str, str]]:
        """(text, style) lines: the estimate, one fit line per GPU (green fits, red does not),
        then the keys that change it. Every line at most `width` columns."""
        from ...training.estimate import fit_line, fits, panel_lines

        est = self.estimate
        out = [(line, "") for line in panel_lines(est, None, width=width)]
        for g in self.gpus_with_memory(sample):
            fit = f"GPU{g.nvml_index}: " + fit_line(est, g.memory_free)
            out.append((fit[:width], "green" if fits(est, g.memory_free)[0] else "red"))
        out.append((HINT[:width], "dim"))
        return out

    def close(self) -> None:
        self._jobs.cancel()
