"""GPU monitor: NVML snapshots on a timer, matched to torch's CUDA indices; no Textual here.

Layers, bottom up:

- `NA`: the sentinel for a figure a GPU cannot give (NVML `NotSupported`, `NoPermission`, an old
  driver without the function, ...). It renders as "n/a", is falsy, and becomes `null` in JSON.
  No query here raises for such a figure.
- Frozen snapshots: `GpuSample` (one tick: every GPU, host RAM, a status line) holding
  `GpuSnapshot`s (one GPU) with `GpuProcess`es, `MigDevice`s and, when this process has
  initialised CUDA, `TorchMemory`.
- Backends with one method that matters, `sample() -> GpuSample`, which never raises:
  `NvmlBackend` (nvidia-ml-py, imported lazily, initialised once under a lock) and
  `SimulatedBackend` (deterministic fake GPUs for tests and demos; everything it returns says
  SIMULATED).
- `GpuMonitor`: one batched sample per tick on a daemon thread, handed to a callback, plus a
  bounded history of memory used per GPU for sparklines. `GpuMonitor.from_env()` picks the
  simulated backend when `MSCOPE_SIMULATE_GPUS=N` is set.
- `mscope gpus`: `add_gpus_arguments` / `run_gpus_command`, rendering with rich.

Failure states are values, not exceptions: `sample.state` is one of `STATES`, `sample.status`
is the plain-words line to show, and `sample.host` always carries host RAM figures so a panel
has something to show when there is no GPU.

## NVML indices and CUDA indices

NVML (and nvidia-smi) number GPUs in PCI bus order. CUDA numbers them in the order given by
`CUDA_DEVICE_ORDER`, whose default is `FASTEST_FIRST` (a speed heuristic; devices that tie,
such as identical models, stay in PCI bus order); `CUDA_DEVICE_ORDER=PCI_BUS_ID` makes CUDA use
nvidia-smi's order. `CUDA_VISIBLE_DEVICES` then selects and renumbers: `2,0` makes GPU 2
`cuda:0` and GPU 0 `cuda:1`; UUIDs (`GPU-8932f937-...`, any unique prefix) work the same way;
an empty value hides every GPU; parsing stops at the first invalid entry and a repeated entry
hides everything (torch's `_parse_visible_devices` mirrors CUDA here, and so do we).

`map_cuda_devices` computes the mapping without initialising CUDA. When torch has already
initialised CUDA in this process the mapping comes from `torch.cuda.get_device_properties(i).uuid`
and is exact. Otherwise it is parsed from `CUDA_VISIBLE_DEVICES`. Caveat: integer indices (and
an unset variable) are taken in PCI bus order, which is CUDA's order only with
`CUDA_DEVICE_ORDER=PCI_BUS_ID` or when all GPUs are the same model. On a box with mixed models
under the default `FASTEST_FIRST`, the mapping is marked `exact=False` and its note says so.
UUID lists are exact whatever the order. MIG devices are matched only through `MIG-...` UUIDs
(or torch); GPUs in MIG mode reached by integer index are flagged inexact.

NVML reports host PIDs. Inside a container with its own PID namespace the PIDs (and so the
process names and the "this process" flag) may not match; names are then `NA`.

## `mscope gpus --json` schema (`schema: "mscope.gpus"`, `schema_version: 1`)

One JSON object per sample (one line; `--watch --json` prints one line per tick)::

    schema, schema_version   "mscope.gpus", 1
    backend                  "nvml" | "simulated"
    state                    "ok" | "no-nvml" | "no-driver" | "driver-mismatch"
                             | "no-permission" | "no-gpus" | "error"
    status                   the one plain-words status line
    timestamp                seconds since the epoch (float)
    driver_version           string or null
    cuda_mapping             {source: "torch"|"uuid"|"index"|"all"|"none"|"unknown",
                              exact: bool, note: string, visible_devices: string or null}
    host                     {total, available, process_rss}  bytes or null
    gpus[]                   nvml_index, cuda_index (int or null), name, uuid, pci_bus_id,
                             simulated, lost, status,
                             memory {used, reserved, total, free} bytes,
                             utilization {gpu, memory} percent,
                             temperature_c, power_w {draw, limit},
                             mig_mode (bool or null),
                             mig_devices[] {index, uuid, cuda_index, gpu_instance_id,
                                            compute_instance_id, memory {used, total}},
                             processes[] {pid, name, used_memory, is_self,
                                          gpu_instance_id, compute_instance_id},
                             torch {allocated, reserved, max_allocated} or null,
                             memory_history[] (bytes, oldest first; only with --watch)

A figure the GPU cannot give is `null`. New keys may be added within a schema version;
removing or changing one bumps it.
"""

from __future__ import annotations

import math
import os
import random
import sys
import threading
import time
import uuid as _uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from .errors import MscopeError
from .units import fmt_bytes, safe_text, sparkline

SCHEMA = "mscope.gpus"
SCHEMA_VERSION = 1
SIMULATE_ENV = "MSCOPE_SIMULATE_GPUS"
SIMULATE_LOST_ENV = "MSCOPE_SIMULATE_GPU_LOST"  # "G:K": simulated GPU G is lost after K ticks

# ---------------------------------------------------------------------------------------------
# NA sentinel


class _NAType:
    """A figure the GPU cannot give. Falsy, renders as "n/a", one instance (`NA`)."""

    _instance: _NAType | None = None

    def __new__(cls) -> _NAType:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NA"

    def __str__(self) -> str:
        return "n/a"

    def __format__(self, spec: str) -> str:
        try:
            return format("n/a", spec)
        except ValueError:  # a numeric spec such as ".1f"
            return "n/a"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "NA"

    def __copy__(self) -> _NAType:
        return self

    def __deepcopy__(self, memo: Any) -> _NAType:
        return self


NA = _NAType()


def is_na(value: Any) -> bool:
    return value is NA


def na_or(value: Any, render: Callable[[Any], str] = str) -> str:
    """`render(value)`, or "n/a" for NA / None."""
    return "n/a" if value is NA or value is None else render(value)


def _json_value(value: Any) -> Any:
    return None if value is NA else value


# ---------------------------------------------------------------------------------------------
# Snapshots


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    name: str | _NAType  # /proc/PID/comm; NA when the PID is not visible (containers)
    used_memory: int | _NAType  # bytes of GPU memory NVML attributes to the process
    is_self: bool  # this Python process
    gpu_instance_id: int | _NAType = NA  # MIG only
    compute_instance_id: int | _NAType = NA


@dataclass(frozen=True)
class TorchMemory:
    """torch's caching-allocator figures for one device, from this process only."""

    allocated: int
    reserved: int
    max_allocated: int


@dataclass(frozen=True)
class MigDevice:
    index: int  # position under its parent GPU
    uuid: str | _NAType  # "MIG-..."
    memory_used: int | _NAType
    memory_total: int | _NAType
    gpu_instance_id: int | _NAType = NA
    compute_instance_id: int | _NAType = NA
    cuda_index: int | None = None
    torch_memory: TorchMemory | None = None


@dataclass(frozen=True)
class GpuSnapshot:
    nvml_index: int  # nvidia-smi's number
    cuda_index: int | None  # torch's `cuda:N` in this process, None when CUDA cannot see it
    name: str
    uuid: str | _NAType
    pci_bus_id: str | _NAType
    memory_used: int | _NAType = NA  # bytes
    memory_reserved: int | _NAType = NA  # driver-reserved bytes (NVML memory info v2)
    memory_total: int | _NAType = NA
    memory_free: int | _NAType = NA
    util_gpu: int | _NAType = NA  # percent
    util_memory: int | _NAType = NA  # percent
    temperature: int | _NAType = NA  # degrees C
    power_draw: float | _NAType = NA  # watts
    power_limit: float | _NAType = NA  # watts (enforced limit)
    processes: tuple[GpuProcess, ...] = ()
    mig_mode: bool | _NAType = NA
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
    def memory_fraction(self) -> float | _NAType:
        if self.memory_used is NA or self.memory_total is NA or not self.memory_total:
            return NA
        return self.memory_used / self.memory_total

    @property
    def self_process(self) -> GpuProcess | None:
        return next((p for p in self.processes if p.is_self), None)


@dataclass(frozen=True)
class HostMemory:
    total: int | _NAType  # bytes, /proc/meminfo MemTotal
    available: int | _NAType  # bytes, /proc/meminfo MemAvailable
    process_rss: int | _NAType  # bytes, this process's resident set

    def line(self) -> str:
        return (
            f"host RAM: {na_or(self.available, fmt_bytes)} available of {na_or(self.total, fmt_bytes)};"
            f" this process {na_or(self.process_rss, fmt_bytes)} resident"
        )


@dataclass(frozen=True)
class CudaMapping:
    """Which NVML GPU (and MIG device) is which `cuda:N` in this process."""

    gpu: Mapping[int, int] = field(default_factory=dict)  # nvml_index -> cuda index
    mig: Mapping[str, int] = field(default_factory=dict)  # normalised MIG uuid -> cuda index
    source: str = "unknown"  # torch | uuid | index | all | none | unknown
    exact: bool = False
    note: str = ""
    visible_devices: str | None = None  # CUDA_VISIBLE_DEVICES as read

    def cuda_index(self, nvml_index: int) -> int | None:
        return self.gpu.get(nvml_index)

    def mig_cuda_index(self, mig_uuid: str | _NAType) -> int | None:
        return None if mig_uuid is NA else self.mig.get(_norm_uuid(mig_uuid))


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
    driver_version: str | _NAType = NA
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


# ---------------------------------------------------------------------------------------------
# Host RAM


def read_host_memory() -> HostMemory:
    """MemTotal / MemAvailable from /proc/meminfo and this process's RSS; NA where unreadable."""
    total: int | _NAType = NA
    available: int | _NAType = NA
    rss: int | _NAType = NA
    try:
        with open("/proc/meminfo", "rb") as fh:
            for line in fh:
                if line.startswith(b"MemTotal:"):
                    total = int(line.split()[1]) * 1024
                elif line.startswith(b"MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/proc/self/statm", "rb") as fh:
            rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    return HostMemory(total, available, rss)


_NAME_CACHE: dict[int, str | _NAType] = {}


def process_name(pid: int) -> str | _NAType:
    """/proc/PID/comm, else the first word of /proc/PID/cmdline; NA when invisible."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as fh:
            name = fh.read().decode("utf-8", "replace").strip()
            if name:
                return name
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            first = fh.read().split(b"\0", 1)[0].decode("utf-8", "replace")
            if first:
                return os.path.basename(first)
    except OSError:
        pass
    return NA


def _cached_process_name(pid: int, live: set[int]) -> str | _NAType:
    name = _NAME_CACHE.get(pid)
    if name is None:
        name = process_name(pid)
        _NAME_CACHE[pid] = name
    live.add(pid)
    return name


def _prune_name_cache(live: set[int]) -> None:
    if len(_NAME_CACHE) > 4 * max(len(live), 64):
        for pid in [p for p in _NAME_CACHE if p not in live]:
            _NAME_CACHE.pop(pid, None)


# ---------------------------------------------------------------------------------------------
# CUDA index mapping


@dataclass(frozen=True)
class DeviceIdentity:
    """What the mapping needs to know about one NVML GPU."""

    nvml_index: int
    uuid: str | _NAType
    pci_bus_id: str | _NAType = NA
    name: str = ""
    mig_enabled: bool = False
    mig_uuids: tuple[str, ...] = ()


def _norm_uuid(value: str) -> str:
    """`GPU-ABC...` / `MIG-abc...` / `abc...` -> `abc...` (lower case, no prefix)."""
    v = str(value).strip().lower()
    for prefix in ("gpu-", "mig-"):
        if v.startswith(prefix):
            v = v[len(prefix) :]
    return v


def _pci_key(bus_id: str | _NAType) -> tuple[int, ...]:
    """Sort key for a bus id: `00000000:3B:00.0` -> (0, 0x3B, 0, 0), as nvidia-smi orders."""
    if bus_id is NA:
        return (1 << 62,)
    parts: list[int] = []
    for chunk in str(bus_id).replace(".", ":").split(":"):
        try:
            parts.append(int(chunk, 16))
        except ValueError:
            parts.append(1 << 62)
    return tuple(parts)


def _strtoul(s: str) -> int:
    """CUDA's reading of one integer entry: the leading digits, or -1 (`1gpu` -> 1, `x` -> -1)."""
    digits = ""
    for i, c in enumerate(s):
        if c.isdigit() or (i == 0 and c in "+-"):
            digits += c
        else:
            break
    try:
        return int(digits)
    except ValueError:
        return -1


def map_cuda_devices(
    devices: Sequence[DeviceIdentity],
    visible: str | None,
    *,
    device_order: str | None = None,
    torch_uuids: Sequence[str] | None = None,
) -> CudaMapping:
    """Map NVML GPUs to this process's CUDA indices; never initialises CUDA (see module doc).

    `visible` is CUDA_VISIBLE_DEVICES (None: unset), `device_order` CUDA_DEVICE_ORDER,
    `torch_uuids` the UUID of each `cuda:i` when torch has initialised CUDA (exact).
    """
    if torch_uuids is not None:
        return _map_from_torch(devices, torch_uuids, visible)

    order = sorted(devices, key=lambda d: (_pci_key(d.pci_bus_id), d.nvml_index))
    pci_order = (device_order or "").strip().upper() == "PCI_BUS_ID"
    names = {d.name for d in devices}
    caveats = []
    order_exact = pci_order or len(names) <= 1
    if not order_exact:
        caveats.append(
            "CUDA_DEVICE_ORDER is FASTEST_FIRST (CUDA's default) and the GPUs are different models,"
            " so cuda indices assume PCI bus order and may be wrong; set CUDA_DEVICE_ORDER=PCI_BUS_ID"
        )
    if any(d.mig_enabled for d in devices):
        caveats.append("GPUs in MIG mode are matched to cuda indices only by MIG-... UUIDs")

    if visible is None:
        gpu = {d.nvml_index: i for i, d in enumerate(order)}
        exact = order_exact and not any(d.mig_enabled for d in devices)
        return CudaMapping(gpu, {}, "all", exact, "; ".join(caveats), visible)

    if not visible.strip():
        note = "CUDA_VISIBLE_DEVICES is empty: no GPU is visible to CUDA in this process"
        return CudaMapping({}, {}, "none", True, note, visible)

    entries = [e.strip() for e in visible.split(",")]
    first = entries[0].lower()
    if first.startswith("gpu-") or first.startswith("mig-"):
        mig = first.startswith("mig-")
        prefix = "mig-" if mig else "gpu-"
        candidates: list[tuple[Any, str]] = []
        if mig:
            for d in devices:
                candidates.extend((d, _norm_uuid(u)) for u in d.mig_uuids)
        else:
            candidates = [(d, _norm_uuid(d.uuid)) for d in devices if d.uuid is not NA]
        chosen: list[tuple[Any, str]] = []
        stopped = ""
        for entry in entries:
            if not entry.lower().startswith(prefix):
                stopped = f"stopped at {entry!r} (not a {prefix.upper()} UUID)"
                break
            want = _norm_uuid(entry)
            if want.startswith("gpu-"):  # legacy MIG-GPU-<uuid>/gi/ci form
                stopped = f"legacy MIG entry {entry!r} not matched"
                break
            hits = [c for c in candidates if c[1].startswith(want)]
            if len(hits) != 1:
                why = "matches no GPU" if not hits else "is ambiguous"
                stopped = f"stopped at {entry!r}, which {why}"
                break
            if hits[0] in chosen:
                note = f"CUDA_VISIBLE_DEVICES repeats {entry!r}: CUDA then sees no GPU"
                return CudaMapping({}, {}, "none", True, note, visible)
            chosen.append(hits[0])
        if mig:
            mig_map = {key: i for i, (_, key) in enumerate(chosen)}
            return CudaMapping({}, mig_map, "uuid", True, stopped, visible)
        gpu = {d.nvml_index: i for i, (d, _) in enumerate(chosen)}
        return CudaMapping(gpu, {}, "uuid", True, stopped, visible)

    gpu = {}
    stopped = ""
    picked: list[int] = []
    for entry in entries:
        n = _strtoul(entry)
        if n < 0 or n >= len(order):
            stopped = f"stopped at {entry!r} (not a GPU index here)"
            break
        if n in picked:
            note = f"CUDA_VISIBLE_DEVICES repeats {entry!r}: CUDA then sees no GPU"
            return CudaMapping({}, {}, "none", True, note, visible)
        picked.append(n)
        gpu[order[n].nvml_index] = len(picked) - 1
    chosen_mig = any(order[n].mig_enabled for n in picked)
    note = "; ".join([*([stopped] if stopped else []), *caveats])
    return CudaMapping(gpu, {}, "index", order_exact and not chosen_mig, note, visible)


def _map_from_torch(
    devices: Sequence[DeviceIdentity], torch_uuids: Sequence[str], visible: str | None
) -> CudaMapping:
    by_uuid = {_norm_uuid(d.uuid): d for d in devices if d.uuid is not NA}
    mig_uuids = {_norm_uuid(u) for d in devices for u in d.mig_uuids}
    gpu: dict[int, int] = {}
    mig: dict[str, int] = {}
    unmatched = []
    for i, raw in enumerate(torch_uuids):
        key = _norm_uuid(raw) if raw else ""
        if key in by_uuid:
            gpu[by_uuid[key].nvml_index] = i
        elif key and key in mig_uuids:
            mig[key] = i
        else:
            unmatched.append(f"cuda:{i}")
    note = f"no NVML device matches {', '.join(unmatched)}" if unmatched else ""
    return CudaMapping(gpu, mig, "torch", not unmatched, note, visible)


def _torch_if_cuda_initialised() -> Any:
    """torch, when this process imported it *and* initialised CUDA; never imports it."""
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None) if torch is not None else None
    try:
        if cuda is not None and cuda.is_initialized():
            return torch
    except Exception:
        pass
    return None


def _torch_uuids(torch: Any) -> list[str] | None:
    try:
        out = []
        for i in range(torch.cuda.device_count()):
            u = getattr(torch.cuda.get_device_properties(i), "uuid", None)
            out.append(str(u) if u is not None else "")
        return out
    except Exception:
        return None


def _torch_memory(torch: Any) -> dict[int, TorchMemory]:
    out: dict[int, TorchMemory] = {}
    try:
        count = torch.cuda.device_count()
    except Exception:
        return out
    for i in range(count):
        try:
            stats = torch.cuda.memory_stats(i)
            out[i] = TorchMemory(
                int(stats.get("allocated_bytes.all.current", 0)),
                int(stats.get("reserved_bytes.all.current", 0)),
                int(stats.get("allocated_bytes.all.peak", 0)),
            )
        except Exception:
            continue
    return out


def current_mapping(
    devices: Sequence[DeviceIdentity], env: Mapping[str, str] | None = None
) -> CudaMapping:
    """The mapping for this process now: torch's UUIDs if CUDA is up, else the environment."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    torch = _torch_if_cuda_initialised()
    uuids = _torch_uuids(torch) if torch is not None else None
    return map_cuda_devices(
        devices, visible, device_order=env.get("CUDA_DEVICE_ORDER"), torch_uuids=uuids
    )


# ---------------------------------------------------------------------------------------------
# Backends


class GpuBackend(Protocol):
    kind: str

    def sample(self) -> GpuSample: ...

    def close(self) -> None: ...


def _failure_sample(backend: str, state: str, status: str, started: float) -> GpuSample:
    return GpuSample(
        timestamp=time.time(),
        backend=backend,
        state=state,
        status=status,
        host=read_host_memory(),
        sample_seconds=time.perf_counter() - started,
    )


def _ok_status(gpus: Sequence[GpuSnapshot], driver: str | _NAType, simulated: bool) -> str:
    n = len(gpus)
    what = (
        f"{n} simulated GPU{'s' if n != 1 else ''} ({SIMULATE_ENV})"
        if simulated
        else f"{n} GPU{'s' if n != 1 else ''}"
    )
    parts = [what]
    if driver is not NA:
        parts.append(f"NVIDIA driver {driver}")
    lost = [g.nvml_index for g in gpus if g.lost]
    if lost:
        parts.append(f"lost: GPU {', '.join(map(str, lost))} (the others keep updating)")
    return ", ".join(parts)


class _Lost(Exception):
    pass


@dataclass
class _NvmlDevice:
    nvml_index: int
    handle: Any
    name: str
    uuid: str | _NAType
    pci_bus_id: str | _NAType
    status: str = ""
    lost: bool = False
    mig_supported: bool = True


class NvmlBackend:
    """nvidia-ml-py behind one lock: lazy init, one batched sample per call, never raises.

    `nvml` lets tests pass a stand-in for the `pynvml` module.
    """

    kind = "nvml"

    def __init__(self, nvml: Any = None, env: Mapping[str, str] | None = None) -> None:
        self._nvml = nvml
        self._env = env
        self._lock = threading.Lock()
        self._initialised = False
        self._failure: tuple[str, str] | None = None
        self._devices: list[_NvmlDevice] = []
        self._driver: str | _NAType = NA
        self._mem_v2 = True
        self._temp_fn = ""
        self._mapping: CudaMapping | None = None
        self._mapping_from_torch = False

    # -- init ------------------------------------------------------------------------------

    def _classify(self, exc: BaseException) -> tuple[str, str]:
        nv = self._nvml
        code = getattr(exc, "value", None)

        def is_(name: str) -> bool:
            return code is not None and code == getattr(nv, name, object())

        if is_("NVML_ERROR_LIBRARY_NOT_FOUND"):
            return "no-driver", FAILURES["no-driver"]
        if is_("NVML_ERROR_DRIVER_NOT_LOADED"):
            return "no-driver", FAILURES["driver-not-loaded"]
        if is_("NVML_ERROR_LIB_RM_VERSION_MISMATCH"):
            return "driver-mismatch", FAILURES["driver-mismatch"]
        if is_("NVML_ERROR_NO_PERMISSION"):
            return "no-permission", FAILURES["no-permission"]
        if is_("NVML_ERROR_FUNCTION_NOT_FOUND"):
            return (
                "driver-mismatch",
                "NVIDIA driver too old for this nvidia-ml-py (a function is missing)",
            )
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        return "error", f"{FAILURES['error']}: {detail}"

    def _init_locked(self) -> bool:
        if self._initialised:
            return True
        if self._failure is not None:
            return False
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                self._failure = ("no-nvml", FAILURES["no-nvml"])
                return False
            self._nvml = pynvml
        nv = self._nvml
        try:
            nv.nvmlInit()
        except Exception as exc:
            self._failure = self._classify(exc)
            return False
        try:
            self._driver = self._q(nv.nvmlSystemGetDriverVersion)
            count = nv.nvmlDeviceGetCount()
        except Exception as exc:
            self._failure = self._classify(exc)
            self._shutdown_quietly()
            return False
        if count <= 0:
            self._failure = ("no-gpus", FAILURES["no-gpus"])
            self._shutdown_quietly()
            return False
        self._devices = [self._open_device(i) for i in range(count)]
        self._initialised = True
        return True

    def _open_device(self, i: int) -> _NvmlDevice:
        nv = self._nvml
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(i)
        except Exception as exc:
            code = getattr(exc, "value", None)
            if code == getattr(nv, "NVML_ERROR_GPU_IS_LOST", object()):
                return _NvmlDevice(i, None, "unknown GPU", NA, NA, LOST_STATUS, lost=True)
            if code == getattr(nv, "NVML_ERROR_NO_PERMISSION", object()):
                return _NvmlDevice(i, None, "unknown GPU", NA, NA, NO_PERMISSION_STATUS)
            return _NvmlDevice(
                i, None, "unknown GPU", NA, NA, f"cannot open: {self._classify(exc)[1]}"
            )
        dev = _NvmlDevice(i, handle, "unknown GPU", NA, NA)
        try:
            name = self._q(nv.nvmlDeviceGetName, handle)
            dev.name = str(name) if name is not NA else "unknown GPU"
            dev.uuid = self._q(nv.nvmlDeviceGetUUID, handle)
            pci = self._q(nv.nvmlDeviceGetPciInfo, handle)
            dev.pci_bus_id = NA if pci is NA else _decode(getattr(pci, "busId", NA))
        except _Lost:
            dev.lost, dev.status = True, LOST_STATUS
        return dev

    def _shutdown_quietly(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass

    def close(self) -> None:
        with self._lock:
            if self._initialised:
                self._shutdown_quietly()
            self._initialised = False
            self._failure = None
            self._devices = []
            self._mapping = None

    # -- queries -----------------------------------------------------------------------------

    def _q(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One NVML call: its value, NA when unsupported/forbidden/failing, _Lost when lost."""
        try:
            value = fn(*args, **kwargs)
        except Exception as exc:
            if getattr(exc, "value", None) == getattr(
                self._nvml, "NVML_ERROR_GPU_IS_LOST", object()
            ):
                raise _Lost from None
            return NA
        return NA if value is None else value

    def _memory(self, handle: Any) -> tuple[Any, Any, Any, Any]:
        nv = self._nvml
        if self._mem_v2 and hasattr(nv, "nvmlMemory_v2"):
            info = self._q(nv.nvmlDeviceGetMemoryInfo, handle, version=nv.nvmlMemory_v2)
            if info is not NA:
                return info.used, info.reserved, info.total, info.free
            # v2 unsupported by this driver (or this GPU): v1 from now on if v1 works
        info = self._q(nv.nvmlDeviceGetMemoryInfo, handle)
        if info is NA:
            return NA, NA, NA, NA
        if self._mem_v2:
            self._mem_v2 = False
        return info.used, NA, info.total, info.free

    def _temperature(self, handle: Any) -> Any:
        """nvmlDeviceGetTemperatureV (newer drivers), else the deprecated nvmlDeviceGetTemperature;
        whichever answers first is kept for later ticks."""
        nv = self._nvml
        sensor = getattr(nv, "NVML_TEMPERATURE_GPU", 0)
        names = (
            [self._temp_fn]
            if self._temp_fn
            else ["nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature"]
        )
        for name in names:
            fn = getattr(nv, name, None)
            if fn is None:
                continue
            value = self._q(fn, handle, sensor)
            if value is not NA:
                self._temp_fn = name
                return int(value)
        return NA

    def _processes(self, handle: Any, live: set[int]) -> tuple[GpuProcess, ...]:
        nv = self._nvml
        procs = self._q(nv.nvmlDeviceGetComputeRunningProcesses, handle)
        if procs is NA and hasattr(nv, "nvmlDeviceGetComputeRunningProcesses_v2"):
            procs = self._q(nv.nvmlDeviceGetComputeRunningProcesses_v2, handle)
        if procs is NA:
            return ()
        me = os.getpid()
        out = []
        for p in procs:
            pid = int(getattr(p, "pid", -1))
            used = getattr(p, "usedGpuMemory", None)
            gi = getattr(p, "gpuInstanceId", None)
            ci = getattr(p, "computeInstanceId", None)
            out.append(
                GpuProcess(
                    pid=pid,
                    name=_cached_process_name(pid, live),
                    used_memory=int(used) if used is not None else NA,
                    is_self=pid == me,
                    gpu_instance_id=_mig_id(gi),
                    compute_instance_id=_mig_id(ci),
                )
            )
        out.sort(key=lambda p: (-(p.used_memory if p.used_memory is not NA else -1), p.pid))
        return tuple(out)

    def _mig(self, dev: _NvmlDevice) -> tuple[bool | _NAType, list[tuple[Any, Any]]]:
        """(mig mode, [(index, handle)])."""
        nv = self._nvml
        if not dev.mig_supported or not hasattr(nv, "nvmlDeviceGetMigMode"):
            return NA, []
        mode = self._q(nv.nvmlDeviceGetMigMode, dev.handle)
        if mode is NA:
            dev.mig_supported = False
            return NA, []
        enabled = bool(mode[0]) if isinstance(mode, (list, tuple)) else bool(mode)
        if not enabled:
            return False, []
        handles = []
        count = self._q(nv.nvmlDeviceGetMaxMigDeviceCount, dev.handle)
        for k in range(count if count is not NA else 0):
            h = self._q(nv.nvmlDeviceGetMigDeviceHandleByIndex, dev.handle, k)
            if h is not NA:
                handles.append((k, h))
        return True, handles

    def _mig_uuids(self, handles: Iterable[tuple[Any, Any]]) -> tuple[str, ...]:
        out = []
        for _, h in handles:
            u = self._q(self._nvml.nvmlDeviceGetUUID, h)
            if u is not NA:
                out.append(str(u))
        return tuple(out)

    # -- sample ------------------------------------------------------------------------------

    def _current_mapping(self, mig_info: dict[int, tuple[bool, tuple[str, ...]]]) -> CudaMapping:
        torch = _torch_if_cuda_initialised()
        if self._mapping is not None and (self._mapping_from_torch or torch is None):
            return self._mapping
        idents = [
            DeviceIdentity(
                d.nvml_index, d.uuid, d.pci_bus_id, d.name, *mig_info.get(d.nvml_index, (False, ()))
            )
            for d in self._devices
        ]
        env = os.environ if self._env is None else self._env
        uuids = _torch_uuids(torch) if torch is not None else None
        self._mapping = map_cuda_devices(
            idents,
            env.get("CUDA_VISIBLE_DEVICES"),
            device_order=env.get("CUDA_DEVICE_ORDER"),
            torch_uuids=uuids,
        )
        self._mapping_from_torch = uuids is not None
        return self._mapping

    def sample(self) -> GpuSample:
        started = time.perf_counter()
        try:
            with self._lock:
                if not self._init_locked():
                    state, status = self._failure or ("error", FAILURES["error"])
                    return _failure_sample(self.kind, state, status, started)
                return self._sample_locked(started)
        except Exception as exc:  # belt and braces: a sample never raises
            return _failure_sample(
                self.kind,
                "error",
                f"{FAILURES['error']}: {type(exc).__name__}: {exc}"[:200],
                started,
            )

    def _sample_locked(self, started: float) -> GpuSample:
        nv = self._nvml
        live: set[int] = set()
        raw: list[tuple[_NvmlDevice, dict[str, Any]]] = []
        mig_info: dict[int, tuple[bool, tuple[str, ...]]] = {}
        for dev in self._devices:
            if dev.lost or dev.handle is None:
                raw.append((dev, {}))
                continue
            try:
                h = dev.handle
                used, reserved, total, free = self._memory(h)
                util = self._q(nv.nvmlDeviceGetUtilizationRates, h)
                power = self._q(nv.nvmlDeviceGetPowerUsage, h)
                limit = self._q(nv.nvmlDeviceGetEnforcedPowerLimit, h)
                mig_mode, mig_handles = self._mig(dev)
                migs = []
                for k, mh in mig_handles:
                    mu = self._q(nv.nvmlDeviceGetUUID, mh)
                    mm = self._q(nv.nvmlDeviceGetMemoryInfo, mh)
                    gi = self._q(nv.nvmlDeviceGetGpuInstanceId, mh)
                    ci = self._q(nv.nvmlDeviceGetComputeInstanceId, mh)
                    migs.append((k, mu, mm, gi, ci))
                if mig_mode is True:
                    mig_info[dev.nvml_index] = (
                        True,
                        tuple(str(m[1]) for m in migs if m[1] is not NA),
                    )
                raw.append(
                    (
                        dev,
                        dict(
                            memory_used=_int(used),
                            memory_reserved=_int(reserved),
                            memory_total=_int(total),
                            memory_free=_int(free),
                            util_gpu=_int(getattr(util, "gpu", NA)),
                            util_memory=_int(getattr(util, "memory", NA)),
                            temperature=self._temperature(h),
                            power_draw=power / 1000.0 if power is not NA else NA,
                            power_limit=limit / 1000.0 if limit is not NA else NA,
                            processes=self._processes(h, live),
                            mig_mode=mig_mode,
                            migs=migs,
                        ),
                    )
                )
            except _Lost:
                dev.lost, dev.status = True, LOST_STATUS
                raw.append((dev, {}))
        _prune_name_cache(live)
        mapping = self._current_mapping(mig_info)
        torch = _torch_if_cuda_initialised()
        tmem = _torch_memory(torch) if torch is not None else {}
        gpus = []
        for dev, fig in raw:
            cuda = mapping.cuda_index(dev.nvml_index)
            base = GpuSnapshot(
                nvml_index=dev.nvml_index,
                cuda_index=cuda,
                name=dev.name,
                uuid=dev.uuid,
                pci_bus_id=dev.pci_bus_id,
                lost=dev.lost,
                status=dev.status,
            )
            if not fig:
                gpus.append(base)
                continue
            migs = []
            for k, mu, mm, gi, ci in fig.pop("migs"):
                mcuda = mapping.mig_cuda_index(mu)
                migs.append(
                    MigDevice(
                        index=k,
                        uuid=str(mu) if mu is not NA else NA,
                        memory_used=_int(getattr(mm, "used", NA)),
                        memory_total=_int(getattr(mm, "total", NA)),
                        gpu_instance_id=_int(gi),
                        compute_instance_id=_int(ci),
                        cuda_index=mcuda,
                        torch_memory=tmem.get(mcuda) if mcuda is not None else None,
                    )
                )
            gpus.append(
                replace(
                    base,
                    **fig,
                    mig_devices=tuple(migs),
                    torch_memory=tmem.get(cuda) if cuda is not None else None,
                )
            )
        return GpuSample(
            timestamp=time.time(),
            backend=self.kind,
            state="ok",
            status=_ok_status(gpus, self._driver, False),
            host=read_host_memory(),
            gpus=tuple(gpus),
            driver_version=self._driver,
            cuda_mapping=mapping,
            sample_seconds=time.perf_counter() - started,
        )


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return value


def _int(value: Any) -> Any:
    if value is NA or value is None:
        return NA
    try:
        return int(value)
    except (TypeError, ValueError):
        return NA


def _mig_id(value: Any) -> Any:
    # NVML fills 0xFFFFFFFF when the process is not in a MIG instance
    if value is None or value == 0xFFFFFFFF:
        return NA
    return int(value)


# ---------------------------------------------------------------------------------------------
# Simulated backend

SIM_PREFIX = "SIMULATED"
GiB = 1 << 30
MiB = 1 << 20


@dataclass
class _SimGpu:
    total: int
    base: float
    amplitude: float
    period: float
    phase: float
    uuid: str
    pci: str
    pids: tuple[int, ...]
    mig_uuids: tuple[str, ...] = ()


class SimulatedBackend:
    """Fake GPUs with the NVML backend's interface; deterministic for a seed and tick count.

    `failing=(g, k)`: GPU `g` answers `k` samples, then is lost. `mig`: GPU indices in MIG mode
    (two MIG devices each). `init_error`: a key of `FAILURES` (or a state) that every sample
    reports instead of GPUs. `with_torch`: fake torch allocator figures on cuda:0.
    `host`: fixed host RAM figures (snapshot tests); default reads the real ones.
    `visible`: CUDA_VISIBLE_DEVICES to map with (default: the environment's).
    """

    kind = "simulated"

    def __init__(
        self,
        n_gpus: int = 2,
        seed: int = 0,
        failing: tuple[int, int] | None = None,
        *,
        mig: Sequence[int] = (),
        init_error: str | None = None,
        with_torch: bool = False,
        host: HostMemory | None = None,
        clock: Callable[[], float] = time.time,
        visible: str | None | _NAType = NA,
        device_order: str | None = None,
        name: str = "NVIDIA H100 80GB HBM3",
    ) -> None:
        if n_gpus < 0:
            raise ValueError("n_gpus must be 0 or more")
        self.n_gpus = n_gpus
        self.seed = seed
        self.failing = failing
        self.init_error = init_error
        self.with_torch = with_torch
        self.tick = 0
        self._host = host
        self._clock = clock
        self._visible = visible
        self._device_order = device_order
        self._name = f"{SIM_PREFIX} {name}"
        self._rng = random.Random(seed)
        rng = random.Random(seed)
        self._gpus: list[_SimGpu] = []
        pid = 40000 + rng.randrange(1000) * 10
        for i in range(n_gpus):
            total = 80 * GiB
            n_procs = 1 + rng.randrange(3)
            pids = tuple(pid + k for k in range(n_procs))
            pid += 10
            migs = ()
            if i in set(mig):
                migs = tuple(f"MIG-{_uuid.UUID(int=rng.getrandbits(128))}" for _ in range(2))
            self._gpus.append(
                _SimGpu(
                    total=total,
                    base=0.15 + 0.5 * rng.random(),
                    amplitude=0.05 + 0.15 * rng.random(),
                    period=20 + 40 * rng.random(),
                    phase=rng.random() * 2 * math.pi,
                    uuid=f"GPU-{_uuid.UUID(int=rng.getrandbits(128))}",
                    pci=f"00000000:{0x18 + 0x11 * i:02X}:00.0",
                    pids=pids,
                    mig_uuids=migs,
                )
            )
        self._mapping: CudaMapping | None = None

    def identities(self) -> list[DeviceIdentity]:
        return [
            DeviceIdentity(i, g.uuid, g.pci, self._name, bool(g.mig_uuids), g.mig_uuids)
            for i, g in enumerate(self._gpus)
        ]

    def _get_mapping(self) -> CudaMapping:
        if self._mapping is None:
            visible = (
                os.environ.get("CUDA_VISIBLE_DEVICES") if self._visible is NA else self._visible
            )
            order = (
                self._device_order
                if self._device_order is not None
                else os.environ.get("CUDA_DEVICE_ORDER")
            )
            self._mapping = map_cuda_devices(self.identities(), visible, device_order=order)  # type: ignore[arg-type]
        return self._mapping

    def close(self) -> None:
        pass

    def sample(self) -> GpuSample:
        started = time.perf_counter()
        tick = self.tick
        self.tick += 1
        host = self._host or read_host_memory()
        if self.init_error is not None:
            key = self.init_error
            state = (
                key if key in STATES else ("no-driver" if key == "driver-not-loaded" else "error")
            )
            status = f"{FAILURES.get(key, key)} [{SIM_PREFIX}]"
            return GpuSample(
                self._clock(),
                self.kind,
                state,
                status,
                host,
                sample_seconds=time.perf_counter() - started,
            )
        if not self._gpus:
            status = f"{FAILURES['no-gpus']} [{SIM_PREFIX}]"
            return GpuSample(
                self._clock(),
                self.kind,
                "no-gpus",
                status,
                host,
                sample_seconds=time.perf_counter() - started,
            )
        mapping = self._get_mapping()
        me = os.getpid()
        rng = self._rng
        gpus = []
        for i, g in enumerate(self._gpus):
            cuda = mapping.cuda_index(i)
            if self.failing is not None and self.failing[0] == i and tick >= self.failing[1]:
                gpus.append(
                    GpuSnapshot(
                        i,
                        cuda,
                        self._name,
                        g.uuid,
                        g.pci,
                        lost=True,
                        status=LOST_STATUS,
                        simulated=True,
                    )
                )
                continue
            frac = g.base + g.amplitude * math.sin(tick / g.period * 2 * math.pi + g.phase)
            frac = min(0.98, max(0.01, frac + rng.uniform(-0.005, 0.005)))
            used = int(frac * g.total) // MiB * MiB
            reserved = 512 * MiB
            procs = []
            share = used // (len(g.pids) + (1 if i == 0 else 0))
            if i == 0:
                procs.append(GpuProcess(me, f"{SIM_PREFIX} {process_name(me)}", share, True))
            for pid in g.pids:
                procs.append(GpuProcess(pid, f"{SIM_PREFIX} python", share, pid == me))
            migs: tuple[MigDevice, ...] = ()
            if g.mig_uuids:
                half = g.total // 2
                migs = tuple(
                    MigDevice(k, u, used // 2, half, k + 1, 0, mapping.mig_cuda_index(u))
                    for k, u in enumerate(g.mig_uuids)
                )
            torch_mem = None
            if self.with_torch and cuda == 0:
                alloc = min(share, 8 * GiB)
                torch_mem = TorchMemory(alloc, alloc + 256 * MiB, alloc + 128 * MiB)
            util = int(40 + 55 * abs(math.sin(tick / 7 + i)))
            gpus.append(
                GpuSnapshot(
                    nvml_index=i,
                    cuda_index=cuda,
                    name=self._name,
                    uuid=g.uuid,
                    pci_bus_id=g.pci,
                    memory_used=used,
                    memory_reserved=reserved,
                    memory_total=g.total,
                    memory_free=g.total - used - reserved,
                    util_gpu=util,
                    util_memory=util // 2,
                    temperature=45 + util // 3,
                    power_draw=round(120.0 + 5.5 * util, 1),
                    power_limit=700.0,
                    processes=tuple(procs),
                    mig_mode=bool(g.mig_uuids),
                    mig_devices=migs,
                    torch_memory=torch_mem,
                    simulated=True,
                )
            )
        return GpuSample(
            timestamp=self._clock(),
            backend=self.kind,
            state="ok",
            status=_ok_status(gpus, NA, True),
            host=host,
            gpus=tuple(gpus),
            driver_version=NA,
            cuda_mapping=mapping,
            sample_seconds=time.perf_counter() - started,
        )


# ---------------------------------------------------------------------------------------------
# Monitor


class GpuMonitor:
    """Samples a backend on a daemon thread and keeps a bounded memory history per GPU.

    - `sample()` takes one tick now (on the calling thread; it may block on first NVML init,
      so a UI should use `start()` and `latest` instead). It never raises.
    - `start(interval, on_sample)` samples every `interval` seconds on a daemon thread and calls
      `on_sample(sample)` from that thread (a Textual app wraps it in `call_from_thread`).
      Exceptions from the callback are counted (`callback_errors`) and swallowed.
    - `stop()` ends the thread (waits at most `timeout`; never hangs the caller).
    - `memory_history(nvml_index)`: memory used (bytes), oldest first, at most
      `history_seconds / interval` points.
    """

    def __init__(
        self,
        backend: GpuBackend | None = None,
        *,
        history_seconds: float = 300.0,
        interval: float = 1.0,
    ) -> None:
        self.backend: GpuBackend = backend if backend is not None else NvmlBackend()
        self.history_seconds = history_seconds
        self.interval = interval
        self._history: dict[int, deque[tuple[float, int]]] = {}
        self._sample_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._on_sample: Callable[[GpuSample], Any] | None = None
        self.latest: GpuSample | None = None
        self.ticks = 0
        self.callback_errors = 0
        self.last_callback_error = ""
        self.thread_cpu_seconds = 0.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **kwargs: Any) -> GpuMonitor:
        """NVML, or simulated GPUs when MSCOPE_SIMULATE_GPUS=N (N >= 0) is set.

        MSCOPE_SIMULATE_GPU_LOST=G:K additionally loses simulated GPU G after K ticks.
        Raises MscopeError (one line) for a malformed value.
        """
        env = os.environ if env is None else env
        raw = env.get(SIMULATE_ENV, "").strip()
        if not raw:
            return cls(NvmlBackend(), **kwargs)
        try:
            n = int(raw)
            if n < 0:
                raise ValueError
        except ValueError:
            raise MscopeError(
                f"{SIMULATE_ENV} must be a whole number of GPUs (0 or more), not {raw!r}"
            ) from None
        failing = None
        lost = env.get(SIMULATE_LOST_ENV, "").strip()
        if lost:
            try:
                g, k = (int(x) for x in lost.split(":"))
                failing = (g, k)
            except ValueError:
                raise MscopeError(
                    f"{SIMULATE_LOST_ENV} must look like GPU:TICKS (e.g. 1:5), not {lost!r}"
                ) from None
        return cls(SimulatedBackend(n, seed=0, failing=failing), **kwargs)

    # -- sampling ----------------------------------------------------------------------------

    @property
    def _maxlen(self) -> int:
        return max(2, int(math.ceil(self.history_seconds / max(self.interval, 1e-3))))

    def sample(self) -> GpuSample:
        with self._sample_lock:
            try:
                s = self.backend.sample()
            except Exception as exc:  # a backend that breaks its promise still cannot raise here
                s = GpuSample(
                    time.time(),
                    getattr(self.backend, "kind", "unknown"),
                    "error",
                    f"GPU monitor failed: {type(exc).__name__}: {exc}"[:200],
                    read_host_memory(),
                )
            self._record(s)
            self.latest = s
            self.ticks += 1
            return s

    def _record(self, s: GpuSample) -> None:
        maxlen = self._maxlen
        for g in s.gpus:
            if g.memory_used is NA:
                continue
            h = self._history.get(g.nvml_index)
            if h is None or h.maxlen != maxlen:
                h = deque(h or (), maxlen=maxlen)
                self._history[g.nvml_index] = h
            h.append((s.timestamp, g.memory_used))

    def history(self, nvml_index: int) -> list[tuple[float, int]]:
        """(timestamp, memory used bytes), oldest first."""
        return list(self._history.get(nvml_index, ()))

    def memory_history(self, nvml_index: int) -> list[int]:
        return [used for _, used in self._history.get(nvml_index, ())]

    # -- thread ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(
        self, interval: float = 1.0, on_sample: Callable[[GpuSample], Any] | None = None
    ) -> None:
        """Sample every `interval` seconds on a daemon thread. Calling again updates both."""
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.interval = interval
        self._on_sample = on_sample
        if self.running:
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(self._stop,), name="mscope-gpu-monitor", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """No callback starts after this returns; waits up to `timeout` for an in-flight tick."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        self._thread = None

    def close(self, timeout: float = 2.0) -> None:
        """Stop the thread and release NVML. From a UI thread whose callback is blocking
        (`call_from_thread`), pass `timeout=0` so the two never wait on each other."""
        self.stop(timeout)
        try:
            self.backend.close()
        except Exception:
            pass

    def __enter__(self) -> GpuMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                s = self.sample()
                cb = self._on_sample
                if cb is not None and not stop.is_set():
                    try:
                        cb(s)
                    except Exception as exc:
                        self.callback_errors += 1
                        self.last_callback_error = f"{type(exc).__name__}: {exc}"
            except BaseException:  # never let anything out of the thread
                pass
            self.thread_cpu_seconds = time.thread_time()
            stop.wait(max(0.0, self.interval - (time.monotonic() - t0)))


# ---------------------------------------------------------------------------------------------
# Rendering (rich, imported lazily) and JSON

def _pct(value: Any) -> str:
    return na_or(value, lambda v: f"{v}%")


def _watts(value: Any) -> str:
    return na_or(value, lambda v: f"{v:.0f}")


def gpu_lines(g: GpuSnapshot, history: Sequence[int] = ()) -> list[tuple[str, str]]:
    """(label, text) rows describing one GPU: what the CLI prints and a panel can reuse."""
    rows: list[tuple[str, str]] = [("id", f"{na_or(g.uuid)}  bus {na_or(g.pci_bus_id)}")]
    if g.lost or g.status:
        rows.append(("status", g.status or LOST_STATUS))
        if g.lost:
            return rows
    frac = g.memory_fraction
    mem = f"{na_or(g.memory_used, fmt_bytes)} / {na_or(g.memory_total, fmt_bytes)}"
    if frac is not NA:
        mem += f" ({frac * 100:.0f}%)"
    if history:
        mem += "  " + sparkline(
            history, 16, top=g.memory_total if g.memory_total is not NA else None
        )
    rows.append(("memory", mem))
    rows.append(
        (
            "",
            f"reserved {na_or(g.memory_reserved, fmt_bytes)}  free {na_or(g.memory_free, fmt_bytes)}",
        )
    )
    rows.append(
        (
            "load",
            f"gpu {_pct(g.util_gpu)}  mem {_pct(g.util_memory)}  {na_or(g.temperature, lambda v: f'{v}°C')}"
            f"  power {_watts(g.power_draw)} / {_watts(g.power_limit)} W",
        )
    )
    if g.torch_memory is not None:
        t = g.torch_memory
        rows.append(
            (
                "torch",
                f"allocated {fmt_bytes(t.allocated)}  reserved {fmt_bytes(t.reserved)}"
                f"  peak {fmt_bytes(t.max_allocated)}",
            )
        )
    if g.mig_mode is not NA:
        rows.append(("MIG", "on" if g.mig_mode else "off"))
    for m in g.mig_devices:
        where = f"cuda:{m.cuda_index}" if m.cuda_index is not None else "-"
        rows.append(
            (
                f"  mig {m.index}",
                f"{where}  {na_or(m.memory_used, fmt_bytes)} / {na_or(m.memory_total, fmt_bytes)}"
                f"  gi {na_or(m.gpu_instance_id)} ci {na_or(m.compute_instance_id)}",
            )
        )
    if not g.processes:
        rows.append(("processes", "none"))
    for p in g.processes[:8]:
        me = " (this process)" if p.is_self else ""
        name = safe_text(na_or(p.name))  # another user's process names its own command line
        if len(name) > 28:
            name = name[:27] + "…"
        rows.append(
            (
                "processes" if p is g.processes[0] else "",
                f"{p.pid:>7}  {name}{me}  {na_or(p.used_memory, fmt_bytes)}",
            )
        )
    if len(g.processes) > 8:
        rows.append(("", f"… {len(g.processes) - 8} more"))
    return rows


def render_sample(sample: GpuSample, monitor: GpuMonitor | None = None) -> Any:
    """A rich renderable: the status line, then one compact table per GPU (≤ 80 columns)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = [Text(sample.status, style="bold" if sample.ok else "bold yellow")]
    if not sample.ok:
        parts.append(Text(sample.host.line()))
        return Group(*parts)
    note = sample.cuda_mapping.note
    if note:
        parts.append(Text(f"cuda mapping: {note}", style="dim"))
    for g in sample.gpus:
        history = monitor.memory_history(g.nvml_index) if monitor is not None else ()
        table = Table(
            title=Text(f"{g.label}  {safe_text(g.name)}"),
            title_justify="left",
            title_style="bold red" if g.lost else "bold",
            show_header=False,
            box=box.ROUNDED,
            padding=(0, 1),
        )
        table.add_column("what", style="dim", no_wrap=True, width=9)
        table.add_column("value", overflow="fold", width=62)
        for label, text in gpu_lines(g, history if len(history) > 1 else ()):
            table.add_row(label, Text(text))  # Text, not markup: a process name may hold `[`
        parts.append(table)
    parts.append(Text(sample.host.line(), style="dim"))
    return Group(*parts)


def snapshot_to_dict(g: GpuSnapshot, history: Sequence[int] | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {
        "nvml_index": g.nvml_index,
        "cuda_index": g.cuda_index,
        "name": g.name,
        "uuid": _json_value(g.uuid),
        "pci_bus_id": _json_value(g.pci_bus_id),
        "simulated": g.simulated,
        "lost": g.lost,
        "status": g.status,
        "memory": {
            "used": _json_value(g.memory_used),
            "reserved": _json_value(g.memory_reserved),
            "total": _json_value(g.memory_total),
            "free": _json_value(g.memory_free),
        },
        "utilization": {"gpu": _json_value(g.util_gpu), "memory": _json_value(g.util_memory)},
        "temperature_c": _json_value(g.temperature),
        "power_w": {"draw": _json_value(g.power_draw), "limit": _json_value(g.power_limit)},
        "mig_mode": _json_value(g.mig_mode),
        "mig_devices": [
            {
                "index": m.index,
                "uuid": _json_value(m.uuid),
                "cuda_index": m.cuda_index,
                "gpu_instance_id": _json_value(m.gpu_instance_id),
                "compute_instance_id": _json_value(m.compute_instance_id),
                "memory": {
                    "used": _json_value(m.memory_used),
                    "total": _json_value(m.memory_total),
                },
            }
            for m in g.mig_devices
        ],
        "processes": [
            {
                "pid": p.pid,
                "name": _json_value(p.name),
                "used_memory": _json_value(p.used_memory),
                "is_self": p.is_self,
                "gpu_instance_id": _json_value(p.gpu_instance_id),
                "compute_instance_id": _json_value(p.compute_instance_id),
            }
            for p in g.processes
        ],
        "torch": (
            None
            if g.torch_memory is None
            else {
                "allocated": g.torch_memory.allocated,
                "reserved": g.torch_memory.reserved,
                "max_allocated": g.torch_memory.max_allocated,
            }
        ),
    }
    if history is not None:
        d["memory_history"] = list(history)
    return d


def sample_to_dict(sample: GpuSample, monitor: GpuMonitor | None = None) -> dict[str, Any]:
    """The `mscope.gpus` v1 document (see the module docstring)."""
    m = sample.cuda_mapping
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "backend": sample.backend,
        "state": sample.state,
        "status": sample.status,
        "timestamp": sample.timestamp,
        "driver_version": _json_value(sample.driver_version),
        "cuda_mapping": {
            "source": m.source,
            "exact": m.exact,
            "note": m.note,
            "visible_devices": m.visible_devices,
        },
        "host": {
            "total": _json_value(sample.host.total),
            "available": _json_value(sample.host.available),
            "process_rss": _json_value(sample.host.process_rss),
        },
        "gpus": [
            snapshot_to_dict(
                g, monitor.memory_history(g.nvml_index) if monitor is not None else None
            )
            for g in sample.gpus
        ],
    }
