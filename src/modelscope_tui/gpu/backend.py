"""What every backend promises: `sample() -> GpuSample` never raises. A missing driver, a
permission problem or a lost GPU is a state and a plain-words status line (the words are here,
shared by the NVML and simulated backends), with host RAM still filled in."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from .host import read_host_memory
from .na import NA, NAType
from .snapshot import GpuSample, GpuSnapshot

FAILURES = {
    "no-nvml": "No NVML: the nvidia-ml-py package is not installed (pip install nvidia-ml-py)",
    "no-driver": "No NVIDIA driver: NVML library not found",
    "driver-not-loaded": "No NVIDIA driver: the NVIDIA kernel module is not loaded",
    "driver-mismatch": (
        "NVIDIA driver/library version mismatch: the loaded kernel module and libnvidia-ml differ"
        " (reboot, or reload the nvidia kernel module)"
    ),
    "no-permission": "No permission to query NVIDIA GPUs (check access to /dev/nvidia*)",
    "no-gpus": "No NVIDIA GPUs found (the driver is loaded but reports no devices)",
    "error": "NVML failed",
}
LOST_STATUS = "lost: fell off the bus (NVML: GPU is lost); reset or reboot to recover"
NO_PERMISSION_STATUS = "no permission to query this GPU"


class GpuBackend(Protocol):
    kind: str

    def sample(self) -> GpuSample: ...

    def close(self) -> None: ...


def failure_sample(backend: str, state: str, status: str, started: float) -> GpuSample:
    """A sample with no GPUs that says why (host RAM still read)."""
    return GpuSample(
        timestamp=time.time(),
        backend=backend,
        state=state,
        status=status,
        host=read_host_memory(),
        sample_seconds=time.perf_counter() - started,
    )


def ok_status(gpus: Sequence[GpuSnapshot], driver: str | NAType, simulated_by: str = "") -> str:
    """`2 GPUs, NVIDIA driver 550.54.15, lost: GPU 1 (...)`; `simulated_by` names the switch
    that made the GPUs up, so a simulated status can never pass for a real one."""
    n = len(gpus)
    what = (
        f"{n} simulated GPU{'s' if n != 1 else ''} ({simulated_by})"
        if simulated_by
        else f"{n} GPU{'s' if n != 1 else ''}"
    )
    parts = [what]
    if driver is not NA:
        parts.append(f"NVIDIA driver {driver}")
    lost = [g.nvml_index for g in gpus if g.lost]
    if lost:
        parts.append(f"lost: GPU {', '.join(map(str, lost))} (the others keep updating)")
    return ", ".join(parts)
