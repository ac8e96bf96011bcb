"""`GpuMonitor`: one sample per tick on a daemon thread, and a bounded memory history per GPU.

The thread never raises and never hangs its owner: a failing backend becomes an "error" sample,
a failing callback is counted, and `stop()` waits a bounded time. The explorer starts the thread
and posts each sample to the UI as a message; `mscope gpus` calls `sample()` itself.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import MscopeError
from .backend import GpuBackend
from .host import read_host_memory
from .na import NA
from .nvml import NvmlBackend
from .simulated import SIMULATE_ENV, SIMULATE_LOST_ENV, SimulatedBackend
from .snapshot import GpuSample


class GpuMonitor:
    """Samples a backend on a daemon thread and keeps a bounded memory history per GPU.

    - `sample()` takes one tick now (on the calling thread; it may block on first NVML init,
      so a UI should use `start()` and `latest` instead). It never raises.
    - `start(interval, on_sample)` samples every `interval` seconds on a daemon thread and calls
      `on_sample(sample)` from that thread (the explorer posts it as a message).
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

