"""`SimulatedBackend`: fake GPUs for tests, demos and snapshots, chosen by `MSCOPE_SIMULATE_GPUS`.

Deterministic for a seed and a tick count; names, process names and the status line all say
SIMULATED, so its figures can never be taken for a real GPU's. It maps `CUDA_VISIBLE_DEVICES`
with the same code as the NVML backend.
"""

from __future__ import annotations

import math
import os
import random
import time
import uuid as _uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .backend import FAILURES, LOST_STATUS, ok_status
from .cuda import CudaMapping, DeviceIdentity, map_cuda_devices
from .host import process_name, read_host_memory
from .na import NA, NAType
from .snapshot import STATES, GpuProcess, GpuSample, GpuSnapshot, HostMemory, MigDevice, TorchMemory

SIMULATE_ENV = "MSCOPE_SIMULATE_GPUS"
SIMULATE_LOST_ENV = "MSCOPE_SIMULATE_GPU_LOST"  # "G:K": simulated GPU G is lost after K ticks
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
        visible: str | None | NAType = NA,
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
            status=ok_status(gpus, NA, SIMULATE_ENV),
            host=host,
            gpus=tuple(gpus),
            driver_version=NA,
            cuda_mapping=mapping,
            sample_seconds=time.perf_counter() - started,
        )

