"""`NvmlBackend`: nvidia-ml-py behind one lock, imported and initialised on the first sample.

One batched sample per call; every query that a GPU or driver cannot answer becomes `NA`, a
GPU that falls off the bus is marked lost and not queried again, and the whole call never
raises. When this process has initialised CUDA through torch, torch's own device UUIDs and
allocator figures are added (torch is never imported here).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from .backend import FAILURES, LOST_STATUS, NO_PERMISSION_STATUS, failure_sample, ok_status
from .cuda import CudaMapping, DeviceIdentity, current_mapping, torch_if_cuda_initialised
from .host import cached_process_name, prune_name_cache, read_host_memory
from .na import NA, NAType
from .snapshot import GpuProcess, GpuSample, GpuSnapshot, MigDevice, TorchMemory


class _Lost(Exception):
    pass


@dataclass
class _NvmlDevice:
    nvml_index: int
    handle: Any
    name: str
    uuid: str | NAType
    pci_bus_id: str | NAType
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
        self._driver: str | NAType = NA
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
                    name=cached_process_name(pid, live),
                    used_memory=int(used) if used is not None else NA,
                    is_self=pid == me,
                    gpu_instance_id=_mig_id(gi),
                    compute_instance_id=_mig_id(ci),
                )
            )
        out.sort(key=lambda p: (-(p.used_memory if p.used_memory is not NA else -1), p.pid))
        return tuple(out)

    def _mig(self, dev: _NvmlDevice) -> tuple[bool | NAType, list[tuple[Any, Any]]]:
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
        torch = torch_if_cuda_initialised()
        if self._mapping is not None and (self._mapping_from_torch or torch is None):
            return self._mapping
        idents = [
            DeviceIdentity(
                d.nvml_index, d.uuid, d.pci_bus_id, d.name, *mig_info.get(d.nvml_index, (False, ()))
            )
            for d in self._devices
        ]
        self._mapping = current_mapping(idents, self._env)
        self._mapping_from_torch = self._mapping.source == "torch"
        return self._mapping

    def sample(self) -> GpuSample:
        started = time.perf_counter()
        try:
            with self._lock:
                if not self._init_locked():
                    state, status = self._failure or ("error", FAILURES["error"])
                    return failure_sample(self.kind, state, status, started)
                return self._sample_locked(started)
        except Exception as exc:  # belt and braces: a sample never raises
            return failure_sample(
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
        prune_name_cache(live)
        mapping = self._current_mapping(mig_info)
        torch = torch_if_cuda_initialised()
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
            status=ok_status(gpus, self._driver),
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


