"""Broken, truncated and hostile files: one clear line, exit 2, fast, and no big allocation.

Every case checks both faces: `open_checkpoint` raises an `MscopeError` subclass (never anything
else), and `mscope summary FILE` exits 2 with exactly one stderr line that names the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import signal
import struct
import time
import tracemalloc
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from conftest import SAMPLES, CliResult, run_cli, small_state_dict
from modelscope_tui.cli import main as cli_main
from modelscope_tui.errors import (
    CorruptCheckpointError,
    MscopeError,
    NotFoundError,
    UnsafePickleError,
    UnsupportedFormatError,
)
from modelscope_tui.readers import open_checkpoint

GB = 1 << 30


def _hang(signum, frame):
    raise TimeoutError("open_checkpoint hangs")


def check_bad(
    path: Path,
    error: type[MscopeError] = MscopeError,
    *,
    name: str | None = None,
    seconds: float = 5,
    memory: int | None = 2 * GB,
    peak: int = 64 << 20,
    in_process: bool = False,
) -> str:
    """Both faces of a bad input; returns the CLI's error line.

    The CLI runs in a subprocess with its address space capped at `memory` (so an attack that
    allocates fails loudly); big matrices of similar cases pass `in_process` to stay fast."""
    tracemalloc.start()
    signal.signal(signal.SIGALRM, _hang)
    signal.alarm(int(seconds) + 5)
    try:
        with pytest.raises(MscopeError) as info:
            open_checkpoint(path)
        _, peak_seen = tracemalloc.get_traced_memory()
    finally:
        signal.alarm(0)
        tracemalloc.stop()
    assert isinstance(info.value, error), repr(info.value)
    assert peak_seen < peak, f"allocated {peak_seen:,} bytes for a bad file"
    assert "\n" not in str(info.value)
    start = time.monotonic()
    if in_process:
        result = cli_in_process("summary", path)
    else:
        result = run_cli("summary", path, timeout=30, memory=memory)
    elapsed = time.monotonic() - start
    assert result.rc == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mscope: error:"), lines[0]
    assert (name or path.name) in lines[0], lines[0]
    assert result.stdout == ""
    assert elapsed < seconds, f"took {elapsed:.1f}s"
    return lines[0]


def cli_in_process(*args: str | os.PathLike) -> CliResult:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main([str(a) for a in args])
    return CliResult(rc, out.getvalue(), err.getvalue())


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
def write_zip(path: Path, members: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compress) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def zip_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


class FakeStorage:
    def __init__(self, key: object, numel: object, storage_type: object = torch.FloatStorage):
        self.key, self.numel, self.storage_type = key, numel, storage_type


class FakeTensor:
    """Pickles exactly as torch.save writes a tensor, with whatever numbers we like."""

    def __init__(self, storage: FakeStorage, offset: object, shape: object, stride: object):
        self.args = (storage, offset, shape, stride, False, OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class TorchLikePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def torch_like_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    TorchLikePickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def crafted_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    members = {
        "archive/data.pkl": data_pkl,
        "archive/byteorder": b"little",
        "archive/version": b"3\n",
    }
    for key, data in (storages or {}).items():
        members[f"archive/data/{key}"] = data
    return write_zip(path, members)


def crafted_tensor_file(
    path: Path, offset=0, shape=(2, 3), stride=(3, 1), numel=6, key="0", data=None
) -> Path:
    tensor = FakeTensor(FakeStorage(key, numel), offset, shape, stride)
    storage = data if data is not None else b"\0" * 24
    return crafted_zip(path, torch_like_pickle({"weight": tensor}), {str(key): storage})


def test_crafted_file_is_valid(tmp_path):
    """The crafting helpers write what torch writes: torch loads it and so do we."""
    path = crafted_tensor_file(tmp_path / "ok.pt")
    assert torch.load(path, weights_only=True)["weight"].shape == (2, 3)
    ckpt = open_checkpoint(path)
    assert [(t.name, t.shape, t.stride) for t in ckpt.tensors] == [("weight", (2, 3), (3, 1))]


# ----------------------------------------------------------------------------------------------
# Not a checkpoint
# ----------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    check_bad(tmp_path / "nope.pt", NotFoundError)


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("new\nline.pt", "new\\nline.pt"),
        ("esc\x1b[31mape.pt", "esc\\x1b[31mape.pt"),
        (os.fsdecode(b"bad\xffutf8.pt"), "bad\\udcffutf8.pt"),
    ],
    ids=["newline", "escape", "not_utf8"],
)
def test_error_stays_one_line_whatever_the_name(tmp_path, name, shown):
    """File names come from users and archives: newlines and escapes are shown escaped."""
    path = tmp_path / name
    path.write_bytes(b"not a checkpoint")
    check_bad(path, UnsupportedFormatError, name=shown)


def test_directory_without_checkpoint(tmp_path):
    folder = tmp_path / "emptydir"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    check_bad(folder, UnsupportedFormatError)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.touch()
    check_bad(path, UnsupportedFormatError)


@pytest.mark.parametrize(
    "prefix",
    [b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x05\x95"],
    ids=["raw", "zip", "pickle2", "pickle5"],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes(tmp_path, seed, prefix):
    rng = random.Random(seed)
    path = tmp_path / f"random{seed}.pt"
    path.write_bytes(prefix + rng.randbytes(rng.randrange(1, 64 << 10)))
    check_bad(path, in_process=seed > 0)


def test_text_file(tmp_path):
    path = tmp_path / "readme.pt"
    path.write_text("This is not a model.\n" * 100)
    check_bad(path, UnsupportedFormatError)


def test_fifo_does_not_hang(tmp_path):
    path = tmp_path / "pipe.pt"
    os.mkfifo(path)
    check_bad(path, UnsupportedFormatError)


def test_device_file(tmp_path):
    check_bad(Path("/dev/zero"), UnsupportedFormatError, name="/dev/zero")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_permission_denied(torch_file):
    torch_file.chmod(0)
    try:
        line = check_bad(torch_file, NotFoundError)
        assert "permission denied" in line
    finally:
        torch_file.chmod(0o644)


# ----------------------------------------------------------------------------------------------
# Damaged torch.save zips
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, -1], ids=["10%", "50%", "90%", "minus1"])
def test_truncated_zip(torch_file, cut):
    data = torch_file.read_bytes()
    torch_file.write_bytes(data[: len(data) - 1] if cut == -1 else data[: int(len(data) * cut)])
    check_bad(torch_file, CorruptCheckpointError)


@pytest.mark.parametrize("seed", range(4))
def test_flipped_bytes_in_data_pkl(torch_file, seed):
    """Corruption inside data.pkl: the member's CRC no longer matches."""
    data = bytearray(torch_file.read_bytes())
    with zipfile.ZipFile(torch_file) as zf:
        info = zf.getinfo("model/data.pkl")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    rng = random.Random(seed)
    for _ in range(3):
        data[start + rng.randrange(info.file_size)] ^= 1 << rng.randrange(8)
    torch_file.write_bytes(bytes(data))
    line = check_bad(torch_file, CorruptCheckpointError)
    assert "data.pkl" in line


def test_mutated_data_pkl_never_crashes(tmp_path):
    """Random corruption that keeps the zip valid (CRC recomputed): open, or one MscopeError."""
    members = zip_members(crafted_tensor_file(tmp_path / "base.pt"))
    original = members["archive/data.pkl"]
    rng = random.Random(1234)
    outcomes = {"opened": 0, "refused": 0}
    for i in range(400):
        data = bytearray(original)
        for _ in range(rng.randrange(1, 4)):
            pos = rng.randrange(len(data))
            choice = rng.random()
            if choice < 0.5:
                data[pos] = rng.randrange(256)
            elif choice < 0.75:
                del data[pos : pos + rng.randrange(1, 8)]
            else:
                data[pos:pos] = rng.randbytes(rng.randrange(1, 8))
        path = write_zip(tmp_path / f"m{i}.pt", {**members, "archive/data.pkl": bytes(data)})
        try:
            open_checkpoint(path)
            outcomes["opened"] += 1
        except MscopeError as exc:
            assert "\n" not in str(exc)
            outcomes["refused"] += 1
        path.unlink()
    assert outcomes["refused"] > 100


def test_storage_member_missing(torch_file):
    members = zip_members(torch_file)
    del members["model/data/0"]
    write_zip(torch_file, members)
    line = check_bad(torch_file, CorruptCheckpointError)
    assert "missing" in line


def test_storage_member_too_short(torch_file):
    members = zip_members(torch_file)
    members["model/data/0"] = members["model/data/0"][:10]
    write_zip(torch_file, members)
    line = check_bad(torch_file, CorruptCheckpointError)
    assert "holds 10 bytes" in line


def test_storage_member_compressed_and_short(torch_file):
    members = zip_members(torch_file)
    members["model/data/0"] = members["model/data/0"][:10]
    write_zip(torch_file, members, zipfile.ZIP_DEFLATED)
    check_bad(torch_file, CorruptCheckpointError)


def test_data_pkl_missing(torch_file):
    members = zip_members(torch_file)
    del members["model/data.pkl"]
    write_zip(torch_file, members)
    check_bad(torch_file, CorruptCheckpointError)


def test_data_pkl_zip_bomb(tmp_path):
    """A deflated data.pkl that declares 1 KB and inflates to 64 MB must not be inflated."""
    payload = b"\x80\x02]q\x00." + b"\0" * (64 << 20)
    raw = torch_like_pickle({})
    path = crafted_zip(tmp_path / "bomb.pt", raw)
    members = zip_members(path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, payload if name.endswith("data.pkl") else data)
    blob = bytearray(buf.getvalue())
    # lie about the uncompressed size in both headers
    for sig, size_at in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):
        pos = blob.find(sig)
        while pos >= 0:
            name_at = pos + (46 if sig == b"PK\x01\x02" else 30)
            if blob[name_at : name_at + 16] == b"archive/data.pkl":
                blob[pos + size_at : pos + size_at + 4] = struct.pack("<I", 1024)
            pos = blob.find(sig, pos + 4)
    path.write_bytes(bytes(blob))
    check_bad(path, CorruptCheckpointError, peak=8 << 20)


# ----------------------------------------------------------------------------------------------
# Absurd tensor metadata
# ----------------------------------------------------------------------------------------------
ABSURD = {
    "negative_offset": dict(offset=-1),
    "offset_past_storage": dict(offset=10**6),
    "huge_offset": dict(offset=1 << 80),
    "float_offset": dict(offset=1.5),
    "negative_dim": dict(shape=(-2, 3)),
    "huge_dims": dict(shape=(1 << 40, 1 << 40), stride=(1 << 40, 1)),
    "dim_too_big": dict(shape=(1 << 70,), stride=(1,)),
    "string_dim": dict(shape=("2", 3)),
    "bool_dim": dict(shape=(True, 3)),
    "shape_not_tuple": dict(shape=7),
    "too_many_dims": dict(shape=(1,) * 1000, stride=(1,) * 1000),
    "negative_stride": dict(stride=(-3, 1)),
    "stride_rank_mismatch": dict(stride=(1,)),
    "stride_past_storage": dict(stride=(3000, 1)),
    "negative_numel": dict(numel=-6),
    "huge_numel": dict(numel=1 << 70),
    "key_not_str": dict(key=12345),
    "declares_100GB": dict(shape=(25 * GB // 4 * 4,), stride=(1,), numel=25 * GB),
}


@pytest.mark.parametrize("case", list(ABSURD), ids=list(ABSURD))
def test_absurd_tensor_metadata(tmp_path, case):
    path = crafted_tensor_file(tmp_path / f"{case}.pt", **ABSURD[case])
    check_bad(path, in_process=case not in ("declares_100GB", "huge_dims", "too_many_dims"))


def test_1kb_file_declaring_100gb_is_instant(tmp_path):
    path = crafted_tensor_file(tmp_path / "big.pt", shape=(25 * GB,), stride=(1,), numel=25 * GB)
    assert path.stat().st_size < 1024
    start = time.monotonic()
    with pytest.raises(CorruptCheckpointError, match="100"):
        open_checkpoint(path)
    assert time.monotonic() - start < 0.5
    check_bad(path, CorruptCheckpointError, seconds=3, memory=512 << 20)


def test_unknown_storage_type(tmp_path):
    tensor = FakeTensor(FakeStorage("0", 6, storage_type=os.system), 0, (2, 3), (3, 1))
    path = crafted_zip(tmp_path / "st.pt", torch_like_pickle({"w": tensor}), {"0": b"\0" * 24})
    check_bad(path, CorruptCheckpointError)


# ----------------------------------------------------------------------------------------------
# Pickle opcodes that attack memory
# ----------------------------------------------------------------------------------------------
OPCODE_ATTACKS = {
    # memo index 0x40000000: the C unpickler would size its memo table by it (8 GB)
    "long_binput": b"\x80\x02]r\x00\x00\x00\x40.",
    "put_text": b"\x80\x02]p1073741824\n.",
    "binbytes8_100gb": b"\x80\x04\x8e" + struct.pack("<Q", 100 * GB) + b"xx.",
    "binunicode8_100gb": b"\x80\x04\x8d" + struct.pack("<Q", 100 * GB) + b"xx.",
    "bytearray8_100gb": b"\x80\x05\x96" + struct.pack("<Q", 100 * GB) + b"xx.",
    "binunicode_4gb": b"\x80\x02X" + struct.pack("<I", 0xFFFFFFFF) + b"xx.",
    "long4_huge": b"\x80\x02\x8b" + struct.pack("<i", 0x7FFFFFFF) + b"\xff.",
    "long4_negative": b"\x80\x02\x8b" + struct.pack("<i", -5) + b"\xff.",
    "frame_huge": b"\x80\x04\x95" + struct.pack("<Q", 100 * GB) + b"N.",
    "no_stop": b"\x80\x02]q\x00(K\x01K\x02e",
    "get_unknown_memo": b"\x80\x02h\x05.",
    "long_binget_huge": b"\x80\x02j\xff\xff\xff\x7f.",
    "pop_empty_stack": b"\x80\x020.",
    "setitems_on_list": b"\x80\x02](K\x01K\x02u.",
    "ext4_unregistered": b"\x80\x02\x84\xff\xff\x00\x00.",
    "persid_plain": b"\x80\x02X\x01\x00\x00\x00xQ.",
    "unknown_opcode": b"\x80\x02\xff.",
    "newobj_not_a_type": b"\x80\x02K\x01)\x81.",
    "build_on_int": b"\x80\x02K\x01}b.",
}


@pytest.mark.parametrize("where", ["zip", "pickle", "legacy"])
@pytest.mark.parametrize("attack", list(OPCODE_ATTACKS), ids=list(OPCODE_ATTACKS))
def test_opcode_attacks(tmp_path, attack, where):
    data = OPCODE_ATTACKS[attack]
    if where == "zip":
        path = crafted_zip(tmp_path / f"{attack}.pt", data)
    elif where == "legacy":
        path = tmp_path / f"{attack}.pt"
        path.write_bytes(legacy_header() + data)
    else:
        if not data.startswith((b"\x80\x02", b"\x80\x04", b"\x80\x05")):
            pytest.skip("not sniffed as a pickle")
        path = tmp_path / f"{attack}.pkl"
        path.write_bytes(data)
    error = MscopeError if attack == "persid_plain" else UnsafePickleError
    check_bad(path, error, peak=8 << 20, in_process=where != "zip")


def legacy_header() -> bytes:
    """The three small pickles that open a legacy torch.save file."""
    magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
    version = pickle.dumps(1001, protocol=2)
    sys_info = pickle.dumps(
        {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}, protocol=2
    )
    return magic + version + sys_info


def test_memo_index_bounded_by_the_pickle_not_the_file(tmp_path):
    """A small pickle at the start of a big file may not claim a memo as big as the file."""
    path = tmp_path / "sparse.pkl"
    index = 1 << 27  # 128M entries: a 1-2 GB memo table
    with open(path, "wb") as fh:
        fh.write(b"\x80\x02]r" + struct.pack("<I", index) + b".")
        fh.truncate(1 << 28)  # sparse: no disk used
    line = check_bad(path, UnsafePickleError, memory=(1 << 28) + GB, peak=8 << 20)
    assert "memo index" in line


# ----------------------------------------------------------------------------------------------
# Deep and recursive structures
# ----------------------------------------------------------------------------------------------
DEPTH = 100_000


def deep_lists() -> bytes:
    return b"\x80\x02" + b"]" * DEPTH + b"a" * (DEPTH - 1) + b"."


def deep_dicts() -> bytes:
    # {'k': {'k': {...}}}: push all dicts with their key, then SETITEM from the inside out
    return b"\x80\x02" + b"}X\x01\x00\x00\x00k" * DEPTH + b"N" + b"s" * DEPTH + b"."


def deep_tuples() -> bytes:
    return b"\x80\x02N" + b"\x85" * DEPTH + b"."


def deep_tuple_key() -> bytes:
    # {(((...),),): tensor-free value}: a key whose str() would recurse
    return b"\x80\x02}N" + b"\x85" * DEPTH + b"K\x01s."


def deep_inert_calls() -> bytes:
    # evil.f(evil.f(evil.f(...))): nested calls of an unknown global
    return b"\x80\x02cevil\nf\nq\x00" + b"h\x00" * DEPTH + b"N" + b"\x85R" * DEPTH + b"."


DEEP = {
    "lists": deep_lists,
    "dicts": deep_dicts,
    "tuples": deep_tuples,
    "tuple_key": deep_tuple_key,
    "inert_calls": deep_inert_calls,
}


@pytest.mark.parametrize(
    ("shape", "where"),
    [(shape, "zip") for shape in DEEP] + [("lists", "pickle"), ("tuple_key", "pickle")],
)
def test_deeply_nested(tmp_path, shape, where):
    data = DEEP[shape]()
    path = (
        crafted_zip(tmp_path / f"deep_{shape}.pt", data)
        if where == "zip"
        else tmp_path / f"deep_{shape}.pkl"
    )
    if where == "pickle":
        path.write_bytes(data)
    opens_or_fails_cleanly(path, in_process=where == "pickle")


def opens_or_fails_cleanly(path: Path, in_process: bool = False) -> None:
    """No verdict on the file, only on the behaviour: it opens, or it fails with one line."""
    try:
        open_checkpoint(path)
        expected = 0
    except MscopeError:
        expected = 2
    start = time.monotonic()
    if in_process:  # JSON only: the text report's path is covered by the subprocess cases
        result = cli_in_process("summary", "--json", path)
    else:
        result = run_cli("summary", path, timeout=30, memory=2 * GB)
    assert time.monotonic() - start < 10
    assert result.rc == expected, result.output
    assert "Traceback" not in result.output and "RecursionError" not in result.output
    if expected:
        assert len(result.stderr.splitlines()) == 1 and path.name in result.stderr
    elif in_process:
        json.loads(result.stdout)


def test_self_referencing_structures(tmp_path):
    sd = small_state_dict()
    loop_list: list = [1, 2]
    loop_list.append(loop_list)
    loop_dict: dict = {"a": 1}
    loop_dict["self"] = loop_dict
    ckpt = {"model": sd, "loop_list": loop_list, "loop_dict": loop_dict, "epoch": 1}
    ckpt["whole"] = ckpt
    path = tmp_path / "loops.pt"
    torch.save(ckpt, path)
    opened = open_checkpoint(path)
    assert len(opened.model_tensors) == len(sd)
    opens_or_fails_cleanly(path)


def test_recursive_inert_state(tmp_path):
    """An unknown object whose state contains itself (memo back-reference)."""
    # obj = evil.Thing(); obj.__setstate__({'me': obj, 'w': [obj]})
    data = b"\x80\x02cevil\nThing\nq\x00)\x81q\x01}q\x02(X\x02\x00\x00\x00meq\x03h\x01X\x01\x00\x00\x00wq\x04]q\x05h\x01aub."
    path = tmp_path / "selfref.pkl"
    path.write_bytes(data)
    opens_or_fails_cleanly(path, in_process=True)
    path = crafted_zip(tmp_path / "selfref.pt", data)
    opens_or_fails_cleanly(path)


# ----------------------------------------------------------------------------------------------
# Legacy (pre-1.6) files
# ----------------------------------------------------------------------------------------------
def test_legacy_truncated_in_storage_region(legacy_file):
    data = legacy_file.read_bytes()
    legacy_file.write_bytes(data[:-50])
    line = check_bad(legacy_file, CorruptCheckpointError)
    assert "legacy.pt" in line


@pytest.mark.parametrize("keep", [0.05, 0.3, 0.6])
def test_legacy_truncated_anywhere(legacy_file, keep):
    data = legacy_file.read_bytes()
    legacy_file.write_bytes(data[: int(len(data) * keep)])
    check_bad(legacy_file)


def test_legacy_huge_storage_count(legacy_file):
    """The int64 element count before a storage's bytes claims 2**62 elements."""
    data = bytearray(legacy_file.read_bytes())
    ckpt = open_checkpoint(legacy_file)
    first = min(t.storage.data_offset for t in ckpt.tensors)
    data[first - 8 : first] = struct.pack("<q", 1 << 62)
    legacy_file.write_bytes(bytes(data))
    check_bad(legacy_file, CorruptCheckpointError)


# ----------------------------------------------------------------------------------------------
# Values Python itself refuses to print
# ----------------------------------------------------------------------------------------------
def test_huge_integers(tmp_path):
    """ints over 4,300 digits raise ValueError on str(); they may be keys, entries, arguments."""
    huge = 1 << 20000
    obj = {"model": small_state_dict(), "epoch": huge, "cfg": {huge: [huge, 1]}}
    path = tmp_path / "huge_int.pt"
    torch.save(obj, path)
    ckpt = open_checkpoint(path)
    assert len(ckpt.model_tensors) == len(obj["model"])
    opens_or_fails_cleanly(path)
    legacy = tmp_path / "huge_int_legacy.pt"
    torch.save(obj, legacy, _use_new_zipfile_serialization=False)
    opens_or_fails_cleanly(legacy, in_process=True)
    # as an argument of an unknown global: evil.f(<huge int>)
    data = b"\x80\x02cevil\nf\n\x8b\x00\x10\x00\x00" + b"\x01" * 4096 + b"\x85R."
    plain = tmp_path / "huge_arg.pkl"
    plain.write_bytes(data)
    assert open_checkpoint(plain).globals[0].calls
    opens_or_fails_cleanly(plain, in_process=True)


def test_many_distinct_globals(tmp_path, monkeypatch):
    """Each distinct global costs a class: a small pickle naming 25,000 of them is refused."""

    def names(n: int) -> bytes:
        return b"\x80\x02](" + b"".join(b"cm%d\nC\n" % i for i in range(n)) + b"e."

    path = tmp_path / "globals.pkl"
    path.write_bytes(names(25_000))
    start = time.monotonic()
    result = run_cli("summary", path, memory=2 * GB)
    assert time.monotonic() - start < 5
    assert result.rc == 2 and "different globals" in result.stderr, result.output
    # in-process, with a lower cap so the check stays cheap
    monkeypatch.setattr("modelscope_tui.readers.pickle.unpickler.MAX_GLOBALS", 100)
    path.write_bytes(names(150))
    check_bad(path, UnsafePickleError, in_process=True)
    path.write_bytes(names(100))
    assert len(open_checkpoint(path).globals) == 100


@pytest.mark.parametrize("kind", ["zip", "legacy", "torchscript"])
def test_damaged_anywhere_never_crashes(tmp_path, kind):
    """Truncation at many points and random bytes anywhere (headers, directory, storages):
    the file opens, or one MscopeError; never another exception."""
    source = tmp_path / "source.pt"
    if kind == "torchscript":
        source.write_bytes((SAMPLES / "scripted_cnn.pt").read_bytes())
    else:
        torch.save(
            {"model": small_state_dict(), "epoch": 3},
            source,
            _use_new_zipfile_serialization=kind == "zip",
        )
    data = source.read_bytes()
    rng = random.Random(kind)
    variants = [data[:cut] for cut in sorted(rng.sample(range(len(data)), 40))]
    for _ in range(80):
        damaged = bytearray(data)
        for _ in range(rng.randrange(1, 5)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        variants.append(bytes(damaged))
    path = tmp_path / f"damaged_{kind}.pt"
    for variant in variants:
        path.write_bytes(variant)
        try:
            open_checkpoint(path)
        except MscopeError as exc:
            assert "\n" not in str(exc)


def test_directory_of_several_checkpoints_lists_them(tmp_path):
    """`mscope summary DIR` on a folder of checkpoints said "no single weights file", then named six
    of them in one line; it now lists each (format by content, size) and how to pick one. Other
    commands keep the one-line error."""
    import json
    import shutil
    import subprocess
    import sys

    for name in ("a.pt", "b.safetensors", "c.ckpt", "evil\x1b[2J.pt"):
        shutil.copy(SAMPLES / ("transformer.safetensors" if name.endswith("safetensors") else "cnn_state_dict.pt"), tmp_path / name)
    shutil.copytree(SAMPLES / "sharded_hf", tmp_path / "shards")
    (tmp_path / "notes").mkdir()  # not a checkpoint set: not listed

    def run(*args):
        return subprocess.run([sys.executable, "-m", "modelscope_tui", *args], capture_output=True, text=True)

    listing = run("summary", str(tmp_path))
    assert listing.returncode == 2 and listing.stderr == "", listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0] == f"{tmp_path} holds 5 separate checkpoints, not one set; name one:"
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert set(rows) == {"a.pt", "b.safetensors", "c.ckpt", "evil\\x1b[2J.pt", "shards/"}, lines
    assert "safetensors" in rows["b.safetensors"] and "torch zip" in rows["a.pt"] and "sharded set" in rows["shards/"]
    size = (SAMPLES / "transformer.safetensors").stat().st_size
    assert f"{size / 1024:.1f}" in rows["b.safetensors"]
    assert "\x1b" not in listing.stdout  # the file's name cannot drive the terminal
    assert lines[-1] == f"e.g. mscope summary {tmp_path / 'a.pt'}"

    doc = json.loads(run("summary", "--json", str(tmp_path)).stdout)
    assert [c["name"] for c in doc["checkpoints"]] == ["a.pt", "b.safetensors", "evil\x1b[2J.pt", "c.ckpt", "shards"]
    assert doc["checkpoints"][1] == {"name": "b.safetensors", "format": "safetensors", "bytes": size}

    audit = run("audit", str(tmp_path))
    assert audit.returncode == 2 and audit.stderr.count("\n") == 1, audit.stderr
    assert "5 checkpoints" in audit.stderr and "a.pt" in audit.stderr
    assert f"mscope summary {tmp_path / 'a.pt'}" in audit.stderr
