"""GPU monitor cost: median tick for 8 simulated GPUs (budget 5 ms), the monitor thread's CPU
use over 10 s at a 1 s interval, and, where a driver is present, the same for real NVML.

    python bench/bench_gpu.py [--seconds 10] [--interval 1.0] [--gpus 8]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

from modelscope_tui.gpu.monitor import GpuMonitor
from modelscope_tui.gpu.nvml import NvmlBackend
from modelscope_tui.gpu.simulated import SimulatedBackend


def tick_times(monitor: GpuMonitor, n: int = 200) -> list[float]:
    monitor.sample()  # init (NVML) outside the timing
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        monitor.sample()
        out.append(time.perf_counter() - t0)
    return out


def thread_cpu(monitor: GpuMonitor, seconds: float, interval: float) -> tuple[float, float, int]:
    """(monitor thread CPU seconds, whole-process CPU seconds, ticks) over `seconds`."""
    ticks = []
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    monitor.start(interval=interval, on_sample=ticks.append)
    time.sleep(seconds)
    monitor.stop()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    proc = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return monitor.thread_cpu_seconds, proc, len(ticks)


def report(label: str, monitor: GpuMonitor, seconds: float, interval: float) -> None:
    times = tick_times(monitor)
    first = monitor.latest
    print(f"{label}: {first.status if first else ''}")
    print(
        f"  tick: median {statistics.median(times) * 1e3:.3f} ms, "
        f"p95 {sorted(times)[int(len(times) * 0.95)] * 1e3:.3f} ms over {len(times)} ticks"
    )
    fresh = GpuMonitor(monitor.backend)
    thread_s, proc_s, n = thread_cpu(fresh, seconds, interval)
    print(
        f"  thread: {thread_s * 1e3:.1f} ms CPU in {seconds:.0f} s at {interval:g} s interval "
        f"({n} ticks, {thread_s / seconds * 100:.3f}% of one core); process CPU meanwhile "
        f"{proc_s * 1e3:.1f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--gpus", type=int, default=8)
    args = ap.parse_args()
    report(
        f"simulated x{args.gpus}",
        GpuMonitor(SimulatedBackend(args.gpus, seed=0)),
        args.seconds,
        args.interval,
    )
    nvml = GpuMonitor(NvmlBackend())
    s = nvml.sample()
    if s.ok:
        report("nvml", nvml, args.seconds, args.interval)
    else:
        print(f"nvml: skipped ({s.status})")
    nvml.close()


if __name__ == "__main__":
    main()
