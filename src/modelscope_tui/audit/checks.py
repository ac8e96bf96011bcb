"""The check registry: one class per family of checks, registered by subclassing `Check` (the way
fickling registers its analyses), and the `AuditRun` every check reads its options from. The
runner iterates `Check.registry` in `order`, so a new check is a new subclass in its family's
module and nothing else changes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..checkpoint import Checkpoint
from ..values.stats import DEFAULT_CHUNK_BYTES, ProgressFn

if TYPE_CHECKING:
    from .findings import AuditReport


@dataclass(slots=True)
class AuditRun:
    """One audit's checkpoint and options (see runner.run_audit)."""

    ckpt: Checkpoint
    unreadable: set[int]  # ids of records whose bytes are not all in the file: never read
    stats: bool = False
    dedupe: bool = False
    crc: bool = False
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    threads: int | None = None
    progress: ProgressFn | None = None
    cancel: threading.Event | None = None
    cluster: Any = None  # a values.cluster.Cluster (--dask): statistics are read there


class Check:
    """A family of checks. `applies` says whether this audit wants it (metadata checks always
    run; the others follow the options); `run` adds findings and facts to the report. Findings
    keep the order of the registry (within a severity), which JSON consumers may rely on.
    Raises errors.Cancelled to stop the audit (the report keeps what was found)."""

    registry: ClassVar[list[type[Check]]] = []
    order: ClassVar[int]  # position in the report: metadata (10-30), then bytes read (40-)

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        Check.registry.append(cls)
        Check.registry.sort(key=lambda c: c.order)

    def applies(self, run: AuditRun) -> bool:
        return True

    def run(self, run: AuditRun, report: AuditReport) -> None:
        raise NotImplementedError
