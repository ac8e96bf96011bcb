"""Frozen snapshots: one `GpuSample` per tick, one `GpuSnapshot` per GPU, and what they hold.

A figure a GPU cannot give is `NA` (see `na`), never an exception; `lost` and `status` say what
happened to a GPU that stopped answering, and the others keep their figures.

NVML reports host PIDs. Inside a container with its own PID namespace the PIDs (and so the
process names and the "this process" flag) may not match; names are then `NA`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..units import fmt_bytes
from .cuda import CudaMapping
from .na import NA, NAType, na_or


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    name: str | NAType  # /proc/PID/comm; NA when the PID is not visible (containers)
    used_memory: int | NAType  # bytes of GPU memory NVML attributes to the process
    is_self: bool  # this Python process
    gpu_instance_id: int | NAType = NA  # MIG only
    compute_instance_id: int | NAType = NA


@dataclass(frozen=True)
class TorchMemory:
    """torch's caching-allocator figures for one device, from this process only."""

    allocated: int
    reserved: int
    max_allocated: int


@dataclass(frozen=True)
class MigDevice:
    index: int  # position under its parent GPU
    uuid: str | NAType  # "MIG-..."
    memory_used: int | NAType
    memory_total: int | NAType
    gpu_instance_id: int | NAType = NA
    compute_instance_id: int | NAType = NA
    cuda_index: int | None = None
    torch_memory: TorchMemory | None = None


@dataclass(frozen=True)
class GpuSnapshot:
    nvml_index: int  # nvidia-smi's number
    cuda_index: int | None  # torch's `cuda:N` in this process, None when CUDA cannot see it
    name: str
    uuid: str | NAType
    pci_bus_id: str | NAType
    memory_used: int | NAType = NA  # bytes
    memory_reserved: int | NAType = NA  # driver-reserved bytes (NVML memory info v2)
    memory_total: int | NAType = NA
    memory_free: int | NAType = NA
    util_gpu: int | NAType = NA  # percent
    util_memory: int | NAType = NA  # percent
    temperature: int | NAType = NA  # degrees C
    power_draw: float | NAType = NA  # watts
    power_limit: float | NAType = NA  # watts (enforced limit)
    processes: tuple[GpuProcess, ...] = ()
    mig_mode: bool | NAType = NA
    mig_devices: tuple[MigDevice, ...] = ()
    torch_memory: TorchMemory | None = None
    lost: bool = False
    status: str = ""  # "" when fine; otherwise a plain-words line about this GPU
    simulated: bool = False

    @property
    def index(self) -> int:
        return self.nvml_index

    @property
    def label(self) -> str:
        """`GPU 0 (cuda:1)` / `GPU 3 (not visible to CUDA)`."""
        where = f"cuda:{self.cuda_index}" if self.cuda_index is not None else "not visible to CUDA"
        return f"GPU {self.nvml_index} ({where})"

    @property
    def memory_fraction(self) -> float | NAType:
        if self.memory_used is NA or self.memory_total is NA or not self.memory_total:
            return NA
        return self.memory_used / self.memory_total

    @property
    def self_process(self) -> GpuProcess | None:
        return next((p for p in self.processes if p.is_self), None)


@dataclass(frozen=True)
class HostMemory:
    total: int | NAType  # bytes, /proc/meminfo MemTotal
    available: int | NAType  # bytes, /proc/meminfo MemAvailable
    process_rss: int | NAType  # bytes, this process's resident set

    def line(self) -> str:
        return (
            f"host RAM: {na_or(self.available, fmt_bytes)} available of {na_or(self.total, fmt_bytes)};"
            f" this process {na_or(self.process_rss, fmt_bytes)} resident"
        )


STATES = ("ok", "no-nvml", "no-driver", "driver-mismatch", "no-permission", "no-gpus", "error")


@dataclass(frozen=True)
class GpuSample:
    """One tick: every GPU at (nearly) one instant, plus host RAM and a status line."""

    timestamp: float
    backend: str  # "nvml" | "simulated"
    state: str  # one of STATES
    status: str  # plain words, one line, no traceback
    host: HostMemory
    gpus: tuple[GpuSnapshot, ...] = ()
    driver_version: str | NAType = NA
    cuda_mapping: CudaMapping = field(default_factory=CudaMapping)
    sample_seconds: float = 0.0  # how long the tick took

    @property
    def ok(self) -> bool:
        return self.state == "ok"

    @property
    def simulated(self) -> bool:
        return self.backend == "simulated"

    def gpu(self, nvml_index: int) -> GpuSnapshot | None:
        return next((g for g in self.gpus if g.nvml_index == nvml_index), None)

    def by_cuda_index(self, cuda_index: int) -> GpuSnapshot | None:
        return next((g for g in self.gpus if g.cuda_index == cuda_index), None)

