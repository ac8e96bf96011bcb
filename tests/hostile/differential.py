"""Differential harness: mscope against the reference loaders, on malformed variants built byte by byte.

Each variant is a file (or DCP directory) built here, in-process, with no torch: torch zips and
legacy files from hand-written opcodes (tests/hostile/craft.py), safetensors from a JSON header,
zips member by member with every field a knob (flag bits, local names, CRCs, zip64 extras,
prepended bytes, duplicates). One subprocess then asks the reference loader about all of them
(`reference()`): `torch.load(weights_only=True)` (no mmap: it checks CRCs), `safetensors.safe_open`
+ `load_file`, or torch's DCP reader. Only payload-free variants ever reach a reference loader.

`judge()` states the contract:
- the reference refuses -> `audit` has an error finding (mscope is stricter or says why), and never
  "PASS";
- the reference loads -> mscope opens it with the same names, shapes, dtypes and value digests, or
  has an error finding saying why it does not (stricter, with a reason).

`random_variant(rng)` and `run_random(n, seed)` are the long fuzzer's entry points
(bench/fuzz_long.py --differential).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import craft

ROOT = Path(__file__).resolve().parents[2]
DCP_SAMPLE = ROOT / "sample_models" / "dcp_checkpoint"
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# -- the tensors every base file holds --------------------------------------------------------------
# name -> (torch storage class, safetensors code, dtype name, shape, raw little-endian bytes)
TENSORS: dict[str, tuple[str, str, str, tuple[int, ...], bytes]] = {
    "a.weight": ("FloatStorage", "F32", "float32", (2, 3), struct.pack("<6f", 1, -2, 3.5, 0.25, 8, -0.5)),
    "b.bias": ("LongStorage", "I64", "int64", (4,), struct.pack("<4q", 7, -1, 1 << 40, 3)),
    "c.half": ("HalfStorage", "F16", "float16", (3,), struct.pack("<3e", 0.5, -1.0, 2.0)),
}


def digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


EXPECTED = {n: {"shape": list(s), "dtype": d, "digest": digest(raw)} for n, (_, _, d, s, raw) in TENSORS.items()}


@dataclass
class Variant:
    name: str
    family: str  # safetensors | zip | legacy | dcp
    path: Path
    loader: str  # torch | safetensors | dcp
    payload_free: bool = True  # only these reach the reference loader
    note: str = ""


# ================================================================================================
# Builders
# ================================================================================================
def state_pickle(names: list[str] | None = None, keys: dict[str, str] | None = None, legacy: bool = False) -> bytes:
    """{name: tensor} as a protocol-2 pickle, storage key of tensor i = str(i) unless `keys`.
    legacy: persistent ids of the pre-1.6 format (a sixth element, the view metadata: None)."""
    items = {}
    for i, name in enumerate(names or list(TENSORS)):
        storage_cls, _, _, shape, raw = TENSORS[name]
        numel = len(raw) // _itemsize(TENSORS[name][2])
        key = (keys or {}).get(name, str(i))
        stride = _contiguous(shape)
        store = craft.storage(key, numel, storage_cls)
        if legacy:
            store = store.replace(craft.TUPLE + craft.BINPERSID, craft.NONE + craft.TUPLE + craft.BINPERSID)
        items[name] = craft.tensor(store, 0, shape, stride)
    return craft.state_pickle(items)


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "int64": 8, "float16": 2}[dtype]


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(out))


@dataclass
class Member:
    name: str
    data: bytes
    flags: int = 0
    method: int = 0  # 0 stored, 8 deflated
    local_name: str | None = None  # the local header's name, when it differs from the directory's
    crc: int | None = None  # the declared CRC, when it lies
    zip64: bool = False  # sizes and offset through a zip64 extra field (directory and local)
    central_extra: bytes | None = None  # replaces the directory entry's extra field


def zip_archive(members: list[Member], prefix: bytes = b"", eocd64: bool = False, comment: bytes = b"") -> bytes:
    """A zip archive from `members`, each field a knob. `prefix`: bytes before the archive, with
    the directory offsets counting from the file's start (as `zip -A` fixes them)."""
    out = bytearray(prefix)
    central = bytearray()
    for m in members:
        body = zlib.compress(m.data, 9)[2:-4] if m.method == 8 else m.data
        crc = zlib.crc32(m.data) if m.crc is None else m.crc
        local_raw = (m.local_name if m.local_name is not None else m.name).encode()
        raw = m.name.encode()
        offset = len(out)
        if m.zip64:
            local_extra = struct.pack("<HHQQ", 1, 16, len(m.data), len(body))
            sizes = (0xFFFFFFFF, 0xFFFFFFFF)
        else:
            local_extra, sizes = b"", (len(body), len(m.data))
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if m.zip64 else 20, m.flags, m.method, 0, 0, crc,
                           sizes[0], sizes[1], len(local_raw), len(local_extra))  # fmt: skip
        out += local_raw + local_extra + body
        if m.central_extra is not None:
            extra, c_sizes, c_off = m.central_extra, (0xFFFFFFFF, 0xFFFFFFFF), 0xFFFFFFFF
        elif m.zip64:
            extra = struct.pack("<HHQQQ", 1, 24, len(m.data), len(body), offset)
            c_sizes, c_off = (0xFFFFFFFF, 0xFFFFFFFF), 0xFFFFFFFF
        else:
            extra, c_sizes, c_off = b"", (len(body), len(m.data)), offset
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45 if m.zip64 else 20, m.flags, m.method,
                               0, 0, crc, c_sizes[0], c_sizes[1], len(raw), len(extra), 0, 0, 0, 0, c_off)  # fmt: skip
        central += raw + extra
    start = len(out)
    out += central
    if eocd64:
        where = len(out)
        out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, len(members), len(members), len(central), start)
        out += struct.pack("<IIQI", 0x07064B50, 0, where, 1)
        out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, len(comment))
    else:
        out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), start, len(comment))
    return bytes(out + comment)


def torch_members(folder: str = "archive", pkl: bytes | None = None) -> list[Member]:
    members = [Member(f"{folder}/data.pkl", pkl if pkl is not None else state_pickle())]
    members.append(Member(f"{folder}/byteorder", b"little"))
    members += [Member(f"{folder}/data/{i}", raw) for i, (*_, raw) in enumerate(TENSORS.values())]
    members.append(Member(f"{folder}/version", b"3\n"))
    return members


def safetensors_bytes(
    entries: list[tuple[str, str, list[int], int, int]] | None = None,
    data: bytes | None = None,
    header_json: bytes | None = None,
    pad: bytes = b"",
    length_delta: int = 0,
) -> bytes:
    """entries: (name, code, shape, begin, end). Default: the TENSORS back to back."""
    if entries is None:
        entries, pos = [], 0
        for name, (_, code, _, shape, raw) in TENSORS.items():
            entries.append((name, code, list(shape), pos, pos + len(raw)))
            pos += len(raw)
    if data is None:
        data = b"".join(raw for *_, raw in TENSORS.values())
    if header_json is None:
        header_json = json.dumps(
            {n: {"dtype": c, "shape": s, "data_offsets": [b, e]} for n, c, s, b, e in entries}
        ).encode()
    header = header_json + pad
    return struct.pack("<Q", len(header) + length_delta) + header + data


def legacy_bytes(trailing: bytes = b"", counts: dict[int, int] | None = None, cut: int | None = None,
                 keys: list[str] | None = None) -> bytes:
    """A pre-1.6 torch.save file written opcode by opcode: magic, protocol 1001, sys_info, the
    state dict, the key list, then per storage an int64 element count and its bytes."""
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 8}}
    out = pickle.dumps(LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2) + pickle.dumps(sys_info, protocol=2)
    out += state_pickle(legacy=True)
    storage_keys = [str(i) for i in range(len(TENSORS))] if keys is None else keys
    out += pickle.dumps(storage_keys, protocol=2)
    for i, (*_, dtype, _shape, raw) in enumerate(TENSORS.values()):
        count = len(raw) // _itemsize(dtype)
        out += struct.pack("<q", (counts or {}).get(i, count)) + raw
    out += trailing
    return out if cut is None else out[:cut]


# ================================================================================================
# The variants
# ================================================================================================
Builder = Callable[[Path], Path]
VARIANTS: dict[str, tuple[str, str, Builder, bool]] = {}


def variant(name: str, family: str, loader: str, payload_free: bool = True):
    def register(fn: Builder) -> Builder:
        VARIANTS[name] = (family, loader, fn, payload_free)
        return fn

    return register


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- safetensors -----------------------------------------------------------------------------------
def _st_layout(shift: dict[int, int], data_len_extra: int = 0) -> tuple[list, bytes]:
    """Entries with byte gaps: shift[i] = gap before tensor i."""
    entries, data, pos = [], b"", 0
    for i, (name, (_, code, _, shape, raw)) in enumerate(TENSORS.items()):
        gap = shift.get(i, 0)
        data += b"\xee" * gap
        pos += gap
        entries.append((name, code, list(shape), pos, pos + len(raw)))
        data += raw
        pos += len(raw)
    return entries, data + b"\xee" * data_len_extra


for _n, _fn in {
    "st-base": lambda d: _write(d / "m.safetensors", safetensors_bytes()),
    "st-gap-before-first": lambda d: _write(d / "m.safetensors", safetensors_bytes(*_st_layout({0: 8}))),
    "st-gap-between": lambda d: _write(d / "m.safetensors", safetensors_bytes(*_st_layout({1: 4}))),
    "st-trailing-bytes": lambda d: _write(d / "m.safetensors", safetensors_bytes(*_st_layout({}, 16))),
    "st-trailing-one-byte": lambda d: _write(d / "m.safetensors", safetensors_bytes(*_st_layout({}, 1))),
    "st-header-padding-spaces": lambda d: _write(d / "m.safetensors", safetensors_bytes(pad=b" " * 13)),
    "st-header-padding-newline": lambda d: _write(d / "m.safetensors", safetensors_bytes(pad=b"\n\t ")),
    "st-header-padding-nul": lambda d: _write(d / "m.safetensors", safetensors_bytes(pad=b"\x00" * 3)),
    "st-header-length-short": lambda d: _write(d / "m.safetensors", safetensors_bytes(length_delta=-1)),
    "st-header-length-long": lambda d: _write(d / "m.safetensors", safetensors_bytes(length_delta=8)),
}.items():
    variant(_n, "safetensors", "safetensors")(_fn)


@variant("st-overlap", "safetensors", "safetensors")
def _(d: Path) -> Path:
    entries, data = _st_layout({})
    name, code, shape, b, e = entries[2]  # c.half (6 bytes) moved into b.bias
    entries[2] = (name, code, shape, b - 6, e - 6)
    return _write(d / "m.safetensors", safetensors_bytes(entries, data[:-6]))


@variant("st-alias-same-range", "safetensors", "safetensors")
def _(d: Path) -> Path:
    entries, data = _st_layout({})
    entries.append(("a.alias", "F32", [2, 3], entries[0][3], entries[0][4]))
    return _write(d / "m.safetensors", safetensors_bytes(entries, data))


@variant("st-duplicate-key", "safetensors", "safetensors")
def _(d: Path) -> Path:
    entries, data = _st_layout({})
    parts = [f'"{n}": {{"dtype": "{c}", "shape": {s}, "data_offsets": [{b}, {e}]}}' for n, c, s, b, e in entries]
    # the same name again, pointing at c.half's bytes: readers that keep the last copy differ
    # from those that keep the first
    n0, *_ = entries[0]
    parts.append(f'"{n0}": {{"dtype": "F16", "shape": [3], "data_offsets": [{entries[2][3]}, {entries[2][4]}]}}')
    return _write(d / "m.safetensors", safetensors_bytes(header_json=("{" + ", ".join(parts) + "}").encode(), data=data))


@variant("st-duplicate-metadata", "safetensors", "safetensors")
def _(d: Path) -> Path:
    entries, data = _st_layout({})
    body = json.dumps({n: {"dtype": c, "shape": s, "data_offsets": [b, e]} for n, c, s, b, e in entries})
    text = '{"__metadata__": {"format": "pt"}, "__metadata__": {"format": "np"}, ' + body[1:]
    return _write(d / "m.safetensors", safetensors_bytes(header_json=text.encode(), data=data))


@variant("st-zero-size-in-gap", "safetensors", "safetensors")
def _(d: Path) -> Path:
    entries, data = _st_layout({})
    entries.append(("empty", "F32", [0], 4, 4))  # inside a.weight's range
    return _write(d / "m.safetensors", safetensors_bytes(entries, data))


@variant("st-zero-size-past-end", "safetensors", "safetensors")
def _(d: Path) -> Path:
    entries, data = _st_layout({})
    entries.append(("empty", "F32", [0], len(data), len(data)))
    return _write(d / "m.safetensors", safetensors_bytes(entries, data))


# -- torch zip -------------------------------------------------------------------------------------
def _zip(d: Path, members: list[Member], **kw) -> Path:
    return _write(d / "model.pt", zip_archive(members, **kw))


def _with(members: list[Member], suffix: str, **changes) -> list[Member]:
    for m in members:
        if m.name.endswith(suffix):
            for k, v in changes.items():
                setattr(m, k, v)
    return members


variant("zip-base", "zip", "torch")(lambda d: _zip(d, torch_members()))
variant("zip-other-folder-pickle", "zip", "torch")(
    lambda d: _zip(d, torch_members() + [Member("other/data.pkl", state_pickle(["a.weight"]))])
)
variant("zip-other-folder-file", "zip", "torch")(lambda d: _zip(d, torch_members() + [Member("notes/readme.txt", b"hi")]))
variant("zip-root-member", "zip", "torch")(lambda d: _zip(d, torch_members() + [Member("extra.pkl", state_pickle())]))
variant("zip-other-folder-first", "zip", "torch")(
    lambda d: _zip(d, [Member("zzz/data.pkl", state_pickle(["b.bias"]))] + torch_members())
)
for _bit, _label in ((0, "encrypted"), (5, "patched"), (6, "strong-encryption"), (3, "data-descriptor"), (11, "utf8")):
    variant(f"zip-flag-{_label}-pkl", "zip", "torch")(
        lambda d, b=_bit: _zip(d, _with(torch_members(), "data.pkl", flags=1 << b))
    )
    variant(f"zip-flag-{_label}-storage", "zip", "torch")(
        lambda d, b=_bit: _zip(d, _with(torch_members(), "data/1", flags=1 << b))
    )
variant("zip-local-name-differs-pkl", "zip", "torch")(
    lambda d: _zip(d, _with(torch_members(), "data.pkl", local_name="archive/data.pkX"))
)
variant("zip-local-name-differs-storage", "zip", "torch")(
    lambda d: _zip(d, _with(torch_members(), "data/0", local_name="archive/data/9"))
)
variant("zip-crc-mismatch-pkl", "zip", "torch")(lambda d: _zip(d, _with(torch_members(), "data.pkl", crc=0x12345678)))
variant("zip-crc-mismatch-storage", "zip", "torch")(lambda d: _zip(d, _with(torch_members(), "data/0", crc=0x12345678)))
variant("zip-crc-mismatch-version", "zip", "torch")(lambda d: _zip(d, _with(torch_members(), "version", crc=1)))
variant("zip-prepended-bytes", "zip", "torch")(lambda d: _zip(d, torch_members(), prefix=b"\x00" * 64))
variant("zip-prepended-pk", "zip", "torch")(lambda d: _zip(d, torch_members(), prefix=b"PK\x03\x04" + b"\x00" * 60))
variant("zip-zip64-all", "zip", "torch")(lambda d: _zip(d, [Member(m.name, m.data, zip64=True) for m in torch_members()]))
variant("zip-zip64-eocd", "zip", "torch")(lambda d: _zip(d, torch_members(), eocd64=True))
variant("zip-zip64-extra-truncated", "zip", "torch")(
    lambda d: _zip(d, _with(torch_members(), "data/0", central_extra=struct.pack("<HHQ", 1, 8, 24)))
)
variant("zip-zip64-extra-past-end", "zip", "torch")(
    lambda d: _zip(d, _with(torch_members(), "data/0", central_extra=struct.pack("<HH", 1, 200)))
)
variant("zip-deflated-storage", "zip", "torch")(lambda d: _zip(d, _with(torch_members(), "data/0", method=8)))
variant("zip-comment", "zip", "torch")(lambda d: _zip(d, torch_members(), comment=b"hello"))


@variant("zip-duplicate-storage", "zip", "torch")
def _(d: Path) -> Path:
    members = torch_members()
    other = struct.pack("<6f", 9, 9, 9, 9, 9, 9)
    return _zip(d, members[:2] + [Member("archive/data/0", other)] + members[2:])


@variant("zip-duplicate-pkl", "zip", "torch")
def _(d: Path) -> Path:
    members = torch_members()
    return _zip(d, [Member("archive/data.pkl", state_pickle(["a.weight"]))] + members)


@variant("zip-duplicate-pkl-last", "zip", "torch")
def _(d: Path) -> Path:
    return _zip(d, torch_members() + [Member("archive/data.pkl", state_pickle(["a.weight"]))])


@variant("zip-cd-name-differs-only-case", "zip", "torch")
def _(d: Path) -> Path:
    return _zip(d, _with(torch_members(), "byteorder", local_name="archive/BYTEORDER"))


# -- legacy ----------------------------------------------------------------------------------------
variant("legacy-base", "legacy", "torch")(lambda d: _write(d / "legacy.pt", legacy_bytes()))
variant("legacy-trailing", "legacy", "torch")(lambda d: _write(d / "legacy.pt", legacy_bytes(b"\x00" * 40)))
variant("legacy-trailing-pickle", "legacy", "torch")(
    lambda d: _write(d / "legacy.pt", legacy_bytes(pickle.dumps({"x": 1}, protocol=2)))
)
variant("legacy-count-larger", "legacy", "torch")(lambda d: _write(d / "legacy.pt", legacy_bytes(counts={1: 5})))
variant("legacy-count-smaller", "legacy", "torch")(lambda d: _write(d / "legacy.pt", legacy_bytes(counts={0: 5})))
variant("legacy-count-negative", "legacy", "torch")(lambda d: _write(d / "legacy.pt", legacy_bytes(counts={2: -1})))
variant("legacy-count-larger-last", "legacy", "torch")(lambda d: _write(d / "legacy.pt", legacy_bytes(counts={2: 4})))
variant("legacy-cut-in-storage", "legacy", "torch")(lambda d: _write(d / "legacy.pt", legacy_bytes(cut=-5)))
variant("legacy-missing-key", "legacy", "torch")(lambda d: _write(d / "legacy.pt", legacy_bytes(keys=["0", "1"])))
variant("legacy-extra-key", "legacy", "torch")(lambda d: _write(d / "legacy.pt", legacy_bytes(keys=["0", "1", "2", "3"])))


# -- DCP -------------------------------------------------------------------------------------------
def _dcp(d: Path, edit: Callable[[bytes], bytes] | None = None, meta: Callable[[bytes], bytes] | None = None) -> Path:
    out = d / "dcp"
    shutil.copytree(DCP_SAMPLE, out)
    if edit is not None:
        f = out / "__0_0.distcp"
        f.write_bytes(edit(f.read_bytes()))
    if meta is not None:
        f = out / ".metadata"
        f.write_bytes(meta(f.read_bytes()))
    return out


def _nested_zip_extra(data: bytes) -> bytes:
    """The first nested archive's first directory entry gets a zip64 extra whose data runs past
    the end of the file (sizes read as 0xFFFFFFFF)."""
    cd = data.find(b"PK\x01\x02")
    if cd < 0:
        return data
    buf = bytearray(data)
    struct.pack_into("<II", buf, cd + 20, 0xFFFFFFFF, 0xFFFFFFFF)
    return bytes(buf)


variant("dcp-base", "dcp", "dcp")(lambda d: _dcp(d))
variant("dcp-truncated-distcp", "dcp", "dcp")(lambda d: _dcp(d, lambda b: b[: len(b) // 2]))
variant("dcp-distcp-trailing", "dcp", "dcp")(lambda d: _dcp(d, lambda b: b + b"\x00" * 100))
variant("dcp-nested-zip64-sizes", "dcp", "dcp")(lambda d: _dcp(d, _nested_zip_extra))


@variant("dcp-nested-zip64-extra-at-end", "dcp", "dcp")
def _(d: Path) -> Path:
    """A nested archive's central entry whose extra field claims to run past the end of the
    .distcp file (the struct.error spelling): the extra length is patched large."""

    def edit(data: bytes) -> bytes:
        last = data.rfind(b"PK\x01\x02")
        if last < 0:
            return data
        buf = bytearray(data)
        struct.pack_into("<II", buf, last + 20, 0xFFFFFFFF, 0xFFFFFFFF)
        struct.pack_into("<H", buf, last + 30, 0xFFF0)  # extra length
        nlen = struct.unpack_from("<H", buf, last + 28)[0]
        cut = last + 46 + nlen + 6  # tag and size present, then the file ends
        buf[last + 46 + nlen : last + 46 + nlen + 4] = struct.pack("<HH", 1, 0xFFE0)
        return bytes(buf[:cut])

    return _dcp(d, edit)


# ================================================================================================
# Running: build, ask the reference, ask mscope, judge
# ================================================================================================
def build(directory: Path, names: list[str] | None = None) -> list[Variant]:
    out = []
    for name in names or list(VARIANTS):
        family, loader, fn, payload_free = VARIANTS[name]
        where = directory / name
        where.mkdir(parents=True, exist_ok=True)
        out.append(Variant(name, family, fn(where), loader, payload_free))
    return out


REFERENCE_SCRIPT = r"""
import hashlib, json, sys, warnings
warnings.filterwarnings("ignore")
import torch

def digest(t):
    t = t.detach().contiguous()
    raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return hashlib.sha256(raw).hexdigest()[:16]

def flat(obj, prefix=""):
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat(v, f"{prefix}{k}."))
    elif isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = {"shape": list(obj.shape), "dtype": str(obj.dtype).replace("torch.", ""), "digest": digest(obj)}
    return out

def load(kind, path):
    if kind == "torch":
        return flat(torch.load(path, weights_only=True, map_location="cpu"))
    if kind == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(path, "pt") as f:
            names = list(f.keys())
            first = {n: f.get_tensor(n) for n in names}
        loaded = load_file(path)
        assert sorted(loaded) == sorted(first), "safe_open and load_file list different tensors"
        return flat(loaded)
    if kind == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
        return flat(_load_state_dict_from_keys(checkpoint_id=path))
    raise ValueError(kind)

for line in sys.stdin:
    kind, path = json.loads(line)
    try:
        result = {"ok": True, "tensors": load(kind, path)}
    except BaseException as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
    print(json.dumps(result), flush=True)
"""


def reference(variants: list[Variant], timeout: float = 300) -> dict[str, dict]:
    """One subprocess asks the reference loader about every payload-free variant."""
    todo = [v for v in variants if v.payload_free]
    if not todo:
        return {}
    stdin = "".join(json.dumps([v.loader, str(v.path)]) + "\n" for v in todo)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", REFERENCE_SCRIPT], input=stdin, capture_output=True, text=True, timeout=timeout, env=env
    )
    lines = proc.stdout.splitlines()
    if len(lines) != len(todo):
        raise RuntimeError(f"reference loader answered {len(lines)} of {len(todo)}: {proc.stderr[-2000:]}")
    return {v.name: json.loads(line) for v, line in zip(todo, lines)}


def mscope(path: Path) -> dict:
    """What mscope says: the audit's findings, and (when it opens) every tensor as the reference
    describes it."""
    import numpy as np

    from modelscope_tui.audit.findings import ERROR
    from modelscope_tui.audit.runner import audit_path
    from modelscope_tui.errors import MscopeError
    from modelscope_tui.readers import open_checkpoint
    from modelscope_tui.values.data import TensorData, unreadable_records

    try:
        report = audit_path(path)
    except MscopeError as exc:
        return {"refused": exc.message, "errors": [], "tensors": None}
    errors = [f"{f.code}: {f.message}" for f in report.findings if f.severity == ERROR]
    flagged = sorted({f.tensor for f in report.findings if f.tensor and f.severity != "info"})
    out: dict = {"refused": None, "errors": errors, "verdict": report.verdict_line(), "tensors": None, "flagged": flagged,
                 "codes": sorted({f.code for f in report.findings})}
    try:
        ckpt = open_checkpoint(path, strict=False)
    except MscopeError as exc:
        out["refused"] = exc.message
        return out
    bad = unreadable_records(ckpt)
    tensors = {}
    with TensorData() as data:
        for t in ckpt.tensors:
            entry = {"shape": list(t.shape), "dtype": t.dtype, "digest": None}
            if id(t) not in bad and t.storage is not None and t.numel:
                try:
                    raw = data.storage_bytes(t)
                    arr = np.frombuffer(raw, dtype=np.dtype(f"V{t.itemsize}"))
                    view = np.lib.stride_tricks.as_strided(
                        arr[t.storage_offset :], shape=t.shape, strides=[s * t.itemsize for s in t.stride]
                    )
                    entry["digest"] = digest(np.ascontiguousarray(view).tobytes())
                except (MscopeError, ValueError) as exc:
                    entry["digest"] = f"unreadable: {exc}"
            elif t.numel == 0:
                entry["digest"] = digest(b"")
            if t.section:
                full = f"{t.section}.{t.name}"
            else:
                full = f"{ckpt.model_path}.{t.name}" if ckpt.model_path else t.name
            entry["qualified"] = t.qualified_name
            tensors[full] = entry
    out["tensors"] = tensors
    return out


@dataclass
class Verdict:
    name: str
    agree: bool
    how: str  # "both load, same tensors" | "both refuse" | "mscope stricter: ..." | the disagreement
    ref: dict = field(default_factory=dict)
    ms: dict = field(default_factory=dict)


def judge(v: Variant, ref: dict | None, ms: dict) -> Verdict:
    def verdict(agree: bool, how: str) -> Verdict:
        return Verdict(v.name, agree, how, ref or {}, ms)

    says_no = ms["refused"] or ms["errors"]
    reason = ms["refused"] or (ms["errors"][0] if ms["errors"] else "")
    if ref is None:  # payload variants: never loaded by the reference
        return verdict(bool(says_no), f"not loaded by the reference; mscope: {reason or 'no error'}")
    if not ref["ok"]:
        if says_no:
            return verdict(True, f"both refuse; reference: {ref['error']}; mscope: {reason}")
        if "Weights only load failed" in ref["error"] and "unsafe-global" in ms.get("codes", ()):
            # the pickle names a global outside the allowlist: the unsafe-global finding is the
            # documented "torch.load(weights_only=True) rejects" warning (issue #12 s6 keeps it one)
            return verdict(True, "weights_only refuses; mscope: unsafe-global says so")
        return verdict(False, f"reference refuses ({ref['error']}) but mscope says {ms.get('verdict')!r}")
    if says_no:
        return verdict(True, f"mscope stricter: {reason}")
    mine = ms["tensors"] or {}
    theirs = ref["tensors"]
    differ = []
    for name in sorted(set(mine) | set(theirs)):
        a, b = mine.get(name), theirs.get(name)
        if a is None or b is None:
            differ.append(f"{name}: only {'mscope' if b is None else 'the reference'} has it")
            continue
        if [a["shape"], a["dtype"]] != [b["shape"], b["dtype"]]:
            differ.append(f"{name}: {a['shape']} {a['dtype']} vs {b['shape']} {b['dtype']}")
        elif a["digest"] != b["digest"]:
            if a["digest"] is None and a["qualified"] in ms["flagged"]:
                continue  # mscope does not read these values, and a finding says so
            differ.append(f"{name}: values differ ({a['digest']} vs {b['digest']})")
    if differ:
        return verdict(False, "both load but read differently: " + "; ".join(differ[:5]))
    return verdict(True, "both load, same tensors" + (f" (mscope flags {ms['flagged'][:3]})" if ms["flagged"] else ""))


def run(directory: Path, names: list[str] | None = None) -> list[Verdict]:
    variants = build(directory, names)
    refs = reference(variants)
    return [judge(v, refs.get(v.name), mscope(v.path)) for v in variants]


# ================================================================================================
# Random mutations for the long fuzzer
# ================================================================================================
def random_variant(rng: random.Random, directory: Path) -> Variant:
    """A registered variant with a few random byte-level edits on top (header region weighted):
    payload-free by construction, so the reference may load it."""
    name = rng.choice(list(VARIANTS))
    family, loader, fn, _ = VARIANTS[name]
    where = directory / f"{name}-mut"
    if where.exists():
        shutil.rmtree(where)
    where.mkdir(parents=True)
    path = fn(where)
    target = path / "__0_0.distcp" if path.is_dir() else path
    data = bytearray(target.read_bytes())
    ops = []
    for _ in range(rng.randint(1, 3)):
        if not data:
            break
        kind = rng.choices(["flip", "byte", "cut", "append", "zero"], [40, 35, 5, 10, 10])[0]
        pos = rng.randrange(len(data)) if rng.random() < 0.5 else rng.randrange(min(len(data), 256))
        if kind == "flip":
            data[pos] ^= 1 << rng.randrange(8)
        elif kind == "byte":
            data[pos] = rng.randrange(256)
        elif kind == "cut":
            del data[pos:]
        elif kind == "append":
            data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            data[pos : pos + 4] = b"\x00" * len(data[pos : pos + 4])
        ops.append(f"{kind}@{pos}")
    target.write_bytes(bytes(data))
    return Variant(f"{name}+{'+'.join(ops)}", family, path, loader, True)


def run_random(n: int, seed: int, directory: Path) -> list[Verdict]:
    """n random mutations, one reference subprocess for all: the disagreements are the verdicts
    with agree=False. Each case gets its own folder under `directory` (kept for replay)."""
    rng = random.Random(seed)
    variants = []
    for i in range(n):
        where = directory / f"{i:05d}"
        where.mkdir(parents=True, exist_ok=True)
        variants.append(random_variant(rng, where))
    refs = reference(variants)
    return [judge(v, refs.get(v.name), mscope(v.path)) for v in variants]


if __name__ == "__main__":  # python -m tests.hostile.differential [OUT_DIR]: print every verdict
    import tempfile

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="mscope-diff-"))
    for r in run(out):
        print(("ok   " if r.agree else "DIFF ") + f"{r.name}: {r.how}"[:400])
