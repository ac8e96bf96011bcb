"""Mutation fuzzing of valid checkpoints: the engine shared by tests/test_fuzz.py (hypothesis, fast)
and bench/fuzz_long.py (random, long, counts everything).

A `Seed` is a valid checkpoint from sample_models/ (a file, or a directory with one target file
inside). A mutation is a list of plain tuples, so any failure prints as a reproducer:

    ("flip", pos, bit)          xor one bit
    ("set", pos, data)          overwrite bytes
    ("insert", pos, data)       insert bytes
    ("delete", pos, n)          delete bytes
    ("truncate", n)             keep the first n bytes
    ("splice", pos, seed, src, n)  overwrite with bytes of another seed (other formats too)
    ("number", site, value)     write an interesting value into a header number: a zip directory
                                field, a pickle operand (lengths, memo indices, ints), a legacy
                                storage count, the safetensors header length or a JSON number
    ("fixcrc",)                 recompute every stored zip member's CRC-32, so damage inside
                                data.pkl reaches the unpickler instead of the CRC check

Positions are taken modulo the data's length. `exercise(path)` is the property: open it strictly and
leniently, read every tensor through TensorData; only MscopeError subclasses may escape.
"""

from __future__ import annotations

import json
import pickle
import pickletools
import re
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent.parent / "sample_models"
COPY_LIMIT = 64 << 20  # read tensors up to this size as copies too (views for the rest)


@dataclass
class Seed:
    name: str
    data: bytes  # the bytes mutated
    target: str  # where they go, relative to the case directory
    opens: str  # what to open, relative to the case directory
    others: dict[str, bytes] = field(default_factory=dict)  # the rest of a directory checkpoint
    sites: list[tuple[int, int, str]] = field(default_factory=list)  # (offset, width, encoding)

    def materialize(self, data: bytes, directory: Path) -> Path:
        """Write the checkpoint (with `data` as its target) under the empty `directory`."""
        for rel, blob in self.others.items():
            (directory / rel).parent.mkdir(parents=True, exist_ok=True)
            (directory / rel).write_bytes(blob)
        (directory / self.target).parent.mkdir(parents=True, exist_ok=True)
        (directory / self.target).write_bytes(data)
        return directory / self.opens


def _file_seed(name: str, sample: str) -> Seed:
    data = (SAMPLES / sample).read_bytes()
    sites = number_sites(data)
    if data[2:4] == b"\x8a\x0a":  # legacy
        sites += legacy_count_sites(SAMPLES / sample)
    return Seed(name, data, sample, sample, sites=sites)


def _dir_seed(name: str, sample: str, target: str, opens: str = "") -> Seed:
    root = SAMPLES / sample
    others = {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and str(p.relative_to(root)) != target
    }
    data = (root / target).read_bytes()
    return Seed(name, data, target, opens or ".", others, number_sites(data))


def _plain_pickle() -> Seed:
    obj = {"epoch": 3, "lr": 0.1, "names": ["a", "b"], "hist": [0.5, 0.25], "cfg": {"k": (1, 2)}}
    data = pickle.dumps(obj, protocol=2)
    return Seed("plain-pickle", data, "obj.pkl", "obj.pkl", sites=number_sites(data))


def seeds() -> list[Seed]:
    """Every reader's input, small enough that each case takes milliseconds."""
    return [
        _file_seed("zip-state-dict", "cnn_state_dict.pt"),
        _file_seed("zip-training", "train_checkpoint.pt"),
        _file_seed("zip-full-module", "notebook_full.pt"),
        _file_seed("zip-dtypes", "dtypes.pt"),
        _file_seed("lightning", "lightning.ckpt"),
        _file_seed("legacy", "legacy_train_checkpoint.pt"),
        _file_seed("torchscript", "scripted_cnn.pt"),
        _file_seed("safetensors", "transformer.safetensors"),
        _plain_pickle(),
        _dir_seed("dcp-metadata", "dcp_checkpoint", ".metadata"),
        _dir_seed("dcp-distcp", "dcp_checkpoint", "__0_0.distcp"),
        _dir_seed("sharded-index", "sharded_hf", "model.safetensors.index.json"),
        _dir_seed("sharded-bin-shard", "sharded_bin", "pytorch_model-00001-of-00002.bin"),
    ]


# ----------------------------------------------------------------------------------------------
# Where the numbers are
# ----------------------------------------------------------------------------------------------
_PICKLE_NUMBERS = {
    "BININT": "<i", "BININT1": "<B", "BININT2": "<H", "BINPUT": "<B", "BINGET": "<B",
    "LONG_BINPUT": "<I", "LONG_BINGET": "<I", "BINUNICODE": "<I", "SHORT_BINUNICODE": "<B",
    "BINUNICODE8": "<Q", "BINBYTES": "<I", "SHORT_BINBYTES": "<B", "BINBYTES8": "<Q",
    "BYTEARRAY8": "<Q", "BINSTRING": "<i", "SHORT_BINSTRING": "<B", "LONG1": "<B", "LONG4": "<i",
    "FRAME": "<Q", "PROTO": "<B",
}  # fmt: skip


def number_sites(data: bytes) -> list[tuple[int, int, str]]:
    """(offset, width, struct format or 'json') of every number worth corrupting."""
    sites: list[tuple[int, int, str]] = []
    if data[:4] == b"PK\x03\x04":
        sites += _zip_sites(data)
    elif len(data) > 8 and data[8:9] == b"{":
        sites.append((0, 8, "<Q"))
        (length,) = struct.unpack_from("<Q", data)
        sites += [
            (8 + m.start(), m.end() - m.start(), "json")
            for m in re.finditer(rb"\d+", data[8 : 8 + length])
        ]
    elif data[:1] == b"{":
        sites += [(m.start(), m.end() - m.start(), "json") for m in re.finditer(rb"\d+", data)]
    elif data[:1] == b"\x80":
        pos = 0
        for _ in range(5):  # a legacy file is five pickles, then int64 counts and storages
            sites += _pickle_sites(data, pos)
            try:
                pos = _pickle_end(data, pos)
            except Exception:
                break
    return sites


def _pickle_end(data: bytes, start: int) -> int:
    from modelscope_tui.readers.pickle.scan import scan_pickle

    return scan_pickle(data, start)


def _pickle_sites(data: bytes, start: int = 0) -> list[tuple[int, int, str]]:
    try:
        end = _pickle_end(data, start)
        ops = list(pickletools.genops(data[start:end]))
    except Exception:
        return []
    out = []
    for op, _, pos in ops:
        fmt = _PICKLE_NUMBERS.get(op.name)
        if fmt is not None:
            out.append((start + pos + 1, struct.calcsize(fmt), fmt))
    return out


def legacy_count_sites(path: Path) -> list[tuple[int, int, str]]:
    """The int64 element count in front of each storage of a legacy file."""
    from modelscope_tui.readers import open_checkpoint

    ckpt = open_checkpoint(path, strict=False)
    offsets = {t.storage.data_offset for t in ckpt.tensors if t.storage and t.storage.data_offset}
    return [(o - 8, 8, "<q") for o in sorted(offsets)]


_CENTRAL_FIELDS = (
    (10, 2, "<H"),
    (16, 4, "<I"),
    (20, 4, "<I"),
    (24, 4, "<I"),
    (28, 2, "<H"),
    (30, 2, "<H"),
    (42, 4, "<I"),
)  # method, crc, sizes, name/extra lengths, offset
_LOCAL_FIELDS = ((8, 2, "<H"), (14, 4, "<I"), (18, 4, "<I"), (22, 4, "<I"), (26, 2, "<H"),
                 (28, 2, "<H"))  # fmt: skip


def _zip_sites(data: bytes) -> list[tuple[int, int, str]]:
    sites: list[tuple[int, int, str]] = []
    eocd = data.rfind(b"PK\x05\x06")
    if eocd < 0:
        return sites
    sites += [
        (eocd + at, w, f)
        for at, w, f in ((8, 2, "<H"), (10, 2, "<H"), (12, 4, "<I"), (16, 4, "<I"))
    ]
    _, _, _, _, count, _, pos, _ = struct.unpack_from("<4s4H2LH", data, eocd)
    z64 = data.rfind(b"PK\x06\x06")
    if z64 >= 0:
        sites += [(z64 + at, 8, "<Q") for at in (24, 32, 40, 48)]
        count, pos = (
            struct.unpack_from("<Q", data, z64 + 32)[0],
            struct.unpack_from("<Q", data, z64 + 48)[0],
        )
        loc = data.rfind(b"PK\x06\x07")
        if loc >= 0:
            sites.append((loc + 8, 8, "<Q"))
    for _ in range(count):
        if data[pos : pos + 4] != b"PK\x01\x02":
            break
        sites += [(pos + at, w, f) for at, w, f in _CENTRAL_FIELDS]
        (method,) = struct.unpack_from("<H", data, pos + 10)
        (size,) = struct.unpack_from("<I", data, pos + 24)
        nlen, xlen, clen = struct.unpack_from("<3H", data, pos + 28)
        name = data[pos + 46 : pos + 46 + nlen]
        sites += [(pos + 46 + nlen + 4 + 8 * i, 8, "<Q") for i in range(max(0, xlen - 4) // 8)]
        (local,) = struct.unpack_from("<I", data, pos + 42)
        if data[local : local + 4] == b"PK\x03\x04":
            sites += [(local + at, w, f) for at, w, f in _LOCAL_FIELDS]
            lnlen, lxlen = struct.unpack_from("<2H", data, local + 26)
            start = local + 30 + lnlen + lxlen
            if name.endswith(b".pkl") and method == 0:
                sites += [
                    (start + o, w, f) for o, w, f in _pickle_sites(data[start : start + size])
                ]
        pos += 46 + nlen + xlen + clen
    return sites


# ----------------------------------------------------------------------------------------------
# Applying a mutation
# ----------------------------------------------------------------------------------------------
INTERESTING = (
    0, 1, 2, 3, 4, 7, 8, 16, 46, 64, 127, 128, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
    0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 40, 1 << 62, (1 << 63) - 1, 1 << 63,
    (1 << 64) - 1, -1, -2,
)  # fmt: skip


def apply(seed: Seed, ops: list[tuple], pool: list[Seed]) -> bytes:
    """`seed.data` with `ops` applied in order (each one tolerant of whatever came before)."""
    data = bytearray(seed.data)
    for op in ops:
        kind = op[0]
        n = len(data)
        if kind == "flip" and n:
            data[op[1] % n] ^= 1 << (op[2] % 8)
        elif kind == "set" and n:
            pos = op[1] % n
            data[pos : pos + len(op[2])] = op[2]
        elif kind == "insert":
            pos = op[1] % (n + 1)
            data[pos:pos] = op[2]
        elif kind == "delete" and n:
            pos = op[1] % n
            del data[pos : pos + op[2]]
        elif kind == "truncate":
            del data[op[1] % (n + 1) :]
        elif kind == "splice" and n:
            other = pool[op[2] % len(pool)].data
            src = op[3] % len(other)
            pos = op[1] % n
            data[pos : pos + op[4]] = other[src : src + op[4]]
        elif kind == "number" and seed.sites:
            _write_number(data, seed.sites[op[1] % len(seed.sites)], op[2])
        elif kind == "fixcrc":
            _fix_crcs(data)
    return bytes(data)


def _write_number(data: bytearray, site: tuple[int, int, str], value: int) -> None:
    offset, width, fmt = site
    if offset + width > len(data):
        return
    if fmt == "json":
        text = str(value).encode()
        data[offset : offset + width] = text
        if data[8:9] == b"{":  # a safetensors header: keep its length prefix honest
            (length,) = struct.unpack_from("<Q", data)
            struct.pack_into("<Q", data, 0, min((1 << 64) - 1, max(0, length + len(text) - width)))
        return
    data[offset : offset + width] = (value % (1 << (8 * width))).to_bytes(width, "little")


def _fix_crcs(data: bytearray) -> None:
    """Recompute the CRC-32 of every stored member in the directory and local headers."""
    try:
        eocd = data.rfind(b"PK\x05\x06")
        _, _, _, _, count, _, pos, _ = struct.unpack_from("<4s4H2LH", data, eocd)
        z64 = data.rfind(b"PK\x06\x06")
        if z64 >= 0:
            count, pos = (
                struct.unpack_from("<Q", data, z64 + 32)[0],
                struct.unpack_from("<Q", data, z64 + 48)[0],
            )
        for _ in range(min(count, 100_000)):
            if data[pos : pos + 4] != b"PK\x01\x02":
                return
            (method,) = struct.unpack_from("<H", data, pos + 10)
            (csize,) = struct.unpack_from("<I", data, pos + 20)
            nlen, xlen, clen = struct.unpack_from("<3H", data, pos + 28)
            (local,) = struct.unpack_from("<I", data, pos + 42)
            if method == 0 and data[local : local + 4] == b"PK\x03\x04":
                lnlen, lxlen = struct.unpack_from("<2H", data, local + 26)
                start = local + 30 + lnlen + lxlen
                crc = zlib.crc32(data[start : start + csize]) & 0xFFFFFFFF
                struct.pack_into("<I", data, pos + 16, crc)
                struct.pack_into("<I", data, local + 14, crc)
            pos += 46 + nlen + xlen + clen
    except (struct.error, IndexError, ValueError, OverflowError):
        return


def random_ops(rng, seed: Seed, pool: list[Seed]) -> list[tuple]:
    """A random mutation (the long run's generator; tests/test_fuzz.py draws the same shapes)."""
    ops: list[tuple] = []
    n = max(1, len(seed.data))
    for _ in range(rng.choice((1, 1, 1, 2, 3, 5))):
        kind = rng.choice(
            (
                "flip",
                "flip",
                "set",
                "insert",
                "delete",
                "truncate",
                "splice",
                "number",
                "number",
                "number",
            )
        )
        if kind == "flip":
            ops.append(("flip", rng.randrange(n), rng.randrange(8)))
        elif kind == "set":
            ops.append(("set", rng.randrange(n), rng.randbytes(rng.choice((1, 2, 4, 8, 32)))))
        elif kind == "insert":
            ops.append(("insert", rng.randrange(n + 1), rng.randbytes(rng.choice((1, 2, 8, 64)))))
        elif kind == "delete":
            ops.append(("delete", rng.randrange(n), rng.choice((1, 2, 8, 64, 1024))))
        elif kind == "truncate":
            ops.append(("truncate", rng.randrange(n + 1)))
        elif kind == "splice":
            other = rng.randrange(len(pool))
            ops.append(
                (
                    "splice",
                    rng.randrange(n),
                    other,
                    rng.randrange(len(pool[other].data)),
                    rng.choice((4, 64, 512, 4096)),
                )
            )
        elif seed.sites:
            value = (
                rng.choice(INTERESTING)
                if rng.random() < 0.8
                else rng.randrange(-(1 << 16), 1 << 40)
            )
            if rng.random() < 0.2:
                value = n + rng.randrange(-2, 3)
            ops.append(("number", rng.randrange(len(seed.sites)), value))
    if rng.random() < 0.5:
        ops.append(("fixcrc",))
    return ops


# ----------------------------------------------------------------------------------------------
# The property
# ----------------------------------------------------------------------------------------------
def materialize_case(seed: Seed, ops: list[tuple], pool: list[Seed], directory: Path) -> Path:
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    return seed.materialize(apply(seed, ops, pool), directory)


def exercise(path: Path) -> str:
    """Open strictly and leniently, render the summary, read every tensor. Returns an outcome
    ('opened', 'partial', or the MscopeError's class name); anything else propagates."""
    import io

    from rich.console import Console

    from modelscope_tui.cli.summary import render_summary
    from modelscope_tui.errors import MscopeError
    from modelscope_tui.readers import open_checkpoint
    from modelscope_tui.summary import summary_dict
    from modelscope_tui.values.chunks import stats_supported
    from modelscope_tui.values.data import TensorData
    from modelscope_tui.values.stream import tensor_stats

    try:
        ckpt = open_checkpoint(path)
        outcome = "opened"
        json.dumps(summary_dict(ckpt))
        render_summary(ckpt, Console(file=io.StringIO(), width=100, highlight=False))
    except MscopeError as exc:
        assert "\n" not in str(exc), repr(str(exc))
        outcome = type(exc).__name__
    try:
        ckpt = open_checkpoint(path, strict=False)
    except MscopeError as exc:
        assert "\n" not in str(exc), repr(str(exc))
        return outcome
    with TensorData() as data:
        for record in ckpt.tensors:
            try:
                data.tensor(record, copy=False)
                if record.nbytes <= COPY_LIMIT:
                    data.tensor(record, copy=True)
            except MscopeError as exc:
                assert "\n" not in str(exc), repr(str(exc))
                if outcome == "opened":
                    outcome = "partial"
            # Statistics even where torch's view failed: the compiled kernel reads raw addresses,
            # so its own bounds checks must hold on every mutated record.
            if record.nbytes <= COPY_LIMIT and stats_supported(record.dtype):
                try:
                    tensor_stats(data, record)
                except MscopeError as exc:
                    assert "\n" not in str(exc), repr(str(exc))
    return outcome
