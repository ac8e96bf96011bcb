"""Host RAM and process names from /proc: what a panel shows when there is no GPU, and the names
of the processes NVML lists. Anything unreadable is `NA`."""

from __future__ import annotations

import os

from .na import NA, NAType
from .snapshot import HostMemory


def read_host_memory() -> HostMemory:
    """MemTotal / MemAvailable from /proc/meminfo and this process's RSS; NA where unreadable."""
    total: int | NAType = NA
    available: int | NAType = NA
    rss: int | NAType = NA
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


_NAME_CACHE: dict[int, str | NAType] = {}


def process_name(pid: int) -> str | NAType:
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


def cached_process_name(pid: int, live: set[int]) -> str | NAType:
    """`process_name`, read once per PID (a tick must not reread /proc for every process);
    `live` collects this tick's PIDs for `prune_name_cache`."""
    name = _NAME_CACHE.get(pid)
    if name is None:
        name = process_name(pid)
        _NAME_CACHE[pid] = name
    live.add(pid)
    return name


def prune_name_cache(live: set[int]) -> None:
    """Forget PIDs no longer listed once the cache outgrows the live ones: a long session's
    cache stays bounded."""
    if len(_NAME_CACHE) > 4 * max(len(live), 64):
        for pid in [p for p in _NAME_CACHE if p not in live]:
            _NAME_CACHE.pop(pid, None)

