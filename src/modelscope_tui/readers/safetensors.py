"""safetensors files: an 8-byte little-endian header length, a JSON header, then the raw data.

Only the length and the header are read. Every number in the header is checked against the file
before it is used, so nothing here allocates memory in proportion to a value read from the file.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..checkpoint import (
    DTYPE_ITEMSIZE,
    Checkpoint,
    Entry,
    Format,
    StorageRecord,
    TensorRecord,
    infer_kind,
)
from ..errors import CorruptCheckpointError

MAX_HEADER = 100 << 20
MAX_DIMS = 64
MAX_DIM = 1 << 62

# safetensors dtype codes -> torch dtype names (checkpoint.DTYPE_ITEMSIZE keys).
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64",
    "C128": "complex128",
}
# Sub-byte codes: F4 is torch's float4_e2m1fn_x2 (two per byte, last dimension halved);
# the 6-bit floats have no torch dtype.
SUB_BYTE_BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


@dataclass(slots=True)
class HeaderTensor:
    """One tensor entry of a safetensors header, validated."""

    name: str
    code: str  # the file's dtype code, e.g. "BF16"
    dtype: str  # torch dtype name
    shape: tuple[int, ...]  # as torch would see it (F4: last dimension halved)
    begin: int  # relative to the data region
    end: int
    note: str | None = None


@dataclass(slots=True)
class Header:
    length: int  # bytes of JSON after the 8-byte length
    metadata: dict[str, str]
    tensors: list[HeaderTensor]
    refusals: list[str] = field(default_factory=list)  # what the safetensors library refuses

    @property
    def data_start(self) -> int:
        """Offset of the data region, relative to the start of the safetensors blob."""
        return 8 + self.length


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """torch's strides for a contiguous tensor of `shape` (zero sizes count as one)."""
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Duplicate(key)
            seen.add(key)
    return result


def read_header(fh: IO[bytes], path: Path, base: int = 0, available: int | None = None) -> Header:
    """Parse and validate the safetensors header of the blob at `base` in `fh`.

    `available` is how many bytes the blob may span (default: to the end of the file). Raises
    CorruptCheckpointError naming `path` for anything that does not add up.
    """

    def corrupt(message: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            message, path, "the file is truncated, damaged or not safetensors"
        )

    if available is None:
        fh.seek(0, 2)
        available = fh.tell() - base
    fh.seek(base)
    head = fh.read(8)
    if len(head) < 8 or available < 8:
        raise corrupt(f"safetensors file of {max(available, 0):,} bytes is too short for a header")
    (length,) = struct.unpack("<Q", head)
    if length < 2 or length > MAX_HEADER or 8 + length > available:
        raise corrupt(
            f"safetensors header length {length:,} is impossible for a {available:,}-byte file"
            if length <= MAX_HEADER
            else f"safetensors header length {length:,} exceeds the {MAX_HEADER:,}-byte limit"
        )
    raw = fh.read(length)  # bounded by the checks above: at most MAX_HEADER and at most the file
    if len(raw) != length:
        raise corrupt(f"safetensors header is truncated ({len(raw):,} of {length:,} bytes)")
    if raw[:1] != b"{":
        raise corrupt("safetensors header does not start with '{'")
    try:
        doc = json.loads(raw, object_pairs_hook=_no_duplicates)
    except _Duplicate as exc:
        raise corrupt(f"safetensors header repeats the key {short(str(exc.args[0]))}") from exc
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise corrupt(f"safetensors header is not valid JSON ({str(exc)[:80]})") from exc
    if not isinstance(doc, dict):
        raise corrupt(f"safetensors header is a JSON {type(doc).__name__}, not an object")

    metadata: dict[str, str] = {}
    raw_meta = doc.pop("__metadata__", None)
    if raw_meta is not None:
        if not isinstance(raw_meta, dict) or not all(isinstance(v, str) for v in raw_meta.values()):
            raise corrupt("safetensors __metadata__ must map strings to strings")
        metadata = raw_meta

    data_size = available - 8 - length
    tensors = [_tensor(name, info, data_size, corrupt) for name, info in doc.items()]
    spans = sorted((t.begin, t.end, t.name) for t in tensors if t.end > t.begin)
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise corrupt(f"tensors {short(prev)} and {short(name)} overlap in the data region")
    return Header(length, metadata, tensors, coverage_refusals(tensors, data_size))


def coverage_refusals(tensors: list[HeaderTensor], data_size: int) -> list[str]:
    """What the safetensors library refuses in a layout mscope can still read: it sorts the
    tensors by (begin, end) and wants each to begin where the previous one ended, and the last
    to end at the end of the file. So a gap before or between tensors (bytes no tensor owns,
    where anything can hide), a zero-size tensor placed inside another's bytes, and bytes after
    the last tensor all make `safe_open` / `load_file` fail. Overlaps are refused earlier."""
    out: list[str] = []
    pos = 0
    for t in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if t.begin != pos:
            if t.begin > pos:
                what = f"{t.begin - pos:,} unowned byte(s) before tensor {short(t.name)} (data bytes {pos:,}..{t.begin:,})"
            else:
                what = f"tensor {short(t.name)} begins at data byte {t.begin:,}, inside the bytes of another tensor"
            out.append(f"safetensors refuses this file: {what}")
            if len(out) >= 3:
                return out
        pos = max(pos, t.end)
    if pos != data_size:
        out.append(
            f"safetensors refuses this file: {data_size - pos:,} byte(s) after the last tensor "
            f"(the data region ends at {pos:,} of {data_size:,})"
        )
    return out


def _tensor(name: str, info: Any, data_size: int, corrupt) -> HeaderTensor:
    label = f"tensor {short(name)}"
    if not isinstance(info, dict):
        raise corrupt(f"{label}: header entry is a {type(info).__name__}, not an object")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(code, str):
        raise corrupt(f"{label}: dtype is missing or not a string")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise corrupt(
            f"{label}: shape must be a list of at most {MAX_DIMS} integers, got {short(shape)}"
        )
    if not all(_is_count(d) and d < MAX_DIM for d in shape):
        raise corrupt(f"{label}: shape {short(shape)} has a negative or non-integer size")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise corrupt(
            f"{label}: data_offsets must be two non-negative integers, got {short(offsets)}"
        )
    begin, end = offsets
    if end < begin:
        raise corrupt(f"{label}: data_offsets [{begin}, {end}] end before they begin")
    if end > data_size:
        raise corrupt(
            f"{label}: data_offsets [{begin:,}, {end:,}] run past the end of the file "
            f"(data region holds {data_size:,} bytes)"
        )
    numel = math.prod(shape)
    note = None
    if code in SAFETENSORS_DTYPES:
        dtype = SAFETENSORS_DTYPES[code]
        needed = numel * DTYPE_ITEMSIZE[dtype]
        torch_shape = tuple(shape)
    elif code in SUB_BYTE_BITS:
        bits = SUB_BYTE_BITS[code]
        needed = -(-numel * bits // 8)
        if code == "F4" and shape and shape[-1] % 2 == 0:
            dtype, torch_shape = "float4_e2m1fn_x2", (*shape[:-1], shape[-1] // 2)
            note = "F4 packed two per byte; shape shown as torch's float4_e2m1fn_x2"
        else:
            dtype, torch_shape = code.lower(), tuple(shape)
            note = f"{code}: {bits}-bit dtype with no torch equivalent"
    else:
        raise corrupt(f"{label}: unknown dtype {short(code, 30)}")
    if end - begin != needed:
        raise corrupt(
            f"{label}: data_offsets [{begin:,}, {end:,}] span {end - begin:,} bytes but shape "
            f"{list(shape)} of {code} needs {needed:,}"
        )
    return HeaderTensor(name, code, dtype, torch_shape, begin, end, note)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors(path: Path, fh: IO[bytes] | None = None) -> Checkpoint:
    """`fh`: a file object over a byte source (sources.SourceFile) for a remote `path`."""
    if fh is not None:
        header = read_header(fh, path)
    else:
        path = Path(path)
        with open(path, "rb") as fh:
            header = read_header(fh, path)
    ckpt = Checkpoint(path, Format.SAFETENSORS, files=[path])
    ckpt.metadata["safetensors_metadata"] = dict(header.metadata)
    ckpt.metadata["header_bytes"] = header.length
    ckpt.refusals.extend(header.refusals)
    for key, value in header.metadata.items():
        ckpt.entries.append(
            Entry(f"__metadata__.{key}", "str", value if len(value) <= 200 else value[:197] + "...")
        )
    ckpt.tensors = natural_order([tensor_record(t, path, header.data_start) for t in header.tensors])
    return ckpt


_DIGITS = re.compile(r"\d+")


def natural_key(name: str) -> str:
    # Numbers padded to 20 digits compare by value: layers.2 before layers.10.
    return _DIGITS.sub(lambda m: m.group().zfill(20), name)


def natural_order(records: list[TensorRecord]) -> list[TensorRecord]:
    """Records in numeric name order (layers.0, 1, 2, ... 10) when their order carries no
    information: the safetensors writer sorts the header by dtype size, then by name, which
    puts layers.10 before layers.2 and shows a 24-layer model out of order. A file in any other
    order (names out of order within one dtype) keeps it."""
    for a, b in zip(records, records[1:]):
        if a.dtype == b.dtype and a.name > b.name:
            return records
    return sorted(records, key=lambda r: natural_key(r.name))


def tensor_record(
    t: HeaderTensor, path: Path, data_start: int, name: str | None = None
) -> TensorRecord:
    """The record for one header tensor whose data region starts at absolute `data_start`."""
    name = t.name if name is None else name
    storage = None
    if t.dtype in DTYPE_ITEMSIZE:
        storage = StorageRecord(
            key=t.name,
            dtype=t.dtype,
            numel=math.prod(t.shape),
            location="cpu",
            file=path,
            data_offset=data_start + t.begin,
            data_size=t.end - t.begin,
        )
    return TensorRecord(
        name=name,
        shape=t.shape,
        dtype=t.dtype,
        stride=contiguous_stride(t.shape),
        storage_offset=0,
        storage=storage,
        kind=infer_kind(name, t.dtype),
        note=t.note,
    )
