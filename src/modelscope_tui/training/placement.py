"""Where the model's tensors live: the file (not loaded), or a torch device.

Moving materialises tensors from the file (TensorData, via mmap) straight onto the target, one
storage at a time so tied weights stay one tensor. A move is all-or-nothing: out of memory,
any error, or a cancel rolls back to the previous placement and frees what was allocated.
"""

from __future__ import annotations

import threading
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..checkpoint import Checkpoint, TensorRecord
from ..errors import MscopeError, TensorDataError
from ..units import fmt_bytes

if TYPE_CHECKING:
    import torch

FILE = "file"  # not materialised: the bytes are still only in the checkpoint


class PlacementError(MscopeError):
    """A move could not complete; the previous placement is intact."""


@dataclass(slots=True)
class DeviceInfo:
    name: str
    available: bool
    reason: str = ""  # why not, in plain words


@dataclass(slots=True)
class MoveResult:
    moved: int
    bytes: int
    device: str
    cancelled: bool = False
    message: str = ""


@dataclass
class Placement:
    ckpt: Checkpoint
    tensors: dict[str, Any] = field(default_factory=dict)  # name -> torch.Tensor
    device: dict[str, str] = field(default_factory=dict)  # name -> device string
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def device_of(self, name: str) -> str:
        return self.device.get(name, FILE)

    def bytes_by_device(self) -> dict[str, int]:
        """Model bytes per current device; tensors sharing a storage counted once."""
        totals: dict[str, int] = defaultdict(int)
        seen: set[tuple[int, str]] = set()
        for t in self.ckpt.model_tensors:
            dev = self.device.get(t.name, FILE)
            key = (id(t.storage), dev)
            if t.storage is not None and key in seen:
                continue
            seen.add(key)
            totals[dev] += t.storage.nbytes if t.storage is not None else t.nbytes
        return dict(totals)

    def move(
        self,
        names: Iterable[str],
        device: str,
        progress: Callable[[int, int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> MoveResult:
        """Put the named model tensors on `device` (all or nothing)."""
        records = [self.ckpt.tensor(n) for n in dict.fromkeys(names)]
        records = [r for r in records if r is not None and self.device.get(r.name) != device]
        if not records:
            return MoveResult(0, 0, device, message=f"already on {device}")
        target = _parse_device(device)
        groups: dict[int, list[TensorRecord]] = defaultdict(list)
        for r in records:
            groups[id(r.storage)].append(r)
        total = sum(g[0].storage.nbytes if g[0].storage is not None else g[0].nbytes for g in groups.values())
        try:
            created = self._materialise_all(groups, target, total, progress, cancel)
        except (MscopeError, RuntimeError, MemoryError) as exc:
            # The traceback's frames hold what was already copied (loop variables, the failing
            # group's buffers): a caller that keeps the error (a TUI worker, a log) would keep
            # that device memory alive. Clear them before giving the cached blocks back.
            traceback.clear_frames(exc.__traceback__.tb_next if exc.__traceback__ else None)
            _release(target)
            if isinstance(exc, MscopeError):
                raise
            if _is_oom(exc):
                raise PlacementError(_oom_message(device, total, target)) from exc
            raise PlacementError(f"moving to {device} failed: {str(exc).splitlines()[0][:200]}") from exc
        if created is None:
            _release(target)
            return MoveResult(0, 0, device, cancelled=True, message="move cancelled; nothing changed")
        with self._lock:
            for name, tensor in created.items():
                self.tensors[name] = tensor
                self.device[name] = device
        if target.type not in ("cpu", "meta"):
            _release(target)  # drop the previous copies' cached blocks
        return MoveResult(len(created), total, device, message=f"moved {len(created):,} tensor(s), {fmt_bytes(total)} to {device}")

    def _materialise_all(self, groups, target, total, progress, cancel) -> dict[str, Any] | None:
        """Every group onto the target; None when cancelled (what was copied is dropped)."""
        from ..values.data import TensorData

        created: dict[str, Any] = {}
        done = 0
        with TensorData() as data:
            for group in groups.values():
                if cancel is not None and cancel.is_set():
                    return None
                created.update(self._materialise(data, group, target))
                done += group[0].storage.nbytes if group[0].storage is not None else group[0].nbytes
                if progress is not None:
                    progress(done, total)
        return created

    def release(self, names: Iterable[str] | None = None) -> None:
        """Forget materialised tensors (back to the file)."""
        with self._lock:
            for name in list(self.tensors) if names is None else list(names):
                self.tensors.pop(name, None)
                self.device.pop(name, None)

    def _materialise(self, data, group: list[TensorRecord], target) -> dict[str, Any]:
        """One storage onto the target, then each tensor as a view of it (ties preserved)."""
        import torch

        from ..values.data import check_view, torch_dtype

        first = group[0]
        if first.storage is None:
            raise PlacementError(f"tensor {first.name!r} has no stored data ({first.note or 'no storage'})")
        raw = data.storage_bytes(first)
        moved = _transfer(torch.frombuffer(raw, dtype=torch.uint8), target)
        out = {}
        for r in group:
            flat = moved.view(torch_dtype(r.dtype)) if r.numel else None
            if flat is None:
                out[r.name] = torch.empty(r.shape, dtype=torch_dtype(r.dtype), device=target)
                continue
            if first.storage.byteorder == "big" and r.itemsize > 1:
                flat = moved.view(-1, r.itemsize).flip(1).reshape(-1).view(torch_dtype(r.dtype))
            try:
                check_view(r, len(raw))  # as_strided trusts its numbers; the group shares one storage
            except TensorDataError as exc:
                raise PlacementError(exc.message) from exc
            out[r.name] = flat.as_strided(r.shape, r.stride, r.storage_offset)
        return out


def _transfer(host: torch.Tensor, target) -> torch.Tensor:
    """Copy bytes to the target device (a seam for tests that inject failures)."""
    if target.type == "cpu":
        return host.clone()
    return host.to(target)


def _parse_device(device: str):
    import torch

    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise PlacementError(f"unknown device {device!r}") from exc


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    import torch

    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


def _oom_message(device: str, needed: int, target) -> str:
    free = None
    if target.type == "cuda":
        try:
            import torch

            free = torch.cuda.mem_get_info(target)[0]
        except Exception:  # the device may be gone; the message still says what was needed
            free = None
    tail = f", {fmt_bytes(free)} free" if free is not None else ""
    return f"out of memory on {device}: needed {fmt_bytes(needed)}{tail}; nothing was moved"


def _release(target) -> None:
    if getattr(target, "type", "") == "cuda":
        try:
            import torch

            torch.cuda.empty_cache()
        except Exception:  # best effort: the move already failed or succeeded
            pass


def available_devices() -> list[DeviceInfo]:
    """cpu, cuda:N, mps, xpu as this torch build and machine allow, with reasons when not."""
    import torch

    out = [DeviceInfo("cpu", True)]
    if not torch.backends.cuda.is_built():
        out.append(DeviceInfo("cuda", False, "torch built without CUDA"))
    elif not torch.cuda.is_available():
        out.append(DeviceInfo("cuda", False, "no CUDA device visible (driver missing or CUDA_VISIBLE_DEVICES empty)"))
    else:
        for i in range(torch.cuda.device_count()):
            out.append(DeviceInfo(f"cuda:{i}", True))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None:
        if not mps.is_built():
            out.append(DeviceInfo("mps", False, "torch built without MPS (Apple GPUs only)"))
        elif not mps.is_available():
            out.append(DeviceInfo("mps", False, "MPS not available on this machine"))
        else:
            out.append(DeviceInfo("mps", True))
    xpu = getattr(torch, "xpu", None)
    if xpu is not None:
        try:
            ok = xpu.is_available()
        except Exception:  # some builds raise instead of returning False
            ok = False
        out.append(DeviceInfo("xpu", ok, "" if ok else "no Intel GPU (XPU) available"))
    out.append(DeviceInfo("meta", True, "shapes only, no memory"))
    return out
