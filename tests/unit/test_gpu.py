"""GPU monitor: simulated backend, NVML backend against a stand-in pynvml, CUDA index mapping,
the real NVML-missing path on this machine, and `mscope gpus` as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pynvml
import pytest

from modelscope_tui.cli.gpus import gpu_lines, render_sample
from modelscope_tui.errors import MscopeError
from modelscope_tui.gpu.backend import FAILURES, NO_PERMISSION_STATUS
from modelscope_tui.gpu.cuda import DeviceIdentity, map_cuda_devices
from modelscope_tui.gpu.monitor import GpuMonitor
from modelscope_tui.gpu.na import NA, na_or
from modelscope_tui.gpu.nvml import NvmlBackend
from modelscope_tui.gpu.schema import sample_to_dict
from modelscope_tui.gpu.simulated import SimulatedBackend
from modelscope_tui.gpu.snapshot import GpuSample, HostMemory, TorchMemory
from modelscope_tui.units import sparkline

FIXED_HOST = HostMemory(64 << 30, 32 << 30, 100 << 20)


def sim(n: int = 3, **kw) -> SimulatedBackend:
    kw.setdefault("host", FIXED_HOST)
    kw.setdefault("visible", None)
    return SimulatedBackend(n, seed=1, **kw)


# -- NA ------------------------------------------------------------------------------------------


def test_na_renders_and_is_falsy():
    assert str(NA) == "n/a" and repr(NA) == "NA" and not NA
    assert f"{NA:>5}" == "  n/a" and f"{NA:.1f}" == "n/a"
    assert na_or(NA) == "n/a" and na_or(5, lambda v: f"{v}%") == "5%"
    assert type(NA)() is NA
    import copy
    import pickle

    assert pickle.loads(pickle.dumps(NA)) is NA and copy.deepcopy(NA) is NA


# -- simulated snapshots -------------------------------------------------------------------------


def test_simulated_snapshot_fields():
    s = sim(3).sample()
    assert s.ok and s.state == "ok" and s.simulated and s.backend == "simulated"
    assert "3 simulated GPUs" in s.status
    assert len(s.gpus) == 3
    for i, g in enumerate(s.gpus):
        assert g.nvml_index == g.index == i and g.cuda_index == i
        assert g.name.startswith("SIMULATED") and g.simulated
        assert g.uuid.startswith("GPU-") and g.pci_bus_id.startswith("00000000:")
        assert 0 < g.memory_used < g.memory_total
        assert g.memory_used + g.memory_reserved + g.memory_free == g.memory_total
        assert 0 <= g.util_gpu <= 100 and g.temperature > 0 and 0 < g.power_draw <= g.power_limit
        assert g.processes and all(p.name.startswith("SIMULATED") for p in g.processes)
        assert g.mig_mode is False and g.mig_devices == ()
    me = s.gpus[0].self_process
    assert me is not None and me.pid == os.getpid() and me.is_self
    assert not any(p.is_self for g in s.gpus[1:] for p in g.processes)
    assert s.host == FIXED_HOST


def test_simulated_is_deterministic_and_memory_moves():
    a, b = sim(2), sim(2)
    ua = [a.sample().gpus[0].memory_used for _ in range(20)]
    ub = [b.sample().gpus[0].memory_used for _ in range(20)]
    assert ua == ub and len(set(ua)) > 5


def test_snapshots_are_frozen():
    g = sim(1).sample().gpus[0]
    with pytest.raises(AttributeError):
        g.memory_used = 0  # type: ignore[misc]


def test_simulated_mig_and_torch_figures():
    s = sim(2, mig=[1], with_torch=True).sample()
    g1 = s.gpus[1]
    assert g1.mig_mode is True and len(g1.mig_devices) == 2
    assert all(m.uuid.startswith("MIG-") for m in g1.mig_devices)
    assert s.gpus[0].torch_memory is not None and s.gpus[1].torch_memory is None


def test_simulated_failure_states_carry_host_ram():
    for key in ("no-driver", "driver-mismatch", "no-permission", "no-gpus"):
        s = sim(2, init_error=key).sample()
        assert s.state == key and not s.ok and s.gpus == ()
        assert s.status.startswith(FAILURES[key]) and "\n" not in s.status
        assert s.host.total is not NA
    s = sim(0).sample()
    assert s.state == "no-gpus" and s.host == FIXED_HOST


def test_eight_gpu_tick_is_fast():
    b = sim(8)
    b.sample()
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        b.sample()
        times.append(time.perf_counter() - t0)
    times.sort()
    assert times[len(times) // 2] < 0.005


# -- lost GPU ------------------------------------------------------------------------------------


def test_lost_gpu_others_continue():
    mon = GpuMonitor(sim(3, failing=(1, 3)), history_seconds=60)
    samples = [mon.sample() for _ in range(6)]
    for s in samples[:3]:
        assert not any(g.lost for g in s.gpus)
    for s in samples[3:]:
        assert s.ok, "one lost GPU does not fail the sample"
        lost = s.gpus[1]
        assert lost.lost and lost.memory_used is NA and "fell off the bus" in lost.status
        assert lost.name.startswith("SIMULATED") and lost.uuid is not NA
        assert all(not g.lost and g.memory_used is not NA for g in (s.gpus[0], s.gpus[2]))
        assert "lost: GPU 1" in s.status
    assert len(mon.memory_history(1)) == 3  # frozen at the last good value
    assert len(mon.memory_history(0)) == 6
    assert samples[-1].gpus[0].memory_used != samples[-2].gpus[0].memory_used


# -- history -------------------------------------------------------------------------------------


def test_history_is_bounded_by_minutes_over_interval():
    mon = GpuMonitor(sim(2), history_seconds=10, interval=1.0)
    for _ in range(25):
        mon.sample()
    h = mon.memory_history(0)
    assert len(h) == 10 and all(isinstance(v, int) for v in h)
    assert len(mon.history(1)) == 10 and mon.history(1)[0][0] <= mon.history(1)[-1][0]
    assert mon.memory_history(7) == []
    mon.interval = 2.0  # a slower tick keeps fewer points for the same minutes
    mon.sample()
    assert len(mon.memory_history(0)) == 5


def test_sparkline():
    """units.sparkline is the one sparkline (GPU memory here, norm profiles in audit and the TUI)."""
    assert sparkline([]) == ""
    assert sparkline([0, 0]) == "▁▁"
    line = sparkline([0, 50, 100], top=100)
    assert line == "▁▅█"
    assert len(sparkline(range(100), width=16)) == 16
    assert sparkline([1, 2, 3], 2) == "▆█"
    assert sparkline([5, 5], top=0) == "██"  # top 0: the largest value
    # floor: a value takes the eighth of the scale it falls in (norm profiles)
    assert sparkline([0, 0.5, 1.0]) == "▁▅█" and sparkline([0, 0.5, 1.0], floor=True) == "▁▄█"
    assert sparkline([0.0, 0.0]) == "▁▁" and sparkline([0.0], floor=True) == "▁"
    # fit: from the smallest value to the largest; all equal draws the middle cell (audit)
    assert sparkline([10, 11, 12], fit=True, floor=True) == "▁▄█"
    assert sparkline([3, 3, 3], fit=True) == "▄▄▄"


# -- thread --------------------------------------------------------------------------------------


def test_thread_starts_stops_and_feeds_callback():
    got: list[GpuSample] = []
    done = threading.Event()

    def cb(s: GpuSample) -> None:
        got.append(s)
        if len(got) >= 3:
            done.set()

    mon = GpuMonitor(sim(2))
    mon.start(interval=0.01, on_sample=cb)
    assert mon.running
    assert done.wait(5)
    mon.stop()
    assert not mon.running
    n = len(got)
    time.sleep(0.05)
    assert len(got) == n, "no callbacks after stop()"
    assert mon.latest is got[-1] and mon.thread_cpu_seconds >= 0
    assert all(t.name != "mscope-gpu-monitor" for t in threading.enumerate())


def test_thread_never_raises():
    class Exploding:
        kind = "boom"
        calls = 0

        def sample(self):
            self.calls += 1
            raise RuntimeError("backend broke")

        def close(self):
            raise RuntimeError("close broke too")

    errors: list = []
    old = threading.excepthook
    threading.excepthook = lambda args: errors.append(args)
    try:
        seen: list[GpuSample] = []
        mon = GpuMonitor(Exploding())

        def bad_callback(s):
            seen.append(s)
            raise ValueError("callback broke")

        mon.start(interval=0.005, on_sample=bad_callback)
        deadline = time.monotonic() + 5
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert mon.running, "the thread survives a broken backend and callback"
        mon.close()
    finally:
        threading.excepthook = old
    assert not errors
    assert seen and all(s.state == "error" and "backend broke" in s.status for s in seen)
    assert mon.callback_errors >= 3 and "callback broke" in mon.last_callback_error


def test_stop_without_start_and_restart():
    mon = GpuMonitor(sim(1))
    mon.stop()
    mon.start(0.01)
    mon.start(0.02)  # already running: updates the interval only
    assert mon.interval == 0.02
    mon.stop()
    mon.start(0.01)
    assert mon.running
    mon.close()
    assert not mon.running
    with pytest.raises(ValueError):
        mon.start(0)


# -- from_env ------------------------------------------------------------------------------------


def test_from_env():
    assert isinstance(GpuMonitor.from_env({}).backend, NvmlBackend)
    mon = GpuMonitor.from_env({"MSCOPE_SIMULATE_GPUS": "4", "MSCOPE_SIMULATE_GPU_LOST": "2:0"})
    assert isinstance(mon.backend, SimulatedBackend) and mon.backend.n_gpus == 4
    assert mon.sample().gpus[2].lost
    for bad in (
        {"MSCOPE_SIMULATE_GPUS": "x"},
        {"MSCOPE_SIMULATE_GPUS": "-1"},
        {"MSCOPE_SIMULATE_GPUS": "2", "MSCOPE_SIMULATE_GPU_LOST": "1"},
    ):
        with pytest.raises(MscopeError):
            GpuMonitor.from_env(bad)


# -- CUDA index mapping --------------------------------------------------------------------------

UUIDS = [
    "GPU-aaaa1111-0000-0000-0000-000000000000",
    "GPU-bbbb2222-0000-0000-0000-000000000000",
    "GPU-bbbb3333-0000-0000-0000-000000000000",
    "GPU-cccc4444-0000-0000-0000-000000000000",
]


def devices(names=("A100",) * 4, buses=None, mig=None):
    buses = buses or [f"00000000:{0x10 * (i + 1):02X}:00.0" for i in range(len(names))]
    mig = mig or {}
    return [
        DeviceIdentity(i, UUIDS[i], buses[i], names[i], i in mig, tuple(mig.get(i, ())))
        for i in range(len(names))
    ]


def cuda_of(mapping, n=4):
    return [mapping.cuda_index(i) for i in range(n)]


@pytest.mark.parametrize(
    "visible, expected, source",
    [
        (None, [0, 1, 2, 3], "all"),
        ("", [None] * 4, "none"),
        ("  ", [None] * 4, "none"),
        ("0,1,2,3", [0, 1, 2, 3], "index"),
        ("2,0", [1, None, 0, None], "index"),  # renumbering
        ("3", [None, None, None, 0], "index"),
        (" 1 , 3 ", [None, 0, None, 1], "index"),
        ("1,7,2", [None, 0, None, None], "index"),  # stops at the first invalid index
        ("1,-1,2", [None, 0, None, None], "index"),
        ("1gpu,2", [None, 0, 1, None], "index"),  # strtoul reading
        ("1,1", [None] * 4, "none"),  # a repeat hides everything
        ("abc", [None] * 4, "index"),
        (
            "GPU-cccc4444-0000-0000-0000-000000000000,GPU-aaaa1111-0000-0000-0000-000000000000",
            [1, None, None, 0],
            "uuid",
        ),
        ("GPU-cccc,GPU-aaaa", [1, None, None, 0], "uuid"),  # unique prefixes
        ("gpu-CCCC4444", [None, None, None, 0], "uuid"),  # case-insensitive
        ("GPU-aaaa,GPU-bbbb,GPU-cccc", [0, None, None, None], "uuid"),  # ambiguous prefix stops
        ("GPU-aaaa,GPU-ffff,GPU-cccc", [0, None, None, None], "uuid"),  # unknown stops
        ("GPU-aaaa,2", [0, None, None, None], "uuid"),  # mixed: stops at the integer
        ("GPU-aaaa,GPU-aaaa1111", [None] * 4, "none"),
    ],
)
def test_cuda_visible_devices(visible, expected, source):
    m = map_cuda_devices(devices(), visible)
    assert cuda_of(m) == expected
    assert m.source == source and m.visible_devices == visible


def test_mapping_follows_pci_bus_order_not_nvml_order():
    # NVML index 0 sits on the higher bus: PCI order puts NVML 1 first.
    devs = devices(names=("A100", "A100"), buses=["00000000:81:00.0", "00000000:01:00.0"])
    m = map_cuda_devices(devs, None)
    assert cuda_of(m, 2) == [1, 0] and m.exact
    m = map_cuda_devices(devs, "0")
    assert cuda_of(m, 2) == [None, 0]


def test_mixed_models_under_fastest_first_are_flagged():
    devs = devices(names=("RTX 3060", "A100", "A100", "A100"))
    m = map_cuda_devices(devs, None)
    assert not m.exact and "FASTEST_FIRST" in m.note and "PCI_BUS_ID" in m.note
    m = map_cuda_devices(devs, "1,0", device_order="PCI_BUS_ID")
    assert m.exact and cuda_of(m) == [1, 0, None, None] and m.note == ""
    m = map_cuda_devices(devs, f"{UUIDS[1]},{UUIDS[0]}")
    assert m.exact, "UUID lists fix the order whatever CUDA_DEVICE_ORDER says"


def test_torch_uuids_win_and_are_exact():
    devs = devices()
    torch_uuids = ["cccc4444-0000-0000-0000-000000000000", "aaaa1111-0000-0000-0000-000000000000"]
    m = map_cuda_devices(devs, "0,1", torch_uuids=torch_uuids)
    assert m.source == "torch" and m.exact and cuda_of(m) == [1, None, None, 0]
    m = map_cuda_devices(devs, None, torch_uuids=["GPU-ffff0000-0000-0000-0000-000000000000"])
    assert not m.exact and "cuda:0" in m.note


def test_mig_uuids():
    migs = {
        1: ("MIG-11111111-aaaa-0000-0000-000000000000", "MIG-22222222-bbbb-0000-0000-000000000000")
    }
    devs = devices(mig=migs)
    m = map_cuda_devices(devs, "MIG-22222222,MIG-11111111")
    assert m.source == "uuid" and cuda_of(m) == [None] * 4
    assert m.mig_cuda_index(migs[1][1]) == 0 and m.mig_cuda_index(migs[1][0]) == 1
    m = map_cuda_devices(devs, None)
    assert not m.exact and "MIG" in m.note
    m = map_cuda_devices(devs, None, torch_uuids=[migs[1][0][4:]])
    assert m.exact and m.mig_cuda_index(migs[1][0]) == 0


def test_simulated_backend_honours_visible_devices():
    s = sim(4, visible="3,1").sample()
    assert [g.cuda_index for g in s.gpus] == [None, 1, None, 0]
    assert s.gpus[3].label == "GPU 3 (cuda:0)" and "not visible" in s.gpus[0].label
    uuid2 = sim(4).sample().gpus[2].uuid
    s = sim(4, visible=uuid2[:12]).sample()
    assert [g.cuda_index for g in s.gpus] == [None, None, 0, None]


# -- NVML backend against a stand-in pynvml ------------------------------------------------------


class FakeNvml:
    """Enough of pynvml for NvmlBackend, raising the real pynvml error classes."""

    NVML_TEMPERATURE_GPU = 0
    nvmlMemory_v2 = pynvml.nvmlMemory_v2

    def __init__(self, n=2, init_error=None, lost_after=None, unsupported=(), mem_v2=True, mig=()):
        for name in dir(pynvml):
            if name.startswith("NVML_ERROR_"):
                setattr(self, name, getattr(pynvml, name))
        self.n, self.init_error, self.lost_after = n, init_error, lost_after or {}
        self.unsupported, self.mem_v2, self.mig = set(unsupported), mem_v2, set(mig)
        self.calls: dict[int, int] = {}
        self.shutdowns = 0

    def _err(self, code):
        return pynvml.NVMLError(code)

    def _check(self, h, what):
        i = h if isinstance(h, int) else h[0]
        if i in self.lost_after:
            self.calls[i] = self.calls.get(i, 0) + 1
            if self.calls[i] > self.lost_after[i]:
                raise self._err(pynvml.NVML_ERROR_GPU_IS_LOST)
        if what in self.unsupported:
            raise self._err(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlInit(self):
        if self.init_error is not None:
            raise self._err(self.init_error)

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self):
        return "550.54.15"

    def nvmlDeviceGetCount(self):
        return self.n

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return "NVIDIA A100-SXM4-80GB"

    def nvmlDeviceGetUUID(self, h):
        if isinstance(h, tuple):
            return f"MIG-{h[1]:08d}-0000-0000-0000-00000000000{h[0]}"
        return UUIDS[h]

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=f"00000000:{0x10 * (h + 1):02X}:00.0".encode())

    def nvmlDeviceGetMemoryInfo(self, h, version=None):
        if isinstance(h, tuple):
            return SimpleNamespace(used=1 << 30, total=10 << 30, free=9 << 30)
        self._check(h, "memory")
        if version is not None:
            if not self.mem_v2:
                raise self._err(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
            return SimpleNamespace(
                used=(h + 1) << 30, reserved=1 << 28, total=80 << 30, free=(79 - h) << 30
            )
        return SimpleNamespace(used=(h + 1) << 30, total=80 << 30, free=(79 - h) << 30)

    def nvmlDeviceGetUtilizationRates(self, h):
        self._check(h, "util")
        return SimpleNamespace(gpu=50, memory=25)

    def nvmlDeviceGetTemperature(self, h, sensor):
        self._check(h, "temperature")
        return 61

    def nvmlDeviceGetPowerUsage(self, h):
        self._check(h, "power")
        return 250_500

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        self._check(h, "power")
        return 400_000

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        self._check(h, "processes")
        return [
            SimpleNamespace(
                pid=os.getpid(),
                usedGpuMemory=3 << 30,
                gpuInstanceId=0xFFFFFFFF,
                computeInstanceId=0xFFFFFFFF,
            ),
            SimpleNamespace(
                pid=2**22 + 7,
                usedGpuMemory=None,
                gpuInstanceId=0xFFFFFFFF,
                computeInstanceId=0xFFFFFFFF,
            ),
        ]

    def nvmlDeviceGetMigMode(self, h):
        self._check(h, "mig")
        return [1, 1] if h in self.mig else [0, 0]

    def nvmlDeviceGetMaxMigDeviceCount(self, h):
        return 2

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h, k):
        return (h, k)

    def nvmlDeviceGetGpuInstanceId(self, h):
        return h[1] + 1

    def nvmlDeviceGetComputeInstanceId(self, h):
        return 0


def test_nvml_backend_full_sample():
    fake = FakeNvml(2)
    s = NvmlBackend(fake, env={}).sample()
    assert s.ok and s.backend == "nvml" and s.driver_version == "550.54.15"
    assert s.status == "2 GPUs, NVIDIA driver 550.54.15"
    g = s.gpus[1]
    assert (g.nvml_index, g.cuda_index, g.uuid, g.pci_bus_id) == (
        1,
        1,
        UUIDS[1],
        "00000000:20:00.0",
    )
    assert (g.memory_used, g.memory_reserved, g.memory_total) == (2 << 30, 1 << 28, 80 << 30)
    assert (g.util_gpu, g.util_memory, g.temperature) == (50, 25, 61)
    assert (g.power_draw, g.power_limit) == (250.5, 400.0)
    assert g.mig_mode is False and not g.simulated
    me, other = g.processes
    assert (
        me.is_self
        and me.pid == os.getpid()
        and me.name not in (NA, "")
        and me.used_memory == 3 << 30
    )
    assert me.gpu_instance_id is NA
    assert not other.is_self and other.name is NA and other.used_memory is NA
    assert g.torch_memory is None, "torch has not initialised CUDA here"


def test_nvml_unsupported_queries_become_na():
    fake = FakeNvml(
        1, unsupported={"util", "temperature", "power", "processes", "mig"}, mem_v2=False
    )
    s = NvmlBackend(fake, env={}).sample()
    g = s.gpus[0]
    assert s.ok
    assert g.util_gpu is NA and g.temperature is NA and g.power_draw is NA and g.power_limit is NA
    assert g.memory_reserved is NA and g.memory_used == 1 << 30, "v1 memory info when v2 is missing"
    assert g.processes == () and g.mig_mode is NA
    rows = dict(gpu_lines(g))
    assert "n/a" in rows["load"]


def test_nvml_mig_devices():
    s = NvmlBackend(FakeNvml(2, mig={1}), env={"CUDA_VISIBLE_DEVICES": "MIG-00000001"}).sample()
    g = s.gpus[1]
    assert g.mig_mode is True and len(g.mig_devices) == 2
    assert g.mig_devices[1].cuda_index == 0 and g.mig_devices[0].cuda_index is None
    assert g.mig_devices[1].gpu_instance_id == 2 and g.mig_devices[1].memory_total == 10 << 30


def test_nvml_lost_gpu_mid_session():
    fake = FakeNvml(3, lost_after={1: 8})
    b = NvmlBackend(fake, env={})
    first = b.sample()
    assert not any(g.lost for g in first.gpus)
    later = [b.sample() for _ in range(3)]
    for s in later:
        assert s.ok and s.gpus[1].lost and "fell off the bus" in s.gpus[1].status
        assert s.gpus[1].name == "NVIDIA A100-SXM4-80GB" and s.gpus[1].memory_used is NA
        assert s.gpus[0].memory_used == 1 << 30 and s.gpus[2].memory_used == 3 << 30
    calls = fake.calls[1]
    b.sample()
    assert fake.calls[1] == calls, "a lost GPU is not queried again"


@pytest.mark.parametrize(
    "code, state, words",
    [
        (
            pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
            "no-driver",
            "No NVIDIA driver: NVML library not found",
        ),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "no-driver", "kernel module is not loaded"),
        (pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, "driver-mismatch", "version mismatch"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "no-permission", "No permission"),
        (pynvml.NVML_ERROR_UNKNOWN, "error", "NVML failed"),
    ],
)
def test_nvml_init_failures(code, state, words):
    b = NvmlBackend(FakeNvml(2, init_error=code), env={})
    for _ in range(2):
        s = b.sample()
        assert s.state == state and words in s.status and "\n" not in s.status and s.gpus == ()
        assert (
            s.host.total is not NA and s.host.available is not NA and s.host.process_rss is not NA
        )


def test_nvml_no_gpus():
    fake = FakeNvml(0)
    s = NvmlBackend(fake, env={}).sample()
    assert s.state == "no-gpus" and "No NVIDIA GPUs" in s.status and fake.shutdowns == 1


def test_nvml_per_gpu_permission_problem():
    class Partial(FakeNvml):
        def nvmlDeviceGetHandleByIndex(self, i):
            if i == 0:
                raise self._err(pynvml.NVML_ERROR_NO_PERMISSION)
            return i

    s = NvmlBackend(Partial(2), env={}).sample()
    assert s.ok and s.gpus[0].status == NO_PERMISSION_STATUS and s.gpus[0].memory_used is NA
    assert s.gpus[1].memory_used == 2 << 30


def test_nvml_close_shuts_down():
    fake = FakeNvml(1)
    b = NvmlBackend(fake, env={})
    b.sample()
    b.close()
    assert fake.shutdowns == 1


def test_nvml_uses_torch_when_cuda_is_initialised(monkeypatch):
    """Once this process has CUDA up, torch's UUIDs decide the mapping and its allocator figures
    sit next to NVML's. A stand-in torch module: the monitor must never import the real one."""
    uuids = {0: UUIDS[1][4:], 1: UUIDS[0][4:]}  # CUDA numbers them the other way round
    stats = {0: 5 << 20, 1: 7 << 20}

    def memory_stats(i):
        return {
            "allocated_bytes.all.current": stats[i],
            "reserved_bytes.all.current": 2 * stats[i],
            "allocated_bytes.all.peak": 3 * stats[i],
        }

    cuda = SimpleNamespace(
        initialised=False,
        device_count=lambda: 2,
        get_device_properties=lambda i: SimpleNamespace(uuid=uuids[i]),
        memory_stats=memory_stats,
    )
    cuda.is_initialized = lambda: cuda.initialised
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    b = NvmlBackend(FakeNvml(2), env={"CUDA_VISIBLE_DEVICES": "0,1"})
    s = b.sample()
    assert s.cuda_mapping.source == "index" and [g.cuda_index for g in s.gpus] == [0, 1]
    assert all(g.torch_memory is None for g in s.gpus)
    cuda.initialised = True
    s = b.sample()
    assert s.cuda_mapping.source == "torch" and s.cuda_mapping.exact
    assert [g.cuda_index for g in s.gpus] == [1, 0]
    assert s.gpus[1].torch_memory == TorchMemory(5 << 20, 10 << 20, 15 << 20)
    assert s.gpus[0].torch_memory.allocated == 7 << 20
    assert s.by_cuda_index(0).nvml_index == 1


# -- the real NVML on this machine (no driver) ---------------------------------------------------


def _has_nvml() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


@pytest.mark.skipif(_has_nvml(), reason="this machine has an NVIDIA driver")
def test_real_nvml_missing_gives_status_line_and_host_ram():
    with GpuMonitor() as mon:
        s = mon.sample()
    assert s.state == "no-driver" and s.status == "No NVIDIA driver: NVML library not found"
    assert s.host.total > 0 and 0 < s.host.available <= s.host.total and s.host.process_rss > 0
    assert "host RAM" in s.host.line()


# -- JSON and rendering --------------------------------------------------------------------------


def test_json_document():
    mon = GpuMonitor(sim(2, failing=(1, 1), with_torch=True))
    mon.sample()
    doc = sample_to_dict(mon.sample(), mon)
    json.dumps(doc)
    assert doc["schema"] == "mscope.gpus" and doc["schema_version"] == 1
    assert doc["state"] == "ok" and doc["backend"] == "simulated"
    g0, g1 = doc["gpus"]
    assert (
        g0["memory"]["used"] > 0 and len(g0["memory_history"]) == 2 and g0["torch"]["allocated"] > 0
    )
    assert g1["lost"] and g1["memory"]["used"] is None and g1["utilization"]["gpu"] is None
    assert doc["host"]["total"] == FIXED_HOST.total


def test_render_fits_80_columns():
    from rich.console import Console

    mon = GpuMonitor(sim(3, failing=(2, 2), mig=[1], with_torch=True))
    for _ in range(4):
        s = mon.sample()
    console = Console(width=80, record=True, file=open(os.devnull, "w"))
    console.print(render_sample(s, mon))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "SIMULATED" in text and "(this process)" in text and "torch" in text and "lost" in text


# -- CLI -----------------------------------------------------------------------------------------


def run_mscope(
    *args: str, env: dict | None = None, timeout: float = 30
) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MSCOPE_SIMULATE")}
    full_env.update({"COLUMNS": "80", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "modelscope_tui", "gpus", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


@pytest.mark.skipif(_has_nvml(), reason="this machine has an NVIDIA driver")
def test_cli_without_gpu():
    r = run_mscope()
    assert r.returncode == 0 and r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[0] == "No NVIDIA driver: NVML library not found"
    assert sum("No NVIDIA driver" in line for line in lines) == 1
    assert "host RAM" in lines[1] and "Traceback" not in r.stdout
    r = run_mscope("--json")
    assert r.returncode == 0 and r.stderr == ""
    doc = json.loads(r.stdout)
    assert doc["state"] == "no-driver" and doc["gpus"] == [] and doc["host"]["total"] > 0


def test_cli_simulated():
    r = run_mscope(env={"MSCOPE_SIMULATE_GPUS": "3"})
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.splitlines()[0] == "3 simulated GPUs (MSCOPE_SIMULATE_GPUS)"
    assert r.stdout.count("SIMULATED NVIDIA") == 3
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    r = run_mscope("--json", env={"MSCOPE_SIMULATE_GPUS": "3"})
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and len(doc["gpus"]) == 3 and all(g["simulated"] for g in doc["gpus"])


def test_cli_watch_and_bad_input():
    env = {"MSCOPE_SIMULATE_GPUS": "2", "MSCOPE_SIMULATE_GPU_LOST": "1:1"}
    r = run_mscope("--watch", "--json", "--interval", "0.05", "--count", "3", env=env)
    docs = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.returncode == 0 and len(docs) == 3
    assert docs[-1]["gpus"][1]["lost"] and len(docs[-1]["gpus"][0]["memory_history"]) == 3
    r = run_mscope("--watch", "--interval", "0.05", "--count", "2", env=env)
    assert r.returncode == 0 and "lost" in r.stdout and "Traceback" not in r.stdout + r.stderr
    r = run_mscope("--interval", "0", env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--interval" in r.stderr
    r = run_mscope(env={"MSCOPE_SIMULATE_GPUS": "many"})
    assert r.returncode == 2 and "MSCOPE_SIMULATE_GPUS" in r.stderr and "Traceback" not in r.stderr


# -- imports -------------------------------------------------------------------------------------


def test_gpu_module_imports_neither_textual_nor_torch():
    code = (
        "import sys\n"
        "from modelscope_tui.gpu.monitor import GpuMonitor\n"
        "from modelscope_tui.gpu.schema import sample_to_dict\n"
        "sample_to_dict(GpuMonitor.from_env({'MSCOPE_SIMULATE_GPUS': '2'}).sample())\n"
        "GpuMonitor().sample()\n"
        "print(sorted(m for m in ('textual', 'torch', 'pynvml', 'rich') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = out.stdout.strip()
    assert "textual" not in loaded and "torch" not in loaded and "rich" not in loaded


def test_watch_piped_prints_each_frame_as_it_comes():
    """`mscope gpus --watch | tee log`: rich's Live held every frame until exit when stdout was
    not a terminal; each frame must arrive while the command still runs."""
    import select

    env = {**os.environ, "MSCOPE_SIMULATE_GPUS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelscope_tui", "gpus", "--watch", "--interval", "0.2"],
        stdout=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        seen = b""
        for frames in (1, 2):  # each frame starts with the status line
            while seen.count(b"simulated GPU") < frames:
                ready, _w, _x = select.select([proc.stdout], [], [], 30)
                assert ready, f"no frame within 30 s; got {seen[-300:]!r}"
                chunk = os.read(proc.stdout.fileno(), 65536)
                assert chunk, "the command ended"
                seen += chunk
        assert proc.poll() is None  # still watching: the frames came before exit
    finally:
        proc.kill()
        proc.wait()
