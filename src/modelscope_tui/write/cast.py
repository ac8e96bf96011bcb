"""A copy of the model part with its floating-point tensors cast (`cast_copy`): a state dict
as a torch zip or as safetensors.

It streams one chunk of one storage at a time from the mmap'ed source (`TensorData`): memory
stays around one chunk, whatever the size of the model. Unsupported input is refused before a
file exists (plan_cast, _preflight); the write goes through atomic_write.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..checkpoint import DTYPE_ITEMSIZE, FLOATING_DTYPES, Checkpoint, Format, TensorRecord
from ..enums import StrEnum
from ..errors import MscopeError, TensorDataError
from ..jsonfile import compact_json, json_bytes
from ..readers.pickle.patch import contiguous_stride
from .atomic import (
    SaveError,
    as_save_error,
    atomic_write,
    check_unchanged,
    file_state,
    local_source,
    sibling_path,
)
from .zipwriter import DEFAULT_ALIGNMENT, TorchZipWriter

CAST_TARGETS = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}  # fmt: skip
_TAGS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class CastFormat(StrEnum):
    """What `cast_copy` writes."""

    TORCH = "torch"  # a torch.save zip
    SAFETENSORS = "safetensors"


_FORMAT_ALIASES = {"pt": CastFormat.TORCH, "torch-zip": CastFormat.TORCH, "st": CastFormat.SAFETENSORS}
CHUNK_BYTES = 16 << 20
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
TIED_METADATA_KEY = "mscope.tied"


@dataclass(eq=False, slots=True)
class CastBlock:
    """One run of output bytes: a storage in a torch file, a tensor's data in safetensors."""

    source: TensorRecord  # what to read (a model tensor, or the span of a shared storage)
    src_dtype: str
    dtype: str  # output dtype
    numel: int
    key: str = ""

    @property
    def cast(self) -> bool:
        return self.dtype != self.src_dtype

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_ITEMSIZE[self.dtype]

    @property
    def nbytes_before(self) -> int:
        return self.numel * DTYPE_ITEMSIZE[self.src_dtype]


@dataclass(slots=True)
class CastTensor:
    name: str
    block: CastBlock
    offset: int  # in elements of the block
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    alias_of: str | None = None  # the name it was tied to in the source (same storage and view)


@dataclass
class CastPlan:
    """What `cast_copy` writes: tensors in the source's order, and the blocks holding their bytes."""

    fmt: CastFormat
    dtype: str
    tensors: list[CastTensor] = field(default_factory=list)
    blocks: list[CastBlock] = field(default_factory=list)

    @property
    def bytes_before(self) -> int:
        return sum(b.nbytes_before for b in self.blocks)

    @property
    def bytes_after(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    @property
    def tensors_changed(self) -> int:
        return sum(1 for t in self.tensors if t.block.cast)


def preview_cast(
    ckpt: Checkpoint, dtype: str, names: Iterable[str] | None = None, fmt: str | None = None
) -> tuple[int, int, int]:
    """(bytes before, bytes after, tensors changed) for `cast_copy` with the same arguments.

    Bytes are the tensor bytes of the output file (its storages for torch, with tied tensors
    once; each tensor for safetensors, which clones tied ones), in the source's dtypes and in the
    cast ones. Reads no tensor bytes and imports no torch.
    """
    plan = plan_cast(ckpt, dtype, names, fmt)
    return plan.bytes_before, plan.bytes_after, plan.tensors_changed


def cast_copy(
    ckpt: Checkpoint,
    dtype: str,
    names: Iterable[str] | None = None,
    dest: str | os.PathLike | None = None,
    fmt: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the model part of `ckpt` as a state dict with floating-point tensors cast to `dtype`.

    dtype: "float32", "bfloat16" or "float16". names: only these model tensors (a tensor tied to
    a chosen one is cast with it, so ties stay); complex, integer and bool tensors never change.
    fmt: "safetensors" or "torch" (a torch.save zip); default: safetensors for safetensors
    sources, torch otherwise. Tied tensors stay one storage in torch files; safetensors refuses
    shared tensors, so there each gets its own copy and `__metadata__["mscope.tied"]` (JSON)
    maps every copy to the name it was tied to. Default destination: `model.bf16.pt` (or
    `.safetensors`) next to the source. Full modules and TorchScript are refused.
    """
    plan = plan_cast(ckpt, dtype, names, fmt)
    source = Path(ckpt.path)
    if dest is None:
        dest = _default_cast_dest(ckpt, plan)
    dest = Path(dest)
    _preflight(plan, source)
    files = {Path(b.source.storage.file) for b in plan.blocks if b.source.storage is not None}
    before = file_state(files)
    _check_current(ckpt, source)
    metadata = _safetensors_metadata(ckpt, plan) if plan.fmt is CastFormat.SAFETENSORS else None

    def write(fh: BinaryIO) -> None:
        from ..values.data import TensorData

        try:
            with TensorData() as data:
                if plan.fmt is CastFormat.SAFETENSORS:
                    _write_safetensors(fh, plan, data, metadata or {})
                else:
                    _write_torch(fh, plan, data)
        except MscopeError as exc:
            raise as_save_error(exc, source) from exc
        except RuntimeError as exc:  # torch refusing a conversion or a view
            raise SaveError(f"cast failed: {' '.join(str(exc).split())[:120]}", source) from exc
        check_unchanged(before)

    return atomic_write(dest, write, overwrite=overwrite)


def _check_current(ckpt: Checkpoint, path: Path) -> None:
    """The records still describe the file (tensor bytes are read at the offsets they give)."""
    from ..readers import open_checkpoint

    try:
        fresh = open_checkpoint(ckpt.path, strict=False)
    except MscopeError as exc:
        raise SaveError(f"cannot read the source again: {exc.message}", path) from exc

    def layout(c: Checkpoint) -> list[tuple]:
        return [
            (
                t.name,
                t.shape,
                t.dtype,
                t.stride,
                t.storage_offset,
                t.storage.file,
                t.storage.data_offset,
            )
            if t.storage is not None
            else (t.name,)
            for t in c.model_tensors
        ]

    if layout(fresh) != layout(ckpt):
        raise SaveError("the file changed since it was opened", path, "reopen it and try again")


def plan_cast(
    ckpt: Checkpoint, dtype: str, names: Iterable[str] | None = None, fmt: str | None = None
) -> CastPlan:
    """The output of `cast_copy` without writing it (raises SaveError for unsupported input)."""
    path = local_source(ckpt.path)
    target = CAST_TARGETS.get(str(dtype).removeprefix("torch.")) if dtype is not None else None
    if target is None:
        raise SaveError(
            f"cannot cast to {str(dtype)[:40]!r}; choose float32, bfloat16 or float16", path
        )
    fmt = _output_format(ckpt, fmt)
    if ckpt.format == Format.TORCHSCRIPT or ckpt.kind == Format.TORCHSCRIPT:
        raise SaveError(
            "TorchScript archives cannot be cast here",
            path,
            "cast the scripted module in Python and save it",
        )
    if ckpt.module_root is not None:
        raise SaveError(
            "the model is a pickled nn.Module (full module); only state dicts are cast",
            path,
            "load it, call .to(dtype) and save it, or save its state_dict and cast that",
        )
    records = ckpt.model_tensors
    if not records:
        raise SaveError("the file holds no model tensors to cast", path)
    selected = _selected_names(names, records, path)
    groups: dict[int, list[TensorRecord]] = {}
    for r in records:
        _check_readable(r, path)
        groups.setdefault(id(r.storage), []).append(r)
    plan = CastPlan(fmt, target)
    blocks_of: dict[int, CastBlock] = {}  # torch: per storage
    placement: dict[int, tuple[int, tuple[int, ...], tuple[int, ...]]] = {}  # id(record) -> view
    out_dtype: dict[int, str] = {}
    for sid, group in groups.items():
        src = group[0].dtype
        if any(r.dtype != src for r in group):
            raise SaveError(
                f"tensors sharing the storage of {group[0].name!r} have different dtypes", path
            )
        chosen = selected is None or any(r.name in selected for r in group)
        out_dtype[sid] = target if chosen and src in FLOATING_DTYPES else src
        if fmt is CastFormat.SAFETENSORS:
            continue
        views = {(r.storage_offset, r.shape, r.stride) for r in group if r.numel}
        if len(views) <= 1:
            head = next((r for r in group if r.numel), group[0])
            blocks_of[sid] = CastBlock(head, src, out_dtype[sid], head.numel)
            for r in group:
                placement[id(r)] = (0, r.shape, contiguous_stride(r.shape))
            continue
        # Different views of one storage (e.g. slices of a fused weight): keep them one storage,
        # holding just the elements from the first one any view reads to the last.
        lo = min(r.storage_offset for r in group if r.numel)
        hi = max(_last_element(r) + 1 for r in group if r.numel)
        span = TensorRecord(
            group[0].name, (hi - lo,), src, (1,), lo, group[0].storage, section=group[0].section
        )
        blocks_of[sid] = CastBlock(span, src, out_dtype[sid], hi - lo)
        for r in group:
            placement[id(r)] = (r.storage_offset - lo if r.numel else 0, r.shape, r.stride)
    seen: dict[int, CastBlock] = {}
    for r in records:
        sid = id(r.storage)
        if fmt is CastFormat.SAFETENSORS:
            block = CastBlock(r, r.dtype, out_dtype[sid], r.numel)
            tensor = CastTensor(r.name, block, 0, r.shape, contiguous_stride(r.shape), r.alias_of)
        else:
            block = blocks_of[sid]
            offset, shape, stride = placement[id(r)]
            tensor = CastTensor(r.name, block, offset, shape, stride, r.alias_of)
        if id(block) not in seen:
            seen[id(block)] = block
            block.key = str(len(plan.blocks))
            plan.blocks.append(block)
        plan.tensors.append(tensor)
    return plan


def _selected_names(
    names: Iterable[str] | None, records: list[TensorRecord], path: Path
) -> set[str] | None:
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    selected = set(names)
    known = {r.name for r in records}
    unknown = sorted(n for n in selected if n not in known)
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise SaveError(f"{str(unknown[0])[:80]!r} is not a tensor of the model{more}", path)
    return selected


def _check_readable(r: TensorRecord, path: Path) -> None:
    from ..values.data import UNLOADABLE_DTYPES

    s = r.storage
    if r.note is not None or s is None:
        raise SaveError(f"tensor {r.name!r} ({r.note or 'no storage'}) cannot be copied", path)
    if r.dtype not in DTYPE_ITEMSIZE or r.dtype in UNLOADABLE_DTYPES:
        raise SaveError(f"tensor {r.name!r} is {r.dtype}, which cannot be copied", path)
    if s.file is None or s.data_offset is None:
        raise SaveError(f"the bytes of tensor {r.name!r} are missing from the file", path)
    if s.compressed:
        raise SaveError(
            f"the bytes of tensor {r.name!r} are compressed in the archive",
            path,
            "re-save it with torch",
        )


def _last_element(r: TensorRecord) -> int:
    return r.storage_offset + sum((n - 1) * st for n, st in zip(r.shape, r.stride))


def _output_format(ckpt: Checkpoint, fmt: str | None) -> CastFormat:
    if fmt is None:
        if ckpt.format in (Format.SAFETENSORS, Format.SHARDED_SAFETENSORS):
            return CastFormat.SAFETENSORS
        return CastFormat.TORCH
    try:
        return CastFormat(_FORMAT_ALIASES.get(fmt, fmt))
    except ValueError:
        raise SaveError(
            f"unknown output format {str(fmt)[:30]!r}; choose torch or safetensors", ckpt.path
        ) from None


def _default_cast_dest(ckpt: Checkpoint, plan: CastPlan) -> Path:
    path = Path(ckpt.path)
    tag = _TAGS[plan.dtype]
    if plan.fmt is CastFormat.SAFETENSORS:
        suffix = ".safetensors"
    else:
        suffix = path.suffix if path.suffix in _TORCH_SUFFIXES else ".pt"
    if path.is_dir():  # a DCP or sharded directory: a file next to it
        return sibling_path(path.with_name(path.name + suffix), tag)
    if ckpt.format.startswith("sharded") or path.name.endswith(".index.json"):
        stem = path.name.split(".", 1)[0] or "model"
        return sibling_path(path.with_name(stem + suffix), tag)
    return sibling_path(
        path.with_name(path.name[: len(path.name) - len(path.suffix)] + suffix), tag
    )


def _preflight(plan: CastPlan, path: Path) -> None:
    """Fail before any file exists: every dtype readable and each conversion supported by torch."""
    import torch

    from ..values.data import torch_dtype

    pairs = {(b.src_dtype, b.dtype) for b in plan.blocks}
    for src, dst in pairs:
        try:
            a, b = torch_dtype(src), torch_dtype(dst)
            if a != b:
                torch.zeros(1, dtype=a).to(b)
        except TensorDataError as exc:
            raise SaveError(exc.message, path) from exc
        except (RuntimeError, TypeError) as exc:
            raise SaveError(f"torch cannot cast {src} to {dst}", path) from exc
    if plan.fmt is CastFormat.SAFETENSORS:
        from ..readers.safetensors import SAFETENSORS_DTYPES

        codes = {v: k for k, v in SAFETENSORS_DTYPES.items()}
        for t in plan.tensors:
            if t.block.dtype not in codes:
                raise SaveError(
                    f"safetensors has no dtype for {t.name!r} ({t.block.dtype})",
                    path,
                    "write a torch file",
                )


def _block_chunks(data: Any, block: CastBlock) -> Iterator[memoryview]:
    """The block's output bytes, cast, in pieces of at most CHUNK_BYTES of the source."""
    import torch

    target = getattr(torch, block.dtype)
    for chunk in data.chunks(block.source, CHUNK_BYTES):
        if block.cast:
            chunk = chunk.to(target)
        piece = chunk.contiguous()
        n = piece.numel() * piece.element_size()
        if n:
            # A zero-copy view of the tensor's memory; `piece` stays alive until the next step.
            yield memoryview((ctypes.c_char * n).from_address(piece.data_ptr())).cast("B")


def write_block(sink: Callable[[memoryview], None], data: Any, block: CastBlock) -> int:
    """The block's output bytes (cast by torch, one chunk at a time) into `sink`; convert uses
    it for its --dtype and for views torch must gather."""
    written = 0
    for piece in _block_chunks(data, block):
        sink(piece)
        written += len(piece)
    if written != block.nbytes:
        raise SaveError(
            f"tensor {block.source.name!r} came out {written:,} bytes, not {block.nbytes:,}"
        )
    return written


def _state_dict_pickle(plan: CastPlan) -> bytes:
    """data.pkl of a state dict, as torch.save writes it (protocol 2, `_rebuild_tensor_v2` with
    typed storages; `_rebuild_tensor_v3` with an untyped storage for dtypes without one)."""
    import io
    import pickle
    from collections import OrderedDict

    import torch
    import torch._utils

    storage_types = torch.storage._dtype_to_storage_type_map()

    class StorageRef:
        __slots__ = ("pid",)

    class TensorOut:
        __slots__ = ("reduce",)

        def __reduce_ex__(self, protocol: int) -> Any:
            return self.reduce

    refs: dict[int, StorageRef] = {}
    out: OrderedDict[str, TensorOut] = OrderedDict()
    for t in plan.tensors:
        block = t.block
        dtype = getattr(torch, block.dtype)
        typed = storage_types.get(dtype)
        ref = refs.get(id(block))
        if ref is None:
            ref = refs[id(block)] = StorageRef()
            if typed is not None:
                ref.pid = ("storage", getattr(torch, typed), block.key, "cpu", block.numel)
            else:
                ref.pid = ("storage", torch.UntypedStorage, block.key, "cpu", block.nbytes)
        args: tuple = (ref, t.offset, tuple(t.shape), tuple(t.stride), False, OrderedDict())
        tensor = TensorOut()
        if typed is not None:
            tensor.reduce = (torch._utils._rebuild_tensor_v2, args)
        else:
            tensor.reduce = (torch._utils._rebuild_tensor_v3, (*args, dtype))
        out[t.name] = tensor

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return obj.pid if type(obj) is StorageRef else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(out)
    return buf.getvalue()


def _write_torch(fh: BinaryIO, plan: CastPlan, data: Any) -> None:
    zw = TorchZipWriter(fh, DEFAULT_ALIGNMENT)
    prefix = "archive/"
    zw.add(prefix + "data.pkl", _state_dict_pickle(plan))
    zw.add(prefix + ".format_version", b"1")
    zw.add(prefix + ".storage_alignment", str(DEFAULT_ALIGNMENT).encode())
    zw.add(prefix + "byteorder", sys.byteorder.encode())
    for block in plan.blocks:
        zw.begin(f"{prefix}data/{block.key}", block.nbytes)
        write_block(zw.write, data, block)
        zw.end()
    zw.add(prefix + "version", b"3\n")
    zw.add(prefix + ".data/serialization_id", f"{uuid.uuid4().int:040d}"[:40].encode())
    zw.finish()


def _safetensors_metadata(ckpt: Checkpoint, plan: CastPlan) -> dict[str, str]:
    metadata: dict[str, str] = {}
    source = ckpt.metadata.get("safetensors_metadata")
    if isinstance(source, dict):
        metadata.update(
            {k: v for k, v in source.items() if isinstance(k, str) and isinstance(v, str)}
        )
    metadata.setdefault("format", "pt")
    metadata.pop(TIED_METADATA_KEY, None)
    tied = {t.name: t.alias_of for t in plan.tensors if t.alias_of is not None}
    if tied:
        metadata[TIED_METADATA_KEY] = compact_json(tied)
    return metadata


def _write_safetensors(fh: BinaryIO, plan: CastPlan, data: Any, metadata: dict[str, str]) -> None:
    from ..readers.safetensors import SAFETENSORS_DTYPES

    codes = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in plan.tensors:
        size = t.block.nbytes
        header[t.name] = {
            "dtype": codes[t.block.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json_bytes(header, separators=(",", ":"))
    raw += b" " * (-len(raw) % 8)
    fh.write(struct.pack("<Q", len(raw)) + raw)
    for t in plan.tensors:
        write_block(fh.write, data, t.block)
