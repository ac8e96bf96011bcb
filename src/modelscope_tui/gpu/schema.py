"""The `mscope gpus --json` document (`schema: "mscope.gpus"`, `schema_version: 1`).

Light on purpose (no dataclasses, no backend): `mscope gpus --help` names the schema from here.

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

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .na import NA

if TYPE_CHECKING:
    from .monitor import GpuMonitor
    from .snapshot import GpuSample, GpuSnapshot

SCHEMA = "mscope.gpus"
SCHEMA_VERSION = 1


def _json_value(value: Any) -> Any:
    return None if value is NA else value


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
