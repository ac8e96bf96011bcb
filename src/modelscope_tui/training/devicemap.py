"""Hugging Face `device_map` files: export a placement, read one back, or make a balanced one.

A device map is a JSON object from a module name (or a tensor name; `""` is the whole model) to a
device, as `transformers`' `from_pretrained(device_map=...)` and accelerate's `dispatch_model`
take it: an int is a CUDA index, otherwise `"cpu"`, `"disk"`, `"meta"` or a torch device string
(`"cuda:1"`, `"mps"`, `"xpu:0"`). A tensor takes the entry of its own name or else of the nearest
module above it, the way transformers resolves it.

Pure Python: no torch. See docs/memory-estimate.md for the balancing algorithm.
"""

from __future__ import annotations

import difflib
import os
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint import PARAMETER, Checkpoint, ModuleNode, TensorRecord
from ..errors import MscopeError
from ..jsonfile import json_bytes, read_json_file
from ..units import fmt_bytes
from .placement import FILE

if TYPE_CHECKING:
    from .session import Session

Device = int | str

NAMED_DEVICES = ("cpu", "disk", "meta")
OFFLOAD_DEVICES = ("cpu", "disk")
_ACCEL = re.compile(r"^(cuda|xpu|npu|hpu|mlu|musa|mps)(?::(\d+))?$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)


class DeviceMapError(MscopeError):
    """A device map that cannot be read, written or honoured; the message is one line."""


# -- devices -------------------------------------------------------------------------------------
def parse_device(value: Any, where: str = "") -> Device:
    """A device as transformers accepts it, normalised: CUDA becomes its index (`"cuda:1"` -> 1,
    `"cuda"` -> 0); `"cpu"`, `"disk"`, `"meta"` and other accelerators stay strings."""
    what = f"{where}: " if where else ""
    if isinstance(value, bool) or value is None:
        raise DeviceMapError(f"{what}invalid device {value!r}", hint=_DEVICE_HINT)
    if isinstance(value, int):
        if value < 0:
            raise DeviceMapError(f"{what}invalid device {value} (CUDA indices start at 0)")
        return value
    if type(value).__name__ == "device" and hasattr(value, "type"):  # a torch.device, untouched
        value = str(value)
    if not isinstance(value, str):
        raise DeviceMapError(f"{what}invalid device {value!r}", hint=_DEVICE_HINT)
    text = value.strip().lower()
    if text in NAMED_DEVICES:
        return text
    m = _ACCEL.match(text)
    if m is None:
        hint = (
            f"write {int(text)} (a number) for cuda:{int(text)}" if text.isdigit() else _DEVICE_HINT
        )
        raise DeviceMapError(f"{what}invalid device {value!r}", hint=hint)
    kind, index = m.group(1), m.group(2)
    if kind == "cuda":
        return int(index) if index is not None else 0
    return text


_DEVICE_HINT = "use an int for a CUDA index, 'cpu', 'disk', 'meta' or a device like 'cuda:1'"


def device_label(device: Device) -> str:
    """The torch spelling of a device: 0 -> 'cuda:0'; strings unchanged ('disk' is not torch's)."""
    return f"cuda:{device}" if isinstance(device, int) else device


def is_offload(device: Device) -> bool:
    return device in OFFLOAD_DEVICES


def parse_size(value: int | float | str, bare: int = 1) -> int:
    """Bytes from an int or a size like accelerate's max_memory: '24GiB' (24 x 2**30), '512MiB',
    '24GB' (24 x 10**9: a decimal unit means what it says), '1.5 TB'. A bare number counts
    `bare` bytes each (1; `--chunk-mb 2` passes 2**20)."""
    if isinstance(value, bool):
        raise DeviceMapError(f"invalid size {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise DeviceMapError(f"invalid size {value!r} (negative)")
        return int(value * bare)
    m = _SIZE.match(str(value))
    if m is None:
        raise DeviceMapError(f"invalid size {value!r}", hint="like 24GiB, 512MiB, 24GB (10**9 bytes each) or a number")
    if not m.group(2):
        return int(float(m.group(1)) * bare)
    number, unit = float(m.group(1)), m.group(2).lower()
    prefix = unit[0] if unit[0] in "kmgt" else ""
    base = 1024 if "i" in unit else 1000
    return int(number * base ** ("kmgt".index(prefix) + 1 if prefix else 0))


# -- sources -------------------------------------------------------------------------------------
def _unpack(source: Session | Checkpoint) -> tuple[Checkpoint, Session | None]:
    if isinstance(source, Checkpoint):
        return source, None
    ckpt = getattr(source, "ckpt", None)
    if not isinstance(ckpt, Checkpoint):
        raise TypeError(f"expected a Session or a Checkpoint, not {type(source).__name__}")
    return ckpt, source


def _tensor_names(ckpt: Checkpoint) -> dict[str, TensorRecord]:
    return {t.name: t for t in ckpt.model_tensors}


def _node_names(ckpt: Checkpoint) -> dict[str, ModuleNode]:
    return {node.name: node for node in ckpt.tree.walk()}


# -- export --------------------------------------------------------------------------------------
def export_device_map(
    source: Session | Checkpoint,
    devices: Mapping[str, Any],
    default: Any = None,
) -> dict[str, Device]:
    """A compact device map from per-tensor devices (`Placement.device`, or any name -> device).

    Each entry is the highest module whose tensors all share one device (`{"": 0}` when the
    whole model does); a module split across devices is listed by its children and its own
    tensors. Tensors missing from `devices` (or marked `"file"`, not materialised) take
    `default`; without one that is an error. Keys follow the model's order.
    """
    ckpt, _ = _unpack(source)
    records = _tensor_names(ckpt)
    unknown = [n for n in devices if n not in records]
    if unknown:
        raise DeviceMapError(f"{len(unknown)} name(s) are not model tensors, first {unknown[0]!r}")
    default_dev = parse_device(default, "default device") if default is not None else None
    placed: dict[str, Device] = {}
    for name in records:
        value = devices.get(name)
        if value is None or value == FILE:
            if default_dev is None:
                raise DeviceMapError(
                    f"no device for tensor {name!r}", hint="place it, or give a default device"
                )
            placed[name] = default_dev
        else:
            placed[name] = parse_device(value, name)
    return _compress(ckpt, placed)


_MIXED = object()


def _compress(ckpt: Checkpoint, placed: Mapping[str, Device]) -> dict[str, Device]:
    """The fewest entries that give every tensor its device (see export_device_map)."""
    root = ckpt.tree
    order = list(root.walk())
    uniform: dict[str, Any] = {}  # node name -> device | _MIXED | None (no tensors)
    for node in reversed(order):
        devs = {placed[t.name] for t in node.tensors}
        devs.update(uniform[c.name] for c in node.children.values() if uniform[c.name] is not None)
        uniform[node.name] = (next(iter(devs)) if len(devs) == 1 else _MIXED) if devs else None
    tensor_names = set(placed)
    out: dict[str, Device] = {}
    stack: list[tuple[ModuleNode, bool]] = [(root, False)]
    while stack:
        node, forced = stack.pop()
        state = uniform[node.name]
        if state is None:
            continue
        # A module whose name is also a tensor's name cannot be its own key (the key would
        # cover both); spell it out instead.
        if state is not _MIXED and not forced:
            out[node.name] = state
            continue
        for t in node.tensors:
            out[t.name] = placed[t.name]
        for child in reversed(list(node.children.values())):
            stack.append((child, child.name in tensor_names))
    in_tree = {t.name for t in root.all_tensors()}
    for name in placed:  # a tensor the tree does not hold still gets its own entry
        if name not in in_tree:
            out[name] = placed[name]
    return out


def device_map_bytes(device_map: Mapping[str, Device]) -> bytes:
    """The map as transformers reads it (`json.load` then `device_map=`), with a newline: the
    one spelling of the file (jsonfile.json_bytes: UTF-8, names as they are)."""
    return json_bytes(dict(device_map), indent=2) + b"\n"


def device_map_json(device_map: Mapping[str, Device]) -> str:
    """device_map_bytes as text."""
    return device_map_bytes(device_map).decode("utf-8")


def save_device_map(
    device_map: Mapping[str, Device], path: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write the map atomically; an existing file needs `overwrite=True` (kept as `path.bak`)."""
    from ..write.atomic import atomic_write

    data = device_map_bytes(device_map)
    return atomic_write(path, lambda fh: fh.write(data), overwrite=overwrite)


# -- reading -------------------------------------------------------------------------------------
def load_device_map(path: str | os.PathLike) -> dict[str, Any]:
    """The raw JSON object from a device-map file (not yet checked against a checkpoint)."""
    path = Path(path)
    data = read_json_file(path, DeviceMapError, "a device map")
    if not isinstance(data, dict):
        kind = type(data).__name__
        hint = (
            "'auto', 'balanced' ... are strategies for from_pretrained, not maps"
            if isinstance(data, str)
            else None
        )
        raise DeviceMapError(f"a device map is a JSON object, not a {kind}", path, hint)
    return data


def read_device_map(
    data: Mapping[str, Any] | str | os.PathLike, source: Session | Checkpoint
) -> dict[str, Device]:
    """Per-tensor devices from a device map (a dict, or a path to its JSON file), checked
    against the checkpoint: every key is `""`, a module of its tree or a tensor name; every
    device parses; every tensor is covered. Raises DeviceMapError (one line) otherwise."""
    where = None
    if not isinstance(data, Mapping):
        if not isinstance(data, (str, os.PathLike)):
            raise DeviceMapError(
                f"a device map is a dict or a file path, not {type(data).__name__}"
            )
        where = str(data)
        data = load_device_map(data)
    ckpt, _ = _unpack(source)
    records = _tensor_names(ckpt)
    nodes = _node_names(ckpt)
    entries: dict[str, Device] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise DeviceMapError(f"device map key {key!r} is not a string", where)
        if key not in nodes and key not in records:
            close = difflib.get_close_matches(key, list(nodes) + list(records), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "keys are module or tensor names"
            raise DeviceMapError(
                f"device map names {key!r}, which is not a module or tensor of this checkpoint",
                where,
                hint,
            )
        try:
            entries[key] = parse_device(value, f"entry {key!r}")
        except DeviceMapError as exc:
            raise DeviceMapError(exc.message, where, exc.hint) from None
    out: dict[str, Device] = {}
    for name in records:
        prefix = name
        while prefix not in entries:
            if not prefix:
                raise DeviceMapError(
                    f"no device for tensor {name!r}",
                    where,
                    'add it, a module above it, or "" for the whole model',
                )
            prefix = prefix.rpartition(".")[0]
        out[name] = entries[prefix]
    return out


def tie_conflicts(source: Session | Checkpoint, devices: Mapping[str, Device]) -> list[str]:
    """Tensors sharing one storage (tied weights) placed on different devices: one line each.
    transformers/accelerate only warn about these; the model then holds two copies."""
    ckpt, _ = _unpack(source)
    groups: dict[int, list[TensorRecord]] = {}
    for t in ckpt.model_tensors:
        if t.storage is not None and t.name in devices:
            groups.setdefault(id(t.storage), []).append(t)
    out = []
    for group in groups.values():
        devs = {devices[t.name] for t in group}
        if len(devs) > 1:
            where = ", ".join(f"{t.name} on {device_label(devices[t.name])}" for t in group)
            out.append(f"tied tensors on different devices: {where}")
    return out


# -- balancing -----------------------------------------------------------------------------------
@dataclass(slots=True)
class BalancedMap:
    device_map: dict[str, Device]  # compact, ready for device_map_json / from_pretrained
    tensors: dict[str, Device]  # every model tensor's device
    used: dict[Device, int]  # bytes placed per device (devices in the order given)
    reserved: dict[Device, int] = field(default_factory=dict)  # kept free for offloaded layers
    capacities: dict[Device, int | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def offloaded(self) -> bool:
        return any(is_offload(d) and n for d, n in self.used.items())

    def lines(self) -> list[str]:
        """'cuda:0  10.2 GiB of 24.0 GiB' per device, for the CLI and the panel."""
        out = []
        for dev, cap in self.capacities.items():
            of = f" of {fmt_bytes(cap)}" if cap is not None else ""
            keep = (
                f" (+{fmt_bytes(self.reserved[dev])} kept free)" if self.reserved.get(dev) else ""
            )
            out.append(f"{device_label(dev)}: {fmt_bytes(self.used.get(dev, 0))}{of}{keep}")
        return out


def balanced_device_map(
    source: Session | Checkpoint,
    capacities: Mapping[Any, int | str | None],
    *,
    precision: str | None = None,
    optimizer: str = "none",
    reserve_largest: bool = True,
) -> BalancedMap:
    """Fill the devices in the order given, module by module, like accelerate's
    `infer_auto_device_map` (its "sequential" strategy):

    - walk the module tree in the model's order, starting with the whole model;
    - a unit that fits in what is left on the current device goes there;
    - one that does not is split into its own tensors and its child modules, except repeated
      blocks (`layers.0..N` of the same shape) and leaf modules, which stay whole: then the
      current device is closed and the next one is tried (never going back);
    - tied tensors (one storage) follow the first of them placed: the modules holding the others
      come along at once (their tied weight costs nothing twice);
    - with `reserve_largest`, when something lands on "cpu"/"disk" the map is made again keeping
      room for the largest unit on the first device (and on "cpu" when "disk" is used): the
      offloaded layers execute there.

    Bytes per tensor: the stored size, or with `precision` the estimate.py model-state bytes for
    that precision and `optimizer` (trainable as in the session, or as saved). A capacity of
    None is unlimited. Raises DeviceMapError when the model does not fit.
    """
    ckpt, session = _unpack(source)
    caps: dict[Device, int | None] = {}
    for dev, cap in capacities.items():
        caps[parse_device(dev, "capacity")] = None if cap is None else parse_size(cap)
    if not caps:
        raise DeviceMapError("no devices to fill", hint="give at least one capacity")
    cost = _tensor_costs(ckpt, session, precision, optimizer)
    plan = _Balancer(ckpt, session, cost, caps)
    tensors = plan.run({})
    reserved: dict[Device, int] = {}
    notes: list[str] = []
    landed = set(tensors.values())
    if reserve_largest and any(is_offload(d) for d in landed):
        first = next(iter(caps))
        hosts = [] if is_offload(first) else [first]
        if "disk" in landed and "cpu" in caps and first != "cpu":
            hosts.append("cpu")
        largest = plan.largest_unit()
        for dev in hosts:
            cap = caps[dev]
            if cap is None:
                continue
            if largest >= cap:
                notes.append(
                    f"{device_label(dev)} cannot hold the largest unit ({fmt_bytes(largest)}) "
                    "that offloaded layers need while they run: nothing is placed there"
                )
            reserved[dev] = largest
        if reserved:
            tensors = plan.run(reserved)
    used: dict[Device, int] = dict.fromkeys(caps, 0)
    for name, dev in tensors.items():
        used[dev] += cost[name]
    return BalancedMap(_compress(ckpt, tensors), tensors, used, reserved, caps, notes)


def _tensor_costs(
    ckpt: Checkpoint, session: Session | None, precision: str | None, optimizer: str
) -> dict[str, int]:
    """Bytes each model tensor adds to its device; an alias (same storage and view) adds 0."""
    if precision is None:
        return {t.name: 0 if t.alias_of else t.nbytes for t in ckpt.model_tensors}
    from .estimate import tensor_bytes

    out = {}
    for t in ckpt.model_tensors:
        if t.alias_of:
            out[t.name] = 0
            continue
        trainable = session.is_trainable(t.name) if session is not None else t.trainable
        out[t.name] = sum(
            tensor_bytes(t.numel, t.dtype, trainable, t.kind == PARAMETER, precision, optimizer)
        )
    return out


class _Balancer:
    def __init__(self, ckpt: Checkpoint, session: Session | None, cost: dict[str, int], caps):
        self.ckpt = ckpt
        self.root = ckpt.tree
        self.cost = cost
        self.caps = caps
        self.owner: dict[str, ModuleNode] = {}
        for node in self.root.walk():
            for t in node.tensors:
                self.owner[t.name] = node
        by_storage: dict[int, list[str]] = {}
        for t in ckpt.model_tensors:
            if t.storage is not None:
                by_storage.setdefault(id(t.storage), []).append(t.name)
        self.ties = {n: g for g in by_storage.values() if len(g) > 1 for n in g}
        self.atomic = self._atomic_nodes(session)

    def _atomic_nodes(self, session: Session | None) -> set[str]:
        """Repeated blocks (members of a numbered group sharing a layout) and leaf modules."""
        from .session import Session

        session = session if session is not None else Session(self.ckpt)
        atomic: set[str] = set()
        for group in session.block_groups():
            layouts: dict[str, tuple] = {}
            for idx in group.indices:
                node = session.node(f"{group.prefix}.{idx}")
                if node is not None:
                    cut = len(node.name) + 1
                    layouts[node.name] = tuple(
                        (t.name[cut:], t.shape, t.dtype) for t in node.all_tensors()
                    )
            counts: dict[tuple, int] = {}
            for layout in layouts.values():
                counts[layout] = counts.get(layout, 0) + 1
            atomic.update(n for n, layout in layouts.items() if layout and counts[layout] > 1)
        for node in self.root.walk():
            if not any(c.stats.tensors for c in node.children.values()):
                atomic.add(node.name)
        return atomic

    def largest_unit(self) -> int:
        best = 0
        for node in self.root.walk():
            if node.name in self.atomic:
                best = max(best, sum(self.cost[t.name] for t in node.all_tensors()))
            else:
                best = max([best, *(self.cost[t.name] for t in node.tensors)])
        return best

    def run(self, reserved: Mapping[Device, int]) -> dict[str, Device]:
        devices = list(self.caps)
        used = dict.fromkeys(devices, 0)
        placed: dict[str, Device] = {}
        current = 0
        queue: deque[ModuleNode | TensorRecord] = deque([self.root])
        while queue:
            unit = queue.popleft()
            is_node = isinstance(unit, ModuleNode)
            names = [
                t.name for t in (unit.all_tensors() if is_node else [unit]) if t.name not in placed
            ]
            if not names:
                continue
            group = list(names)
            inside = set(names)
            for name in names:  # bring the modules holding tied partners along
                for other in self.ties.get(name, ()):
                    if other in inside or other in placed:
                        continue
                    for t in self.owner[other].tensors:
                        if t.name not in inside and t.name not in placed:
                            inside.add(t.name)
                            group.append(t.name)
            size = sum(self.cost[n] for n in group)
            while True:
                if current >= len(devices):
                    raise self._no_room(unit, size, devices, used)
                dev = devices[current]
                cap = self.caps[dev]
                room = None if cap is None else cap - reserved.get(dev, 0) - used[dev]
                if room is None or size <= room:
                    for n in group:
                        placed[n] = dev
                    used[dev] += size
                    break
                if is_node and unit.name not in self.atomic:
                    parts: list[ModuleNode | TensorRecord] = [
                        *unit.tensors,
                        *unit.children.values(),
                    ]
                    queue.extendleft(reversed(parts))
                    break
                current += 1
        return placed

    def _no_room(self, unit, size: int, devices, used) -> DeviceMapError:
        name = unit.name or "the model"
        total = sum(self.cost.values())
        capacity = sum(c for c in self.caps.values() if c is not None)
        return DeviceMapError(
            f"does not fit: {name!r} needs {fmt_bytes(size)} and no device is left "
            f"(model {fmt_bytes(total)}, capacities {fmt_bytes(capacity)} in all)",
            hint='add a device ("cpu", "disk" with no limit) or raise a capacity',
        )
