"""Byte-level builders for hostile checkpoints: pickles written opcode by opcode, zips by struct.

Nothing here calls torch or pickle.dumps: every byte is chosen, so a test can place BUILD,
SETITEM or a deep nest exactly where the attack needs it.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

PROTO2 = b"\x80\x02"
MARK, STOP, TUPLE, REDUCE, BUILD, SETITEM, SETITEMS = b"(", b".", b"t", b"R", b"b", b"s", b"u"
EMPTY_DICT, EMPTY_TUPLE, EMPTY_LIST, NONE, NEWFALSE = b"}", b")", b"]", b"N", b"\x89"
TUPLE1, TUPLE2, TUPLE3, BINPERSID, APPENDS = b"\x85", b"\x86", b"\x87", b"Q", b"e"


def uni(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def integer(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if -(1 << 31) <= value < 1 << 31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def ints(values: tuple[int, ...]) -> bytes:
    return MARK + b"".join(integer(v) for v in values) + TUPLE


def state_dict(attrs: dict[str, object]) -> bytes:
    """A dict of str -> int/str, as opcodes."""
    out = EMPTY_DICT + MARK
    for key, value in attrs.items():
        out += uni(key) + (uni(value) if isinstance(value, str) else integer(value))
    return out + SETITEMS


def build_state(attrs: dict[str, object], spelling: str) -> bytes:
    """The state BUILD applies, in its three spellings: `dict` (instance __dict__),
    `slots` ((None, {attr: value}): setattr one by one), `tuple2` ({}, {attr: value})."""
    if spelling == "dict":
        return state_dict(attrs)
    if spelling == "slots":
        return NONE + state_dict(attrs) + TUPLE2
    return EMPTY_DICT + state_dict(attrs) + TUPLE2


def storage(key: str, numel: int, dtype: str = "FloatStorage", after: bytes = b"") -> bytes:
    """persistent id ('storage', torch.<dtype>, key, 'cpu', numel) -> BINPERSID (+ `after`)."""
    pid = MARK + uni("storage") + glob("torch", dtype) + uni(key) + uni("cpu") + integer(numel) + TUPLE
    return pid + BINPERSID + after


def tensor(
    store: bytes,
    offset: int,
    shape: tuple[int, ...],
    stride: tuple[int, ...],
    *,
    on_class: bytes = b"",
    after: bytes = b"",
) -> bytes:
    """torch._utils._rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict()).
    `on_class` runs right after the global is pushed (BUILD on the class), `after` after the
    tensor is built (BUILD on the record)."""
    args = (
        MARK + store + integer(offset) + ints(shape) + ints(stride) + NEWFALSE
        + glob("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE + TUPLE
    )  # fmt: skip
    return glob("torch._utils", "_rebuild_tensor_v2") + on_class + args + REDUCE + after


def state_pickle(items: dict[str, bytes]) -> bytes:
    """{name: <opcodes of a value>} as a whole protocol-2 pickle."""
    body = b"".join(uni(name) + value for name, value in items.items())
    return PROTO2 + EMPTY_DICT + MARK + body + SETITEMS + STOP


# ----------------------------------------------------------------------------------------------
# Zip archives by hand
# ----------------------------------------------------------------------------------------------
def zip_bytes(members: list[tuple[str, bytes]], deflate: set[str] | frozenset = frozenset()) -> bytes:
    """A zip archive (local headers, central directory, end record) with members stored, or
    deflated when named in `deflate`. CRCs are right; sizes are the real ones."""
    out = bytearray()
    central = bytearray()
    for name, data in members:
        raw = name.encode()
        method = 8 if name in deflate else 0
        body = zlib.compress(data, 9)[2:-4] if method else data
        crc = zlib.crc32(data)
        offset = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(body), len(data), len(raw), 0)
        out += raw + body
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc, len(body), len(data),
            len(raw), 0, 0, 0, 0, 0, offset,
        )  # fmt: skip
        central += raw
    start = len(out)
    out += central
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), start, 0)
    return bytes(out)


def torch_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes], deflate: frozenset = frozenset()) -> Path:
    members = [("archive/data.pkl", data_pkl), ("archive/byteorder", b"little"), ("archive/version", b"3\n")]
    members += [(f"archive/data/{key}", data) for key, data in storages.items()]
    path.write_bytes(zip_bytes(members, deflate))
    return path


def zip_lying(members: list[tuple[str, bytes, dict]]) -> bytes:
    """A zip whose directory says what each member's `opts` choose: `method` (0 stored, 8
    deflated: `data` is the uncompressed payload), `declared` (the uncompressed size written in
    both headers instead of the real one), `zip64` (sizes as 0xFFFFFFFF with a zip64 extra
    field carrying `declared`), `crc` (instead of the real CRC-32)."""
    out = bytearray()
    central = bytearray()
    for name, data, opts in members:
        raw = name.encode()
        method = opts.get("method", 0)
        body = zlib.compress(data, 9)[2:-4] if method == 8 else data
        crc = opts.get("crc", zlib.crc32(data))
        declared = opts.get("declared", len(data))
        offset = len(out)
        if opts.get("zip64"):
            extra = struct.pack("<HHQQ", 1, 16, declared, len(body))
            usize = csize = 0xFFFFFFFF
        else:
            extra, usize, csize = b"", declared, len(body)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, method, 0, 0, crc, csize, usize, len(raw), len(extra))
        out += raw + extra + body
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, method, 0, 0, crc, csize, usize,
            len(raw), len(extra), 0, 0, 0, 0, offset,
        )  # fmt: skip
        central += raw + extra
    start = len(out)
    out += central
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), start, 0)
    return bytes(out)


def big_pickle(size: int) -> bytes:
    """A valid pickle of about `size` bytes (one long str): deflates to almost nothing."""
    return PROTO2 + b"X" + struct.pack("<I", size) + b"a" * size + STOP


# ----------------------------------------------------------------------------------------------
# The pickle scans, as tests compare them
# ----------------------------------------------------------------------------------------------
def native_end(data: bytes) -> int | None:
    """End offset the compiled scan gives, None when it refuses (skips without the library)."""
    import pytest

    from modelscope_tui.readers.pickle.scan import native_scan

    scan = native_scan()
    if scan is None:
        pytest.skip("compiled library not built")
    end = scan(data, 0)
    return None if end < 0 else end


def exact_end(data: bytes) -> int | None:
    """End offset the exact (Python) scan gives, None when it refuses."""
    from modelscope_tui.errors import UnsafePickleError
    from modelscope_tui.readers.pickle.scan import scan_exact

    try:
        return scan_exact(data, 0, "t")
    except UnsafePickleError:
        return None
