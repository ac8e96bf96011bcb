"""GGUF files (llama.cpp): magic, version, tensor and key/value counts, typed key/values, tensor
infos, padding to the alignment, then the tensor data.

Our own strict parser, not gguf-py's GGUFReader: that one builds a numpy array per string (a
150k-token vocabulary takes seconds), and trusts the file's counts (an array of 2^60 values past
the end of the file loops for ever over empty reads). Here every count, length, dimension and
offset is checked against the bytes left in the file before it is used, so a 1 KB file can
neither allocate more than its size nor loop more than its size allows. gguf-py stays the
differential oracle in the tests, and does the dequantizing (values/chunks.py) and the llama.cpp
naming map (diff/pairing.py), imported lazily.

Shapes: GGUF stores dims innermost first (ne[0] is a row's length); records carry torch's order
(reversed), the order a safetensors file of the same model has.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from ..checkpoint import (
    BLOCK_DTYPES,
    PARAMETER,
    Checkpoint,
    Entry,
    Format,
    StorageRecord,
    TensorRecord,
    span_bytes,
)
from ..errors import CorruptCheckpointError, UnsupportedFormatError
from .safetensors import contiguous_stride

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # v2 and v3 share the layout (v3 adds big-endian files); v1 had 32-bit counts
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64 with the NUL: llama.cpp refuses longer names
MAX_NAME_LENGTH = 1 << 16  # keys and tensor names: longer ones are refused, never copied
INT64_MAX = (1 << 63) - 1
MAX_ARRAY_STRINGS = 1 << 24  # strings in all arrays together; a real vocabulary holds ~300k
PREVIEW_ITEMS = 8  # items of an array shown in its entry
MAX_VALUE_CHARS = 200

# GGUF key/value types: id -> (name, struct code, size). 8 is a string, 9 an array.
STRING, ARRAY = 8, 9
SCALARS: dict[int, tuple[str, str, int]] = {
    0: ("uint8", "B", 1),
    1: ("int8", "b", 1),
    2: ("uint16", "H", 2),
    3: ("int16", "h", 2),
    4: ("uint32", "I", 4),
    5: ("int32", "i", 4),
    6: ("float32", "f", 4),
    7: ("bool", "?", 1),
    10: ("uint64", "Q", 8),
    11: ("int64", "q", 8),
    12: ("float64", "d", 8),
}
TYPE_NAMES = {**{k: v[0] for k, v in SCALARS.items()}, STRING: "string", ARRAY: "array"}

# GGML tensor types by id (ggml.h). Plain ones read as the torch dtype of the same values;
# block-quantized ones keep GGML's name (checkpoint.BLOCK_DTYPES has their sizes).
GGML_PLAIN = {
    0: "float32",
    1: "float16",
    24: "int8",
    25: "int16",
    26: "int32",
    27: "int64",
    28: "float64",
    30: "bfloat16",
}
GGML_PLAIN_NAMES = {
    "float32": "F32", "float16": "F16", "int8": "I8", "int16": "I16", "int32": "I32",
    "int64": "I64", "float64": "F64", "bfloat16": "BF16",
}  # fmt: skip
GGML_QUANT = {
    2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K",
    12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 29: "IQ1_M", 34: "TQ1_0",
    35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}  # fmt: skip
assert set(GGML_QUANT.values()) == set(BLOCK_DTYPES)

# llama.cpp's llama_ftype (general.file_type): what the file was quantized to as a whole.
FILE_TYPES = {
    0: "ALL_F32", 1: "MOSTLY_F16", 2: "MOSTLY_Q4_0", 3: "MOSTLY_Q4_1", 7: "MOSTLY_Q8_0",
    8: "MOSTLY_Q5_0", 9: "MOSTLY_Q5_1", 10: "MOSTLY_Q2_K", 11: "MOSTLY_Q3_K_S",
    12: "MOSTLY_Q3_K_M", 13: "MOSTLY_Q3_K_L", 14: "MOSTLY_Q4_K_S", 15: "MOSTLY_Q4_K_M",
    16: "MOSTLY_Q5_K_S", 17: "MOSTLY_Q5_K_M", 18: "MOSTLY_Q6_K", 19: "MOSTLY_IQ2_XXS",
    20: "MOSTLY_IQ2_XS", 21: "MOSTLY_Q2_K_S", 22: "MOSTLY_IQ3_XS", 23: "MOSTLY_IQ3_XXS",
    24: "MOSTLY_IQ1_S", 25: "MOSTLY_IQ4_NL", 26: "MOSTLY_IQ3_S", 27: "MOSTLY_IQ3_M",
    28: "MOSTLY_IQ2_S", 29: "MOSTLY_IQ2_M", 30: "MOSTLY_IQ4_XS", 31: "MOSTLY_IQ1_M",
    32: "MOSTLY_BF16", 36: "MOSTLY_TQ1_0", 37: "MOSTLY_TQ2_0", 38: "MOSTLY_MXFP4_MOE",
}  # fmt: skip


def ggml_type_name(dtype: str) -> str:
    """GGML's name of a record's dtype (float32 -> F32, Q4_K -> Q4_K)."""
    return GGML_PLAIN_NAMES.get(dtype, dtype)


def quant_note(dtype: str) -> str | None:
    """What a block-quantized dtype is, in one line; None for plain dtypes."""
    block = BLOCK_DTYPES.get(dtype)
    if block is None:
        return None
    elements, nbytes = block
    return f"GGML {dtype}: {nbytes * 8 / elements:.4g} bits per value ({elements}-value blocks of {nbytes} bytes)"


class _Corrupt(Exception):
    """Raised inside the parser; read_gguf turns it into one CorruptCheckpointError line."""


class _Reader:
    """A cursor over the mapped file that checks every read against the end."""

    def __init__(self, buf: Any, size: int, order: str) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0
        self.order = order

    @property
    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise _Corrupt(
                f"{what} needs {n:,} bytes at offset {self.pos:,}, but the file ends at {self.size:,}"
            )

    def scalar(self, code: str, size: int, what: str) -> Any:
        self.need(size, what)
        (value,) = struct.unpack_from(self.order + code, self.buf, self.pos)
        self.pos += size
        return value

    def u32(self, what: str) -> int:
        return self.scalar("I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("Q", 8, what)

    def string(self, what: str, limit: int | None = None, longest: int | None = None) -> str:
        """A length-prefixed UTF-8 string; with `limit` only its first `limit` bytes are decoded
        (the rest is skipped, never copied); one longer than `longest` bytes is refused."""
        n = self.u64(what)
        self.need(n, what)
        if longest is not None and n > longest:
            raise _Corrupt(f"{what} is {n:,} bytes long (at most {longest:,})")
        start = self.pos
        self.pos += n
        raw = bytes(self.buf[start : start + (n if limit is None else min(n, limit))])
        text = raw.decode("utf-8", "backslashreplace")
        return text if limit is None or n <= limit else text + "..."


class _Header:
    def __init__(self) -> None:
        self.version = 0
        self.big_endian = False
        self.kv: dict[str, tuple[str, Any]] = {}  # key -> (type name, value or array summary)
        self.arrays: dict[str, int] = {}  # array key -> element count
        self.tensors: list[tuple[str, tuple[int, ...], int, int]] = []  # name, ne, type id, offset
        self.alignment = DEFAULT_ALIGNMENT
        self.data_start = 0
        self.strings = 0


def read_gguf(path: Path) -> Checkpoint:
    path = Path(path)
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size < 24:
            raise CorruptCheckpointError(
                f"GGUF file of {size:,} bytes is too short for a header",
                path,
                "truncated or not GGUF",
            )
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                header = _parse(buf, size, path)
            except _Corrupt as exc:
                raise CorruptCheckpointError(
                    f"GGUF {exc.args[0]}", path, "the file is truncated, damaged or not GGUF"
                ) from None
            except struct.error as exc:  # every read is checked first; a last guard
                raise CorruptCheckpointError(f"GGUF header cannot be read ({exc})", path) from None
    return _checkpoint(path, size, header)


def _parse(buf: Any, size: int, path: Path) -> _Header:
    h = _Header()
    if bytes(buf[:4]) != MAGIC:
        raise _Corrupt("magic is not 'GGUF'")
    (version,) = struct.unpack_from("<I", buf, 4)
    order = "<"
    if version & 0xFFFF == 0 and version:
        # llama.cpp's test: a big-endian file's small version reads as 0xNN000000 here
        (swapped,) = struct.unpack_from(">I", buf, 4)
        if swapped in VERSIONS:
            version, order, h.big_endian = swapped, ">", True
    if version not in VERSIONS:
        if version == 1:
            raise UnsupportedFormatError(
                "GGUF version 1 (2023, 32-bit counts) is no longer read by llama.cpp or mscope", path,
                "convert the model again with a current llama.cpp",
            )  # fmt: skip
        raise UnsupportedFormatError(
            f"GGUF version {version:,} is not one mscope reads (2 and 3)", path,
            "a newer llama.cpp wrote it; update mscope" if 3 < version < 1 << 16 else "damaged or not GGUF",
        )  # fmt: skip
    h.version = version
    r = _Reader(buf, size, order)
    r.pos = 8
    n_tensors = r.u64("tensor count")
    n_kv = r.u64("key/value count")
    # Smallest encodings: a key/value is an 8-byte key length, a 4-byte type and a 1-byte value;
    # a tensor info an 8-byte name length, 4-byte n_dims, 4-byte type and 8-byte offset.
    if n_kv > r.left // 13:
        raise _Corrupt(
            f"header declares {n_kv:,} key/values; the {r.left:,} bytes left hold at most {r.left // 13:,}"
        )
    if n_tensors > r.left // 24:
        raise _Corrupt(
            f"header declares {n_tensors:,} tensors; the {r.left:,} bytes left hold at most {r.left // 24:,}"
        )
    for i in range(n_kv):
        key = r.string(f"key of key/value {i:,}", longest=MAX_NAME_LENGTH)
        if key in h.kv:
            raise _Corrupt(f"key {_short(key)} appears twice")
        kind = r.u32(f"type of key {_short(key)}")
        h.kv[key] = _value(r, h, key, kind)
    alignment = h.kv.get("general.alignment")
    if alignment is not None:
        kind, value = alignment
        if kind != "uint32":
            raise _Corrupt(f"general.alignment is a {kind}; GGUF wants a uint32")
        if value == 0 or value & (value - 1):
            raise _Corrupt(f"general.alignment {value:,} is not a power of two")
        h.alignment = value
    if n_tensors > r.left // 24:  # the key/values took their bytes: check again
        raise _Corrupt(
            f"header declares {n_tensors:,} tensors; the {r.left:,} bytes left hold at most {r.left // 24:,}"
        )
    names: set[str] = set()
    for i in range(n_tensors):
        name = r.string(f"name of tensor {i:,}", longest=MAX_NAME_LENGTH)
        if name in names:
            raise _Corrupt(f"tensor name {_short(name)} appears twice")
        names.add(name)
        label = f"tensor {_short(name)}"
        n_dims = r.u32(f"dimension count of {label}")
        if n_dims > MAX_DIMS:
            raise _Corrupt(f"{label} has {n_dims:,} dimensions; GGML has at most {MAX_DIMS}")
        r.need(8 * n_dims, f"dimensions of {label}")
        ne = struct.unpack_from(f"{order}{n_dims}q", buf, r.pos)
        r.pos += 8 * n_dims
        numel = 1
        for d in ne:
            if d < 0:
                raise _Corrupt(f"{label} has a negative dimension ({d:,}; over 2^63 unsigned)")
            numel *= d
        if numel > INT64_MAX:
            raise _Corrupt(f"{label} dimensions {list(ne)} multiply to more than 2^63 values")
        type_id = r.u32(f"type of {label}")
        offset = r.u64(f"data offset of {label}")
        h.tensors.append((name, ne, type_id, offset))
    h.data_start = -(-r.pos // h.alignment) * h.alignment
    return h


def _value(r: _Reader, h: _Header, key: str, kind: int) -> tuple[str, Any]:
    label = f"value of {_short(key)}"
    if kind in SCALARS:
        name, code, size = SCALARS[kind]
        value = r.scalar(code, size, label)
        return name, _f32(value) if code == "f" else value
    if kind == STRING:
        return "string", r.string(label, MAX_VALUE_CHARS)
    if kind != ARRAY:
        raise _Corrupt(f"key {_short(key)} has unknown value type {kind:,}")
    item = r.u32(f"array type of {_short(key)}")
    count = r.u64(f"array length of {_short(key)}")
    h.arrays[key] = count
    if item == ARRAY:
        raise _Corrupt(f"key {_short(key)} is an array of arrays (GGUF and llama.cpp allow none)")
    if item in SCALARS:
        name, code, size = SCALARS[item]
        if count > r.left // size:
            raise _Corrupt(
                f"array {_short(key)} declares {count:,} {name} values; {r.left:,} bytes are left"
            )
        shown = min(count, PREVIEW_ITEMS)
        preview = list(struct.unpack_from(f"{r.order}{shown}{code}", r.buf, r.pos))
        if code == "f":
            preview = [_f32(v) for v in preview]
        r.pos += count * size
        return f"array[{name}]", _array_text(count, name, preview)
    if item != STRING:
        raise _Corrupt(f"array {_short(key)} has unknown item type {item:,}")
    if count > r.left // 8:
        raise _Corrupt(f"array {_short(key)} declares {count:,} strings; {r.left:,} bytes are left")
    h.strings += count
    if h.strings > MAX_ARRAY_STRINGS:
        raise _Corrupt(f"arrays hold more than {MAX_ARRAY_STRINGS:,} strings")
    preview = [
        r.string(f"item {i:,} of {_short(key)}", 40) for i in range(min(count, PREVIEW_ITEMS))
    ]
    unpack, buf, size, order = struct.unpack_from, r.buf, r.size, r.order + "Q"
    pos = r.pos
    for i in range(count - len(preview)):  # the rest: lengths only, nothing decoded or kept
        if pos + 8 > size or (pos := pos + 8 + unpack(order, buf, pos)[0]) > size:
            raise _Corrupt(
                f"item {i + len(preview):,} of array {_short(key)} runs past the end of the file"
            )
    r.pos = pos
    return "array[string]", _array_text(count, "string", preview)


def _f32(value: float) -> float:
    """A float32 as the shortest decimal that reads back as the same float32 (1e-05, not
    9.999999747378752e-06: the double nearest the float32)."""
    if value != value or value in (float("inf"), float("-inf")):
        return value
    packed = struct.pack("<f", value)
    for digits in range(1, 10):
        short = float(f"{value:.{digits}g}")
        if struct.pack("<f", short) == packed:
            return short
    return value


def _array_text(count: int, name: str, preview: list) -> str:
    items = ", ".join(repr(v) for v in preview)
    more = ", ..." if count > len(preview) else ""
    return f"[{count:,} x {name}: {items}{more}]" if count else f"[0 x {name}]"


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _checkpoint(path: Path, size: int, h: _Header) -> Checkpoint:
    ckpt = Checkpoint(path, Format.GGUF, files=[path])
    data_size = size - h.data_start
    spans: list[tuple[int, int, str]] = []
    for name, ne, type_id, offset in h.tensors:
        label = f"tensor {_short(name)}"
        dtype = GGML_PLAIN.get(type_id) or GGML_QUANT.get(type_id)
        if dtype is None:
            raise CorruptCheckpointError(
                f"GGUF {label} has unknown GGML type {type_id:,}", path,
                "written by a newer llama.cpp, or damaged; mscope knows the types of gguf-py 0.19",
            )  # fmt: skip
        block = BLOCK_DTYPES.get(dtype)
        row = ne[0] if ne else 1
        if block is not None and row % block[0]:
            raise CorruptCheckpointError(
                f"GGUF {label} rows of {row:,} values are not whole {dtype} blocks of {block[0]}",
                path,
            )
        shape = tuple(reversed(ne))
        numel = 1
        for d in shape:
            numel *= d
        nbytes = span_bytes(dtype, numel)
        if offset + nbytes > data_size:
            raise CorruptCheckpointError(
                f"GGUF {label} ({nbytes:,} bytes at data offset {offset:,}) runs past the end of the "
                f"file (the data region holds {max(data_size, 0):,} bytes)", path,
                "the file is truncated or damaged; re-download it",
            )  # fmt: skip
        if nbytes:
            spans.append((offset, offset + nbytes, name))
        storage = StorageRecord(
            key=name,
            dtype=dtype,
            numel=numel,
            file=path,
            data_offset=h.data_start + offset,
            data_size=nbytes,
            byteorder="big" if h.big_endian else "little",
        )
        ckpt.tensors.append(
            TensorRecord(
                name=name,
                shape=shape,
                dtype=dtype,
                stride=contiguous_stride(shape),
                storage=storage,
                kind=PARAMETER,  # every GGUF tensor is a weight of the model
                note=quant_note(dtype),
            )
        )
    spans.sort()
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise CorruptCheckpointError(
                f"GGUF tensors {_short(prev)} and {_short(name)} overlap", path
            )
    ckpt.refusals.extend(_llama_refusals(h, path))
    for key, (kind, value) in h.kv.items():
        ckpt.entries.append(Entry(key, kind, value))
    ckpt.metadata["gguf"] = {
        "version": h.version,
        "byte_order": "big" if h.big_endian else "little",
        "alignment": h.alignment,
        "key_values": len(h.kv),
        "tensors": len(h.tensors),
        "data_offset": h.data_start,
        **facts(h),
    }
    return ckpt


def _llama_refusals(h: _Header, path: Path) -> list[str]:
    """What llama.cpp's gguf reader refuses in a file mscope reads: tensors not packed in order
    from the start of the data region (each at the previous end, padded to the alignment), and
    names of 64 bytes or more."""
    out: list[str] = []
    expected = 0
    for name, ne, type_id, offset in h.tensors:
        if offset != expected:
            out.append(
                f"llama.cpp refuses this file: tensor {_short(name)} is at data offset {offset:,}, "
                f"expected {expected:,} (tensors packed in order, aligned to {h.alignment})"
            )
            break
        dtype = GGML_PLAIN.get(type_id) or GGML_QUANT[type_id]
        numel = 1
        for d in ne:
            numel *= d
        expected = offset + -(-span_bytes(dtype, numel) // h.alignment) * h.alignment
    long = [
        name
        for name, *_ in h.tensors
        if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES
    ]
    if long:
        out.append(
            f"llama.cpp refuses this file: {len(long):,} tensor name(s) longer than {MAX_NAME_BYTES} bytes, "
            f"e.g. {_short(long[0])}"
        )
    return out


def facts(h: _Header) -> dict[str, Any]:
    """The key/values a llama.cpp user asks about first, under plain names."""
    kv = h.kv

    def get(key: str) -> Any:
        v = kv.get(key)
        return v[1] if v is not None and not v[0].startswith("array") else None

    arch = get("general.architecture")
    out: dict[str, Any] = {"architecture": arch, "name": get("general.name")}
    if isinstance(arch, str):
        out["context_length"] = get(f"{arch}.context_length")
        out["block_count"] = get(f"{arch}.block_count")
        out["embedding_length"] = get(f"{arch}.embedding_length")
        out["head_count"] = get(f"{arch}.attention.head_count")
        out["head_count_kv"] = get(f"{arch}.attention.head_count_kv")
    out["tokenizer_model"] = get("tokenizer.ggml.model")
    out["tokenizer_tokens"] = h.arrays.get("tokenizer.ggml.tokens")
    out["quantization_version"] = get("general.quantization_version")
    file_type = get("general.file_type")
    if isinstance(file_type, int):
        out["file_type"] = FILE_TYPES.get(file_type, f"type {file_type}")
    return {k: v for k, v in out.items() if v is not None}


def fact_lines(ckpt: Checkpoint) -> list[tuple[str, str]]:
    """(label, value) rows of a GGUF file's facts, for the summary and the explorer's root."""
    meta = ckpt.metadata.get("gguf")
    if not isinstance(meta, dict):
        return []
    rows: list[tuple[str, str]] = [
        (
            "gguf",
            f"version {meta['version']}, {meta['byte_order']}-endian, alignment {meta['alignment']}",
        )
    ]
    labels = (
        ("architecture", "architecture"),
        ("name", "name"),
        ("context_length", "context length"),
        ("block_count", "blocks"),
        ("embedding_length", "embedding length"),
        ("head_count", "attention heads"),
        ("head_count_kv", "key/value heads"),
        ("tokenizer_model", "tokenizer"),
        ("tokenizer_tokens", "tokenizer tokens"),
        ("file_type", "file type"),
        ("quantization_version", "quantization version"),
    )
    for key, label in labels:
        value = meta.get(key)
        if value is not None:
            rows.append(
                (
                    label,
                    f"{value:,}"
                    if isinstance(value, int) and not isinstance(value, bool)
                    else str(value),
                )
            )
    types: dict[str, int] = {}
    for t in ckpt.tensors:
        name = ggml_type_name(t.dtype)
        types[name] = types.get(name, 0) + 1
    rows.append(
        (
            "tensor types",
            ", ".join(f"{k} x{v:,}" for k, v in sorted(types.items(), key=lambda kv: -kv[1])),
        )
    )
    rows.append(("shapes", "torch order (GGUF stores dims reversed: ne[0] is a row's length)"))
    return rows
