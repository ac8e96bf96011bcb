"""Moving tensors onto devices: the placement (what lives where), the device list, and the
device_map export of the current placement."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import MscopeError
from ...units import fmt_bytes
from .jobs import Job, Latest

if TYPE_CHECKING:
    from ...training.session import Session


class MoveJob(Job):
    def __init__(self, names: list[str], device: str) -> None:
        super().__init__()
        self.names, self.device = names, device


class DeviceMover:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.placement = None  # a Placement once something was moved (it imports torch)
        self._jobs = Latest()

    @staticmethod
    def devices() -> list:
        """Worker thread: every device, unavailable ones with the reason (imports torch, which
        takes seconds the first time)."""
        from ...training.placement import available_devices

        return available_devices()

    def start(self, names: list[str], device: str) -> MoveJob:
        return self._jobs.start(MoveJob(names, device))

    def move(self, job: MoveJob, progress=None) -> tuple[str, str]:
        """Worker thread: read the tensors from the file onto the device, all or nothing.
        Returns (message, severity) for the user."""
        from ...training.placement import Placement

        if self.placement is None:
            self.placement = Placement(self.session.ckpt)
        try:
            result = self.placement.move(job.names, job.device, progress=progress, cancel=job.cancel)
        except MscopeError as exc:
            return exc.line(), "error"
        return result.message, "warning" if result.cancelled else "information"

    @property
    def placed(self) -> bool:
        return self.placement is not None and bool(self.placement.device)

    def device_of(self, name: str) -> str | None:
        return self.placement.device_of(name) if self.placement is not None else None

    def placed_line(self) -> str:
        """`cuda:0 1.2 GiB, cpu 3.4 MiB`: model bytes per device (what is still only in the file
        is left out)."""
        by_device = self.placement.bytes_by_device() if self.placement is not None else {}
        return ", ".join(f"{d} {fmt_bytes(b)}" for d, b in by_device.items() if d != "file")

    def device_map(self) -> dict:
        """The placement as a Hugging Face device_map (tensors not moved: cpu)."""
        from ...training.devicemap import export_device_map

        return export_device_map(self.session, self.placement.device, default="cpu")

    def default_map_path(self) -> Path:
        from ...write.atomic import sibling_path

        src = self.session.ckpt.path
        return sibling_path(src.parent / src.name if src.is_dir() else src, "device-map", ".json")

    def close(self) -> None:
        self._jobs.cancel()
