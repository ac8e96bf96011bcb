"""Write the hostile corpus: malicious and malformed checkpoints with harmless, detectable payloads.

Every payload, if it ever ran, would create its case's marker file (`markers/<case>`); nothing else.
The builders reuse the payload matrix of `test_payloads.py` and the crafting helpers of
`test_bad_input.py` / `test_safetensors_sharded.py`, and add what those do not cover: payloads in
numpy object arrays, TorchScript `data.pkl` / `constants.pkl`, DCP `.metadata`, legacy headers,
shadowed duplicate members and shards; overlapping zip members; hostile paths and symlinks in shard
indexes and DCP metadata; object floods and regex-hostile TorchScript code.

    python tests/hostile/generate.py OUT_DIR    # writes OUT_DIR/<case>/..., prints the cases

Nothing generated is committed: the tests write the corpus into a temporary directory.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import operator
import os
import pickle
import pickletools
import posix
import random
import shutil
import struct
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
for _path in (TESTS, TESTS / "functional"):  # run as a script
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

from conftest import SAMPLES, small_state_dict  # noqa: E402
from test_bad_input import (  # noqa: E402
    ABSURD,
    DEEP,
    GB,
    OPCODE_ATTACKS,
    crafted_tensor_file,
    crafted_zip,
    legacy_header,
    torch_like_pickle,
    write_zip,
    zip_members,
)
from test_payloads import (  # noqa: E402
    FORMATS,
    PAYLOADS,
    Env,
    Payload,
    Reduce,
    attribute_path_global,
)
from test_safetensors_sharded import BAD_HEADERS, f32, write_raw  # noqa: E402

REFUSE, OPEN, EITHER = "refuse", "open", "either"


@dataclass(frozen=True)
class Spec:
    build: Callable[[Ctx], Path]
    expect: str = EITHER  # what `mscope summary` must do: exit 0 ("open"), 2 ("refuse"), or either
    danger: tuple[str, ...] = ()  # when it opens: one of these globals is flagged dangerous...
    call: str = ""  # ...with a rendered call containing this (what the payload would have done)
    says: str = ""  # when refused: the one-line error contains this


@dataclass(frozen=True)
class Case:
    name: str
    path: Path  # what to open: a file or a directory
    marker: Path  # exists only if a payload ran
    expect: str
    danger: tuple[str, ...]
    call: str
    says: str


@dataclass
class Ctx:
    dir: Path  # the case's own directory
    marker: Path
    stack: contextlib.ExitStack

    @property
    def env(self) -> Env:
        return Env(self.dir, self.marker, self.stack)

    @property
    def touch(self) -> str:
        return f"touch {self.marker}"


SPECS: dict[str, Spec] = {}


def case(name: str, expect: str = EITHER, danger: str = "", call: str = "", says: str = ""):
    def register(build: Callable[[Ctx], Path]) -> Callable[[Ctx], Path]:
        assert name not in SPECS, name
        SPECS[name] = Spec(build, expect, tuple(filter(None, danger.split("|"))), call, says)
        return build

    return register


def generate(out: Path, names: list[str] | None = None) -> list[Case]:
    """Build every case (or `names`) under `out`; returns them in registration order."""
    out.mkdir(parents=True, exist_ok=True)
    markers = out / "markers"
    markers.mkdir(exist_ok=True)
    cases = []
    for name, spec in SPECS.items():
        if names is not None and name not in names:
            continue
        directory = out / name
        directory.mkdir()
        marker = markers / name
        with contextlib.ExitStack() as stack:
            path = spec.build(Ctx(directory, marker, stack))
        assert not marker.exists(), f"building {name} ran its payload"
        cases.append(Case(name, path, marker, spec.expect, spec.danger, spec.call, spec.says))
    return cases


# ----------------------------------------------------------------------------------------------
# Tools
# ----------------------------------------------------------------------------------------------
def payload_ops(obj: object) -> bytes:
    """The opcodes that build `obj` (a payload), without PROTO and STOP, memo-free where possible."""
    raw = pickletools.optimize(pickle.dumps(obj, protocol=2))
    assert raw[:2] == b"\x80\x02" and raw[-1:] == b".", raw[:4]
    return raw[2:-1]


def inject(data: bytes, obj: object) -> bytes:
    """`data` (a binary pickle) that first builds `obj` and drops it (POP): pickle.load and
    torch.load(weights_only=False) run the payload, then return the original object."""
    assert data[:1] == b"\x80", data[:4]
    return data[:2] + payload_ops(obj) + b"0" + data[2:]


def rewrite_zip(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None]) -> Path:
    """Copy a zip member by member (same compression); `edit(name, data)` returns new bytes, or
    None to drop the member."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data, compress_type=info.compress_type)
    return dst


def member_named(path: Path, suffix: str) -> str:
    with zipfile.ZipFile(path) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(suffix)]
    return name


def torch_file(ctx: Ctx, obj: object | None = None, name: str = "model.pt", **kw) -> Path:
    path = ctx.dir / name
    torch.save(small_state_dict() if obj is None else obj, path, **kw)
    return path


def posix_payload(ctx: Ctx) -> Reduce:
    return Reduce(posix.system, ctx.touch)


def copy_sample(ctx: Ctx, name: str) -> Path:
    dst = ctx.dir / name
    src = SAMPLES / name
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)
    return dst


def central_directory(blob: bytes) -> tuple[int, int, int, int]:
    """(EOCD offset, entry count, directory size, directory offset) of a plain zip."""
    eocd = blob.rfind(b"PK\x05\x06")
    _, _, _, _, count, size, offset, _ = struct.unpack_from("<4s4H2LH", blob, eocd)
    return eocd, count, size, offset


def central_entries(blob: bytes) -> dict[str, int]:
    """name -> offset of its central directory entry."""
    _, count, _, pos = central_directory(blob)
    out = {}
    for _ in range(count):
        nlen, xlen, clen = struct.unpack_from("<3H", blob, pos + 28)
        out[blob[pos + 46 : pos + 46 + nlen].decode()] = pos
        pos += 46 + nlen + xlen + clen
    return out


def two_storage_zip(ctx: Ctx) -> Path:
    return torch_file(ctx, {"a": torch.arange(6.0), "b": torch.ones(3, dtype=torch.int64)})


# ----------------------------------------------------------------------------------------------
# Code-execution payloads (each would create its marker if unpickled for real)
# ----------------------------------------------------------------------------------------------
EXTRA_PAYLOADS = [
    Payload("eval", lambda e: Reduce(builtins.eval, f"open({str(e.marker)!r}, 'w').close()"),
            "builtins.eval", "builtins.eval(\"open("),
    Payload("attrgetter",
            lambda e: Reduce(Reduce(operator.attrgetter("system"), Reduce(builtins.__import__, "os")),
                             f"touch {e.marker}"),
            "operator.attrgetter", "operator.attrgetter('system')(builtins.__import__('os'))('touch "),
]  # fmt: skip


def _payload_case(payload: Payload, fmt: str) -> Callable[[Ctx], Path]:
    def build(ctx: Ctx) -> Path:
        path = ctx.dir / f"{fmt}.pt"
        FORMATS[fmt](payload.build(ctx.env), path)
        return path

    return build


for _p in PAYLOADS + EXTRA_PAYLOADS:  # every payload, inside a training checkpoint
    case(f"payload-{_p.name}", OPEN, _p.dangerous, _p.call)(_payload_case(_p, "deep_zip"))

_BY_NAME = {p.name: p for p in PAYLOADS}
for _name, _fmt in [
    ("os.system", "deep_legacy"),
    ("exec", "full_module"),
    ("posix.system", "pickle_protocol0"),
    ("Popen", "plain_pickle"),
    ("exec", "top"),
]:  # the same payloads in the other containers
    _p = _BY_NAME[_name]
    case(f"payload-{_name}-{_fmt}", OPEN, _p.dangerous, _p.call)(_payload_case(_p, _fmt))


@case("payload-numpy-object-array", OPEN, "posix.system", "posix.system('touch ")
def _(ctx: Ctx) -> Path:
    import numpy as np

    arr = np.empty(3, dtype=object)
    arr[:] = [1.5, posix_payload(ctx), "text"]
    return torch_file(ctx, {"model": small_state_dict(), "extra": {"samples": arr}})


@case("payload-numpy-object-array-pickle", OPEN, "posix.system", "posix.system('touch ")
def _(ctx: Ctx) -> Path:
    import numpy as np

    arr = np.empty(2, dtype=object)
    arr[:] = [posix_payload(ctx), None]
    path = ctx.dir / "weights.pkl"
    path.write_bytes(pickle.dumps({"W": np.zeros((2, 2)), "hooks": arr}, protocol=2))
    return path


@case("npy-object-array", REFUSE, says="not a PyTorch checkpoint")
def _(ctx: Ctx) -> Path:
    import numpy as np

    arr = np.empty(1, dtype=object)
    arr[0] = posix_payload(ctx)
    path = ctx.dir / "weights.npy"
    np.save(path, arr, allow_pickle=True)
    return path


@case("payload-injected-before-state-dict", OPEN, "posix.system", "posix.system('touch ")
def _(ctx: Ctx) -> Path:
    path = torch_file(ctx)
    pkl = member_named(path, "/data.pkl")
    out = ctx.dir / "injected.pt"
    rewrite_zip(path, out, lambda n, d: inject(d, posix_payload(ctx)) if n == pkl else d)
    path.unlink()
    return out


@case("payload-in-tensor-rebuild-hooks", OPEN, "posix.system", "posix.system('touch ")
def _(ctx: Ctx) -> Path:
    from test_bad_input import FakeStorage

    class HookedTensor:
        def __reduce__(self):
            hooks = {"hook": posix_payload(ctx)}
            args = (FakeStorage("0", 6), 0, (2, 3), (3, 1), False, hooks)
            return torch._utils._rebuild_tensor_v2, args

    return crafted_zip(
        ctx.dir / "hooks.pt", torch_like_pickle({"w": HookedTensor()}), {"0": bytes(24)}
    )


@case("payload-as-storage-type", REFUSE, says="posix.system")
def _(ctx: Ctx) -> Path:
    from test_bad_input import FakeStorage, FakeTensor

    tensor = FakeTensor(FakeStorage("0", 6, storage_type=posix_payload(ctx)), 0, (2, 3), (3, 1))
    return crafted_zip(ctx.dir / "st.pt", torch_like_pickle({"w": tensor}), {"0": bytes(24)})


@case("payload-lightning-hparams", OPEN, "posix.system", "posix.system('touch ")
def _(ctx: Ctx) -> Path:
    obj = {
        "state_dict": small_state_dict(),
        "pytorch-lightning_version": "2.4.0",
        "global_step": 10,
        "hyper_parameters": {"callbacks": [posix_payload(ctx)], "lr": 0.1},
    }
    return torch_file(ctx, obj, "last.ckpt")


@case("payload-protocol4-attribute-path", OPEN, "pathlib.os.system", "pathlib.os.system('touch ")
def _(ctx: Ctx) -> Path:
    path = ctx.dir / "dotted.pt"
    with attribute_path_global("pathlib", "os.system") as fake:
        obj = {"model": small_state_dict(), "hook": Reduce(fake, ctx.touch)}
        torch.save(obj, path, pickle_protocol=4)
    return path


@case("payload-dunder-attribute-path", OPEN, "collections.OrderedDict.__init__.__globals__")
def _(ctx: Ctx) -> Path:
    name = b"OrderedDict.__init__.__globals__"
    path = ctx.dir / "dunder.pkl"
    path.write_bytes(b"\x80\x04\x8c\x0bcollections\x8c" + bytes([len(name)]) + name + b"\x93.")
    return path


# -- TorchScript -----------------------------------------------------------------------------------
@case("payload-torchscript-data-pkl", OPEN, "posix.system", "posix.system('touch ")
def _(ctx: Ctx) -> Path:
    src = SAMPLES / "scripted_cnn.pt"
    pkl = member_named(src, "/data.pkl")
    out = ctx.dir / "scripted.pt"
    return rewrite_zip(src, out, lambda n, d: inject(d, posix_payload(ctx)) if n == pkl else d)


@case("payload-torchscript-constants-pkl", OPEN, "posix.system", "posix.system('touch ")
def _(ctx: Ctx) -> Path:
    src = SAMPLES / "scripted_cnn.pt"
    const = member_named(src, "/constants.pkl")
    payload = pickle.dumps((posix_payload(ctx),), protocol=2)
    out = ctx.dir / "scripted.pt"
    return rewrite_zip(src, out, lambda n, d: payload if n == const else d)


@case("torchscript-code-regex-bomb", OPEN)
def _(ctx: Ctx) -> Path:
    """4 MB of blank lines inside a class body: `^\\s+` patterns went quadratic (hours)."""
    src = SAMPLES / "scripted_cnn.pt"
    code = member_named(src, "code/__torch__.py")
    out = ctx.dir / "scripted.pt"

    def edit(name: str, data: bytes) -> bytes:
        return data.replace(b"):\n", b"):\n" + b"\n" * (4 << 20), 1) if name == code else data

    return rewrite_zip(src, out, edit)


# -- DCP -----------------------------------------------------------------------------------------
def _dcp(ctx: Ctx) -> Path:
    return copy_sample(ctx, "dcp_checkpoint")


@case("payload-dcp-metadata-is-payload", REFUSE, says="would call posix.system('touch ")
def _(ctx: Ctx) -> Path:
    directory = _dcp(ctx)
    (directory / ".metadata").write_bytes(pickle.dumps(posix_payload(ctx), protocol=2))
    return directory


@case("payload-dcp-metadata-injected", OPEN, "posix.system", "posix.system('touch ")
def _(ctx: Ctx) -> Path:
    directory = _dcp(ctx)
    meta = directory / ".metadata"
    meta.write_bytes(inject(meta.read_bytes(), posix_payload(ctx)))
    return directory


def _dcp_relative_path(ctx: Ctx, new: bytes) -> Path:
    directory = _dcp(ctx)
    meta = directory / ".metadata"
    old = b"\x8c\x0c__0_0.distcp"
    assert len(new) == 12 and meta.read_bytes().count(old) == 1
    meta.write_bytes(meta.read_bytes().replace(old, b"\x8c\x0c" + new))
    return directory


@case("dcp-dotdot-path", REFUSE, says="'..'")
def _(ctx: Ctx) -> Path:
    directory = _dcp_relative_path(ctx, b"../_0.distcp")
    shutil.copyfile(directory / "__0_0.distcp", ctx.dir / "_0.distcp")
    return directory


@case("dcp-absolute-path", REFUSE, says="absolute")
def _(ctx: Ctx) -> Path:
    return _dcp_relative_path(ctx, b"//etc/passwd")


@case("dcp-symlink-out", REFUSE, says="outside")
def _(ctx: Ctx) -> Path:
    directory = _dcp_relative_path(ctx, b"lnk_0.distcp")
    outside = ctx.dir / "outside.distcp"
    shutil.copyfile(directory / "__0_0.distcp", outside)
    (directory / "lnk_0.distcp").symlink_to(outside)
    return directory


# -- legacy format -----------------------------------------------------------------------------------
def _legacy_parts(ctx: Ctx) -> tuple[bytes, bytes]:
    """(the three header pickles, everything after them) of a real legacy file."""
    from modelscope_tui.readers.pickle.scan import scan_pickle

    data = torch_file(ctx, name="base.pt", _use_new_zipfile_serialization=False).read_bytes()
    pos = 0
    for _ in range(3):
        pos = scan_pickle(data, pos)
    (ctx.dir / "base.pt").unlink()
    return data[:pos], data[pos:]


@case("payload-legacy-sys-info", OPEN, "posix.system", "posix.system('touch ")
def _(ctx: Ctx) -> Path:
    header, rest = _legacy_parts(ctx)
    magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
    version = pickle.dumps(1001, protocol=2)
    path = ctx.dir / "legacy.pt"
    path.write_bytes(magic + version + pickle.dumps(posix_payload(ctx), protocol=2) + rest)
    return path


@case("payload-legacy-version", REFUSE, says="would call posix.system('touch ")
def _(ctx: Ctx) -> Path:
    header, rest = _legacy_parts(ctx)
    magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
    sys_info = pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2)
    path = ctx.dir / "legacy.pt"
    path.write_bytes(magic + pickle.dumps(posix_payload(ctx), protocol=2) + sys_info + rest)
    return path


@case("legacy-truncated", REFUSE)
def _(ctx: Ctx) -> Path:
    path = torch_file(ctx, name="legacy.pt", _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])
    return path


@case("legacy-huge-storage-count", REFUSE)
def _(ctx: Ctx) -> Path:
    from modelscope_tui.readers import open_checkpoint

    path = torch_file(ctx, name="legacy.pt", _use_new_zipfile_serialization=False)
    data = bytearray(path.read_bytes())
    first = min(t.storage.data_offset for t in open_checkpoint(path).tensors)
    data[first - 8 : first] = struct.pack("<q", 1 << 62)
    path.write_bytes(bytes(data))
    return path


# -- sharded checkpoints -------------------------------------------------------------------------
def _sharded(ctx: Ctx, edit: Callable[[Path, dict], None], sample: str = "sharded_hf") -> Path:
    directory = copy_sample(ctx, sample)
    (index,) = directory.glob("*.index.json")
    doc = json.loads(index.read_text())
    edit(directory, doc)
    index.write_text(json.dumps(doc))
    return index


def _first_shard(doc: dict) -> str:
    return sorted(set(doc["weight_map"].values()))[0]


def _retarget(doc: dict, shard: str, to: str) -> None:
    doc["weight_map"] = {k: (to if v == shard else v) for k, v in doc["weight_map"].items()}


@case("sharded-dotdot", REFUSE, says="'..'")
def _(ctx: Ctx) -> Path:
    def edit(directory: Path, doc: dict) -> None:
        shard = _first_shard(doc)
        shutil.copyfile(directory / shard, ctx.dir / "outside.safetensors")
        _retarget(doc, shard, "../outside.safetensors")

    return _sharded(ctx, edit)


@case("sharded-absolute", REFUSE, says="absolute")
def _(ctx: Ctx) -> Path:
    def edit(directory: Path, doc: dict) -> None:
        shard = _first_shard(doc)
        _retarget(doc, shard, str((directory / shard).resolve()))

    return _sharded(ctx, edit)


@case("sharded-symlink-out", REFUSE, says="outside")
def _(ctx: Ctx) -> Path:
    def edit(directory: Path, doc: dict) -> None:
        shard = _first_shard(doc)
        outside = ctx.dir / "outside.safetensors"
        (directory / shard).rename(outside)
        (directory / shard).symlink_to(outside)

    return _sharded(ctx, edit)


@case("sharded-symlink-loop", REFUSE)
def _(ctx: Ctx) -> Path:
    def edit(directory: Path, doc: dict) -> None:
        shard = _first_shard(doc)
        (directory / shard).unlink()
        (directory / shard).symlink_to(directory / "loop-b.safetensors")
        (directory / "loop-b.safetensors").symlink_to(directory / shard)

    return _sharded(ctx, edit)


@case("sharded-many-missing-shards", REFUSE)
def _(ctx: Ctx) -> Path:
    def edit(directory: Path, doc: dict) -> None:
        doc["weight_map"].update(
            {f"ghost.{i}": f"ghost-{i % 5000}.safetensors" for i in range(200_000)}
        )

    return _sharded(ctx, edit)


@case("sharded-index-deep-json", REFUSE)
def _(ctx: Ctx) -> Path:
    directory = copy_sample(ctx, "sharded_hf")
    (index,) = directory.glob("*.index.json")
    index.write_text('{"weight_map": ' + "[" * 200_000 + "]" * 200_000 + "}")
    return index


@case("payload-in-bin-shard", OPEN, "posix.system", "posix.system('touch ")
def _(ctx: Ctx) -> Path:
    def edit(directory: Path, doc: dict) -> None:
        shard = directory / _first_shard(doc)
        state = torch.load(shard, weights_only=True)  # our own sample: trusted
        torch.save({**state, "hook": posix_payload(ctx)}, shard)

    return _sharded(ctx, edit, "sharded_bin")


@case("dir-only-file-is-self-symlink", REFUSE)
def _(ctx: Ctx) -> Path:
    directory = ctx.dir / "model"
    directory.mkdir()
    (directory / "model.safetensors").symlink_to(directory / "model.safetensors")
    return directory


@case("dir-symlink-loop", REFUSE)
def _(ctx: Ctx) -> Path:
    (ctx.dir / "a").symlink_to(ctx.dir / "b")
    (ctx.dir / "b").symlink_to(ctx.dir / "a")
    return ctx.dir / "a"


# -- damaged and crafted zips --------------------------------------------------------------------
@case("zip-truncated-half", REFUSE)
def _(ctx: Ctx) -> Path:
    path = torch_file(ctx)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@case("zip-crc-corrupt-data-pkl", REFUSE, says="CRC")
def _(ctx: Ctx) -> Path:
    path = torch_file(ctx)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member_named(path, "/data.pkl"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return path


@case("zip-duplicate-data-pkl-shadowed-payload", REFUSE, "posix.system", says="duplicate")
def _(ctx: Ctx) -> Path:
    """Two data.pkl: the first (shadowed) carries a payload. Listed even by non-strict readers."""
    path = torch_file(ctx)
    members = zip_members(path)
    pkl = member_named(path, "/data.pkl")
    out = ctx.dir / "dup.pt"
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in members.items():
            if name == pkl:
                zf.writestr(name, inject(data, posix_payload(ctx)))
            zf.writestr(name, data)
    path.unlink()
    return out


@case("zip-overlapping-members", REFUSE, says="points at the local header")
def _(ctx: Ctx) -> Path:
    """Storage 1's directory entry points at storage 0's bytes (overlapping members)."""
    path = two_storage_zip(ctx)
    blob = bytearray(path.read_bytes())
    entries = central_entries(bytes(blob))
    (zero,) = [n for n in entries if n.endswith("/data/0")]
    (one,) = [n for n in entries if n.endswith("/data/1")]
    blob[entries[one] + 42 : entries[one] + 46] = blob[entries[zero] + 42 : entries[zero] + 46]
    path.write_bytes(bytes(blob))
    return path


@case("zip-overlap-bomb", EITHER)
def _(ctx: Ctx) -> Path:
    """4,000 directory entries share one deflated 1 MB member: 4 GB if anyone inflated them."""
    path = torch_file(ctx)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{member_named(path, '/data.pkl')[:-8]}bomb", bytes(1 << 20))
    blob = bytearray(path.read_bytes())
    eocd, count, size, offset = central_directory(bytes(blob))
    entries = central_entries(bytes(blob))
    bomb = next(n for n in entries if n.endswith("/bomb"))
    start = entries[bomb]
    entry = bytes(blob[start:eocd])  # the last directory entry
    copies = b"".join(entry.replace(b"/bomb", b"/%04d" % i, 1) for i in range(4000))
    tail = bytearray(blob[eocd:])
    struct.pack_into("<HHL", tail, 8, count + 4000, count + 4000, size + len(copies))
    path.write_bytes(bytes(blob[:eocd]) + copies + bytes(tail))
    return path


@case("zip-bomb-data-pkl", REFUSE)
def _(ctx: Ctx) -> Path:
    """A deflated data.pkl that declares 1 KB and inflates to 64 MB."""
    path = crafted_zip(ctx.dir / "bomb.pt", torch_like_pickle({}))
    members = zip_members(path)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(
                name, b"\x80\x02]q\x00." + bytes(64 << 20) if name.endswith("data.pkl") else data
            )
    blob = bytearray(path.read_bytes())
    for sig, at, base in ((b"PK\x01\x02", 24, 46), (b"PK\x03\x04", 22, 30)):
        pos = blob.find(sig)
        while pos >= 0:
            if blob[pos + base : pos + base + 16] == b"archive/data.pkl":
                blob[pos + at : pos + at + 4] = struct.pack("<I", 1024)
            pos = blob.find(sig, pos + 4)
    path.write_bytes(bytes(blob))
    return path


@case("zip-compressed-storages", EITHER)
def _(ctx: Ctx) -> Path:
    path = torch_file(ctx)
    out = ctx.dir / "deflated.pt"
    write_zip(out, zip_members(path), zipfile.ZIP_DEFLATED)
    path.unlink()
    return out


@case("zip-storage-missing", REFUSE, says="missing")
def _(ctx: Ctx) -> Path:
    path = torch_file(ctx)
    rewrite_zip(path, ctx.dir / "m.pt", lambda n, d: None if n.endswith("/data/0") else d)
    path.unlink()
    return ctx.dir / "m.pt"


@case("zip-storage-too-short", REFUSE)
def _(ctx: Ctx) -> Path:
    path = torch_file(ctx)
    rewrite_zip(path, ctx.dir / "s.pt", lambda n, d: d[:10] if n.endswith("/data/0") else d)
    path.unlink()
    return ctx.dir / "s.pt"


@case("zip-without-data-pkl", REFUSE)
def _(ctx: Ctx) -> Path:
    path = torch_file(ctx)
    rewrite_zip(path, ctx.dir / "n.pt", lambda n, d: None if n.endswith("data.pkl") else d)
    path.unlink()
    return ctx.dir / "n.pt"


def _patch_end_records(
    ctx: Ctx, eocd_field: tuple[int, str, int], zip64_field: tuple[int, str, int]
) -> Path:
    """A torch zip with one field of both end records (classic and zip64) overwritten."""
    path = torch_file(ctx)
    blob = bytearray(path.read_bytes())
    for sig, (at, fmt, value) in ((b"PK\x05\x06", eocd_field), (b"PK\x06\x06", zip64_field)):
        pos = blob.rfind(sig)
        assert pos >= 0, sig
        struct.pack_into(fmt, blob, pos + at, value)
    path.write_bytes(bytes(blob))
    return path


@case("zip-end-record-absurd-count", REFUSE)
def _(ctx: Ctx) -> Path:
    return _patch_end_records(ctx, (10, "<H", 0xFFFF), (32, "<Q", 1 << 60))


@case("zip-directory-outside-file", REFUSE)
def _(ctx: Ctx) -> Path:
    return _patch_end_records(ctx, (16, "<L", 0xFFFFFF00), (48, "<Q", 1 << 62))


@case("zip64-locator-far-away", REFUSE)
def _(ctx: Ctx) -> Path:
    path = torch_file(ctx)
    blob = path.read_bytes()
    eocd = central_directory(blob)[0]
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, 1 << 62, 1)
    path.write_bytes(blob[:eocd] + locator + blob[eocd:])
    return path


@case("zip-empty", REFUSE)
def _(ctx: Ctx) -> Path:
    path = ctx.dir / "empty.pt"
    with zipfile.ZipFile(path, "w"):
        pass
    return path


# -- absurd tensors and pickles ------------------------------------------------------------------
for _name in (
    "declares_100GB",
    "huge_dims",
    "too_many_dims",
    "negative_offset",
    "negative_stride",
    "huge_numel",
):
    case(f"tensor-{_name}", REFUSE)(
        lambda ctx, _n=_name: crafted_tensor_file(ctx.dir / f"{_n}.pt", **ABSURD[_n])
    )


@case("tensor-broadcast-4TB", REFUSE, says="repeating")
def _(ctx: Ctx) -> Path:
    """A stride-0 view: 4 TB of one 24-byte storage (`audit --stats` read it for hours)."""
    return crafted_tensor_file(ctx.dir / "bcast.pt", shape=(1 << 40,), stride=(0,))


for _name in (
    "long_binput",
    "binbytes8_100gb",
    "binunicode8_100gb",
    "frame_huge",
    "no_stop",
    "unknown_opcode",
):
    case(f"pickle-{_name}", REFUSE)(
        lambda ctx, _n=_name: crafted_zip(ctx.dir / f"{_n}.pt", OPCODE_ATTACKS[_n])
    )

for _name in ("lists", "dicts", "inert_calls"):
    case(f"pickle-deep-{_name}", EITHER)(
        lambda ctx, _n=_name: crafted_zip(ctx.dir / f"deep_{_n}.pt", DEEP[_n]())
    )


@case("pickle-object-flood", REFUSE, says="MiB of objects")
def _(ctx: Ctx) -> Path:
    """2 MB of EMPTY_DICT opcodes: 128 MB of dicts (8 MB of them took 2.7 GB and 46 s)."""
    return crafted_zip(ctx.dir / "flood.pt", b"\x80\x02(" + b"}" * (2 << 20) + b"l.")


@case("pickle-self-references", OPEN)
def _(ctx: Ctx) -> Path:
    loop_list: list = [1, 2]
    loop_list.append(loop_list)
    ckpt: dict = {"model": small_state_dict(), "loop": loop_list}
    ckpt["whole"] = ckpt
    return torch_file(ctx, ckpt)


@case("pickle-recursive-inert-state", EITHER)
def _(ctx: Ctx) -> Path:
    data = (
        b"\x80\x02cevil\nThing\nq\x00)\x81q\x01}q\x02(X\x02\x00\x00\x00meq\x03h\x01"
        b"X\x01\x00\x00\x00wq\x04]q\x05h\x01aub."
    )
    return crafted_zip(ctx.dir / "selfref.pt", data)


@case("pickle-huge-string", OPEN)
def _(ctx: Ctx) -> Path:
    return torch_file(ctx, {"model": small_state_dict(), "notes": "x" * (16 << 20)})


@case("pickle-huge-int", OPEN)
def _(ctx: Ctx) -> Path:
    huge = 1 << 40_000
    return torch_file(ctx, {"model": small_state_dict(), "epoch": huge, "cfg": {huge: [huge]}})


@case("pickle-25k-globals", REFUSE, says="different globals")
def _(ctx: Ctx) -> Path:
    path = ctx.dir / "globals.pkl"
    path.write_bytes(b"\x80\x02](" + b"".join(b"cm%d\nC\n" % i for i in range(25_000)) + b"e.")
    return path


# -- safetensors ----------------------------------------------------------------------------------
for _name in ("bad json", "duplicate name", "overlap", "past end of file", "negative shape",
              "metadata not strings", "unknown dtype", "size mismatch"):  # fmt: skip
    case(f"safetensors-{_name.replace(' ', '-')}", REFUSE)(
        lambda ctx, _n=_name: write_raw(ctx.dir / "model.safetensors", *BAD_HEADERS[_n])
    )


@case("safetensors-header-length-max", REFUSE)
def _(ctx: Ctx) -> Path:
    return write_raw(ctx.dir / "model.safetensors", b'{"a": 1}', length=(1 << 64) - 1)


@case("safetensors-header-past-end", REFUSE)
def _(ctx: Ctx) -> Path:
    return write_raw(ctx.dir / "model.safetensors", b'{"a": 1}', length=10_000)


@case("safetensors-deep-json", REFUSE)
def _(ctx: Ctx) -> Path:
    return write_raw(
        ctx.dir / "model.safetensors", b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    )


@case("safetensors-declares-100GB", REFUSE)
def _(ctx: Ctx) -> Path:
    return write_raw(ctx.dir / "model.safetensors", {"w": f32([25 * GB], 0, 100 * GB)}, bytes(64))


@case("safetensors-huge-shape", REFUSE)
def _(ctx: Ctx) -> Path:
    return write_raw(ctx.dir / "model.safetensors", {"w": f32([1 << 40, 1 << 40], 0, 8)}, bytes(8))


# -- not checkpoints at all ---------------------------------------------------------------------
@case("fifo", REFUSE)
def _(ctx: Ctx) -> Path:
    path = ctx.dir / "model.pt"
    os.mkfifo(path)
    return path


@case("empty-file", REFUSE)
def _(ctx: Ctx) -> Path:
    path = ctx.dir / "model.pt"
    path.touch()
    return path


@case("legacy-magic-then-garbage", REFUSE)
def _(ctx: Ctx) -> Path:
    path = ctx.dir / "model.pt"
    path.write_bytes(legacy_header()[:20] + random.Random(0).randbytes(4096))
    return path


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-3].strip())
        return 2
    for c in generate(Path(argv[0])):
        print(f"{c.name:45} {c.expect:7} {c.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
