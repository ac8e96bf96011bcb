"""Which NVML GPU (and MIG device) is which `cuda:N` in this process, without initialising CUDA.

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

(nvitop.api gets the exact order by running cuInit in a child process; docs/gpu-backend.md
measures that and says why we parse instead.)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .na import NA, NAType


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

    def mig_cuda_index(self, mig_uuid: str | NAType) -> int | None:
        return None if mig_uuid is NA else self.mig.get(_norm_uuid(mig_uuid))


@dataclass(frozen=True)
class DeviceIdentity:
    """What the mapping needs to know about one NVML GPU."""

    nvml_index: int
    uuid: str | NAType
    pci_bus_id: str | NAType = NA
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


def _pci_key(bus_id: str | NAType) -> tuple[int, ...]:
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


def torch_if_cuda_initialised() -> Any:
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
    """The UUID of each `cuda:i` as torch numbers them; None when torch cannot say."""
    try:
        out = []
        for i in range(torch.cuda.device_count()):
            u = getattr(torch.cuda.get_device_properties(i), "uuid", None)
            out.append(str(u) if u is not None else "")
        return out
    except Exception:
        return None


def current_mapping(
    devices: Sequence[DeviceIdentity], env: Mapping[str, str] | None = None
) -> CudaMapping:
    """The mapping for this process now: torch's UUIDs if CUDA is up, else the environment."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    torch = torch_if_cuda_initialised()
    uuids = _torch_uuids(torch) if torch is not None else None
    return map_cuda_devices(
        devices, visible, device_order=env.get("CUDA_DEVICE_ORDER"), torch_uuids=uuids
    )

