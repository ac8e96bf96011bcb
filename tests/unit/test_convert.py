"""Remapped and cast copies, checked against torch and safetensors themselves."""

from __future__ import annotations

import ast
import contextlib
import json
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.serialization
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modelscope_tui import open_checkpoint
from modelscope_tui.errors import MscopeError
from modelscope_tui.readers.pickle.patch import scan_storage_locations
from modelscope_tui.write import cast as cast_mod
from modelscope_tui.write import zipwriter
from modelscope_tui.write.atomic import TEMP_MARK, SaveError
from modelscope_tui.write.cast import cast_copy, preview_cast
from modelscope_tui.write.remap import remap_locations

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"
CUDA_ERROR = "Attempting to deserialize object on a CUDA device"


@contextlib.contextmanager
def stored_as(tag):
    """torch.save as if the storages lived where `tag(storage)` says (no GPU needed)."""
    original = torch.serialization.location_tag
    torch.serialization.location_tag = tag
    try:
        yield
    finally:
        torch.serialization.location_tag = original


def fresh_cuda(index_of=lambda storage: 0):
    """Like torch's own CUDA tagger: a new string object for every storage."""
    return lambda storage: "cuda:" + str(index_of(storage))


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if TEMP_MARK in p.name]


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every CRC right
        return {info.filename: z.read(info) for info in z.infolist()}


def data_offsets(path: Path) -> dict[str, int]:
    raw = path.read_bytes()
    out = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            nlen, xlen = struct.unpack_from("<2H", raw, info.header_offset + 26)
            out[info.filename] = info.header_offset + 30 + nlen + xlen
    return out


def state_dict():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Embedding(10, 4),
        torch.nn.Linear(4, 6),
        torch.nn.BatchNorm1d(6),
        torch.nn.Linear(6, 10),
    )
    net[3].weight = torch.nn.Parameter(torch.randn(10, 6))
    sd = net.state_dict()
    sd["mask"] = torch.tensor([True, False, True])
    sd["phase"] = torch.randn(3, dtype=torch.complex64)
    sd["half"] = torch.randn(5).half()
    sd["double"] = torch.randn(2, 2, dtype=torch.float64)
    fused = torch.randn(12, 4)  # two views of one storage, like a fused qkv weight
    sd["q.weight"], sd["k.weight"] = fused[:4], fused[4:8]
    sd["head.weight"] = sd["0.weight"]  # tied (same tensor, same storage)
    return sd


def load(path, **kwargs):
    return torch.load(path, weights_only=True, **kwargs)


# ----------------------------------------------------------------------------------------------
# remap_locations
# ----------------------------------------------------------------------------------------------
def test_remap_makes_a_cuda_checkpoint_load_on_cpu(tmp_path, monkeypatch):
    sd = state_dict()
    on_gpu1 = {sd["1.weight"].untyped_storage().data_ptr(), sd["mask"].untyped_storage().data_ptr()}
    src = tmp_path / "model.pt"
    with stored_as(fresh_cuda(lambda s: 1 if s.data_ptr() in on_gpu1 else 0)):
        torch.save(sd, src)
    with pytest.raises(RuntimeError, match=CUDA_ERROR):
        load(src)
    ckpt = open_checkpoint(src)
    assert {t.location for t in ckpt.tensors} == {"cuda:0", "cuda:1"}

    out = remap_locations(ckpt)

    assert out == tmp_path / "model.cpu.pt"
    monkeypatch.setenv("TORCH_SERIALIZATION_DEBUG", "1")  # torch checks the miniz layout itself
    got = load(out)
    assert list(got) == list(sd)
    for name, tensor in sd.items():
        assert torch.equal(got[name], tensor), name
        assert got[name].dtype == tensor.dtype and got[name].stride() == tensor.stride()
    assert got["head.weight"].data_ptr() == got["0.weight"].data_ptr()
    assert (
        got["q.weight"].untyped_storage().data_ptr() == got["k.weight"].untyped_storage().data_ptr()
    )
    assert {t.location for t in open_checkpoint(out).tensors} == {"cpu"}
    before, after = members(src), members(out)
    assert before.keys() == after.keys()
    for name in before:
        if not name.endswith("data.pkl"):
            assert before[name] == after[name], name
    assert after["model/data.pkl"] != before["model/data.pkl"]
    assert all(offset % 64 == 0 for offset in data_offsets(out).values())
    assert no_temp_files(tmp_path)


def test_remap_gives_the_bytes_torch_writes_on_cpu(tmp_path):
    sd = state_dict()
    cuda = "cuda:0"  # one string object for every storage: memoized once, fetched after
    src, ref = tmp_path / "gpu" / "model.pt", tmp_path / "cpu" / "model.pt"
    src.parent.mkdir()
    ref.parent.mkdir()
    with stored_as(lambda storage: cuda):
        torch.save(sd, src)
    with stored_as(lambda storage: "cpu"):
        torch.save(sd, ref)
    out = remap_locations(open_checkpoint(src), "cpu", dest=tmp_path / "out.pt")
    a, b = members(out), members(ref)
    sid = "model/.data/serialization_id"
    assert a.pop(sid) == members(src)[sid] and b.pop(sid)
    assert a == b
    assert data_offsets(out) == data_offsets(ref)
    assert out.stat().st_size == ref.stat().st_size


def test_remap_only_touches_persistent_ids(tmp_path):
    """A config string that is the very same object as the storages' location keeps its text."""
    sd = {"w": torch.randn(3), "b": torch.arange(4)}
    loc = "cuda:0"
    src = tmp_path / "ckpt.pt"
    with stored_as(lambda storage: loc):
        torch.save({"config": {"device": loc, "other": "cuda:0"}, "model": sd}, src)
    data = members(src)["ckpt/data.pkl"]
    scan = scan_storage_locations(data)
    shared = scan.locations[0].use.obj
    assert len(shared.uses) > len(scan.locations)  # the config reads the same memoized string

    out = remap_locations(open_checkpoint(src), {"cuda:0": "cpu"})

    got = load(out)
    assert got["config"] == {"device": "cuda:0", "other": "cuda:0"}
    assert all(torch.equal(got["model"][k], v) for k, v in sd.items())
    assert {t.location for t in open_checkpoint(out).tensors} == {"cpu"}


def test_remap_partial_mapping_keeps_other_locations(tmp_path):
    sd = {"a": torch.randn(2), "b": torch.randn(3)}
    first = sd["a"].untyped_storage().data_ptr()
    src = tmp_path / "m.pt"
    with stored_as(fresh_cuda(lambda s: 1 if s.data_ptr() == first else 0)):
        torch.save(sd, src)
    out = remap_locations(open_checkpoint(src), {"cuda:1": "cpu"})
    assert out.name == "m.cpu.pt"
    locations = {t.name: t.location for t in open_checkpoint(out).tensors}
    assert locations == {"a": "cpu", "b": "cuda:0"}
    with pytest.raises(RuntimeError, match=CUDA_ERROR):
        load(out)
    got = load(out, map_location={"cuda:0": "cpu"})
    assert torch.equal(got["a"], sd["a"]) and torch.equal(got["b"], sd["b"])
    cpu2 = remap_locations(open_checkpoint(src), {"cuda:0": "cuda:1"})  # GPU to GPU works too
    assert cpu2.name == "m.cuda1.pt"
    assert {t.location for t in open_checkpoint(cpu2).tensors} == {"cuda:1"}


def test_remap_training_checkpoint_and_full_module(tmp_path):
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    net[0].weight.requires_grad_(False)
    # What SGD with momentum saves (a real optimizer's first step costs seconds of imports).
    optimizer = {
        "state": {
            i: {"momentum_buffer": torch.randn_like(p)} for i, p in enumerate(net.parameters())
        },
        "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0, 1, 2, 3]}],
    }
    train, full = tmp_path / "train.pt", tmp_path / "full.pt"
    with stored_as(fresh_cuda()):
        torch.save({"model": net.state_dict(), "optimizer": optimizer, "epoch": 2}, train)
        torch.save(net, full)
    out = remap_locations(open_checkpoint(train))
    got = load(out)
    assert got["epoch"] == 2
    assert all(torch.equal(got["model"][k], v) for k, v in net.state_dict().items())
    for key, state in optimizer["state"].items():
        assert all(torch.equal(got["optimizer"]["state"][key][k], v) for k, v in state.items())
    assert {t.location for t in open_checkpoint(out).tensors} == {"cpu"}

    out = remap_locations(open_checkpoint(full))
    ckpt = open_checkpoint(out)
    assert ckpt.kind == "full_module" and {t.location for t in ckpt.tensors} == {"cpu"}
    model = torch.load(out, weights_only=False)  # our own test file
    for (name, p), (_, q) in zip(model.named_parameters(), net.named_parameters()):
        assert (
            torch.equal(p, q) and p.requires_grad == q.requires_grad and p.device.type == "cpu"
        ), name


def test_remap_legacy_file(tmp_path):
    sd = state_dict()
    src = tmp_path / "legacy.pt"
    with stored_as(fresh_cuda()):
        torch.save(sd, src, _use_new_zipfile_serialization=False)
    with pytest.raises(RuntimeError, match=CUDA_ERROR):
        load(src)
    out = remap_locations(open_checkpoint(src))
    got = load(out)
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    assert got["head.weight"].data_ptr() == got["0.weight"].data_ptr()
    ckpt = open_checkpoint(out)
    assert ckpt.format == "torch-legacy" and {t.location for t in ckpt.tensors} == {"cpu"}


def test_remap_protocol_4_frames(tmp_path):
    # A pickle longer than one 64 KiB frame.
    sd = {
        f"encoder.layers.{i}.self_attention.query_key_value.weight": torch.randn(2)
        for i in range(900)
    }
    src = tmp_path / "p4.pt"
    with stored_as(fresh_cuda()):
        torch.save(sd, src, pickle_protocol=4)
    assert len(scan_storage_locations(members(src)["p4/data.pkl"]).frames) > 1
    out = remap_locations(open_checkpoint(src))
    got = torch.load(out, weights_only=False)  # weights_only has no FRAME opcode; our own file
    assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_remap_keeps_the_archive_storage_alignment(tmp_path):
    from torch.utils.serialization import config

    src = tmp_path / "a.pt"
    old = config.save.storage_alignment
    config.save.storage_alignment = 256
    try:
        with stored_as(fresh_cuda()):
            torch.save({"x": torch.randn(7), "y": torch.arange(3)}, src)
    finally:
        config.save.storage_alignment = old
    out = remap_locations(open_checkpoint(src))
    assert all(offset % 256 == 0 for offset in data_offsets(out).values())
    assert torch.equal(load(out)["y"], torch.arange(3))


def test_remap_zip64_layout(tmp_path, monkeypatch):
    """Force every member into zip64 fields, as a >4 GiB file would need; torch still reads it."""
    sd = state_dict()
    src = tmp_path / "m.pt"
    with stored_as(fresh_cuda()):
        torch.save(sd, src)
    monkeypatch.setattr(zipwriter, "ZIP64_LIMIT", 1)
    out = remap_locations(open_checkpoint(src))
    raw = out.read_bytes()
    assert raw.count(b"PK\x01\x02") == len(members(src))
    central = raw.index(b"PK\x01\x02")
    assert struct.unpack_from("<2L", raw, central + 20) == (0xFFFFFFFF, 0xFFFFFFFF)  # sizes
    second = raw.index(b"PK\x01\x02", central + 4)
    assert struct.unpack_from("<L", raw, second + 42)[0] == 0xFFFFFFFF  # local header offset
    got = load(out)
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    assert {t.location for t in open_checkpoint(out).tensors} == {"cpu"}
    assert all(offset % 64 == 0 for offset in data_offsets(out).values())


def test_remap_refusals_leave_nothing_behind(tmp_path):
    cpu = tmp_path / "cpu.pt"
    torch.save({"x": torch.randn(2)}, cpu)
    with pytest.raises(SaveError, match="nothing to write"):
        remap_locations(open_checkpoint(cpu))
    with pytest.raises(SaveError, match="not a device name"):
        remap_locations(open_checkpoint(cpu), "cpu; rm -rf /")
    with pytest.raises(SaveError, match="not a device name"):
        remap_locations(open_checkpoint(cpu), {"cuda:0": ""})
    with pytest.raises(SaveError, match="stores no device"):
        remap_locations(
            open_checkpoint(SAMPLES / "transformer.safetensors"), dest=tmp_path / "x.pt"
        )
    with pytest.raises(SaveError, match="TorchScript"):
        remap_locations(open_checkpoint(SAMPLES / "scripted_cnn.pt"), dest=tmp_path / "y.pt")
    gpu = tmp_path / "gpu.pt"
    with stored_as(fresh_cuda()):
        torch.save({"x": torch.randn(2)}, gpu)
    dest = tmp_path / "taken.pt"
    dest.write_bytes(b"keep me")
    with pytest.raises(SaveError, match="destination exists"):
        remap_locations(open_checkpoint(gpu), dest=dest)
    assert dest.read_bytes() == b"keep me"
    remap_locations(open_checkpoint(gpu), dest=dest, overwrite=True)
    assert (tmp_path / "taken.pt.bak").read_bytes() == b"keep me"
    assert torch.equal(load(dest)["x"], torch.load(gpu, map_location="cpu", weights_only=True)["x"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cpu.pt",
        "gpu.pt",
        "taken.pt",
        "taken.pt.bak",
    ]


def test_remap_copies_the_file_as_it_is_now(tmp_path):
    src = tmp_path / "m.pt"
    with stored_as(fresh_cuda()):
        torch.save({"x": torch.randn(2)}, src)
    ckpt = open_checkpoint(src)
    with stored_as(fresh_cuda()):
        torch.save({"x": torch.randn(2), "y": torch.randn(3)}, src)
    out = remap_locations(ckpt)  # the file as it is now is what gets copied (and checked)
    assert set(load(out)) == {"x", "y"}


# ----------------------------------------------------------------------------------------------
# cast_copy / preview_cast
# ----------------------------------------------------------------------------------------------
def expected(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def storage_bytes_in(path: Path) -> int:
    return sum(len(v) for k, v in members(path).items() if "/data/" in k)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_cast_state_dict_to_torch(tmp_path, dtype, monkeypatch):
    sd = state_dict()
    src = tmp_path / "model.pt"
    torch.save(sd, src)
    ckpt = open_checkpoint(src)
    monkeypatch.setattr(cast_mod, "CHUNK_BYTES", 24)  # many chunks per tensor
    before, after, changed = preview_cast(ckpt, dtype)

    out = cast_copy(ckpt, dtype)

    target = getattr(torch, dtype)
    assert out.name == f"model.{cast_mod._TAGS[dtype]}.pt"
    monkeypatch.setenv("TORCH_SERIALIZATION_DEBUG", "1")
    got = load(out)
    assert list(got) == list(sd)
    for name, tensor in sd.items():
        want = expected(tensor, target)
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    assert got["head.weight"].data_ptr() == got["0.weight"].data_ptr()
    assert (
        got["q.weight"].untyped_storage().data_ptr() == got["k.weight"].untyped_storage().data_ptr()
    )
    assert after == storage_bytes_in(out)
    storages = {}
    for name, tensor in got.items():
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = (
            storage.nbytes() // tensor.element_size() * sd[name].element_size()
        )
    assert before == sum(storages.values())
    floats = [n for n, t in sd.items() if t.is_floating_point() and t.dtype != target]
    assert changed == len(floats)
    assert all(o % 64 == 0 for o in data_offsets(out).values())
    assert no_temp_files(tmp_path)


def test_cast_preview_counts_what_is_written(tmp_path):
    sd = {"w": torch.randn(8, 8), "n": torch.tensor(3), "big": torch.randn(100)}
    sd["part"] = sd["big"][10:20]  # a view: the file keeps all 100 elements, the output only 10..99
    src = tmp_path / "m.pt"
    torch.save(sd, src)
    ckpt = open_checkpoint(src)
    assert preview_cast(ckpt, "bf16") == (64 * 4 + 8 + 100 * 4, 64 * 2 + 8 + 100 * 2, 3)
    only = {"part": torch.randn(50)[5:15]}
    torch.save(only, tmp_path / "slice.pt")
    ckpt = open_checkpoint(tmp_path / "slice.pt")
    assert preview_cast(ckpt, "fp16") == (40, 20, 1)
    out = cast_copy(ckpt, "fp16")
    assert storage_bytes_in(out) == 20
    assert torch.equal(load(out)["part"], load(tmp_path / "slice.pt")["part"].half())


def test_cast_every_dtype_sample(tmp_path):
    src = tmp_path / "dtypes.pt"
    shutil.copy(SAMPLES / "dtypes.pt", src)
    sd = load(src)
    ckpt = open_checkpoint(src)
    out = cast_copy(ckpt, "bfloat16")
    got = load(out)
    assert list(got) == list(sd)
    for name, tensor in sd.items():
        want = expected(tensor, torch.bfloat16)
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    assert preview_cast(ckpt, "bfloat16")[1] == storage_bytes_in(out)
    # Untouched float8 tensors (not chosen) keep their dtype through _rebuild_tensor_v3.
    keep = [n for n, t in sd.items() if t.dtype == torch.float32]
    out = cast_copy(ckpt, "float16", names=keep, dest=tmp_path / "some.pt")
    got = load(out)
    for name, tensor in sd.items():
        want = tensor.half() if name in keep else tensor
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name


def test_cast_names_take_tied_partners_along(tmp_path):
    sd = state_dict()
    src = tmp_path / "m.pt"
    torch.save(sd, src)
    ckpt = open_checkpoint(src)
    out = cast_copy(ckpt, "float16", names=["head.weight", "1.bias", "mask"])
    got = load(out)
    cast = {"head.weight", "0.weight", "1.bias"}
    for name, tensor in sd.items():
        want = tensor.half() if name in cast else tensor
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    assert got["head.weight"].data_ptr() == got["0.weight"].data_ptr()
    assert preview_cast(ckpt, "float16", ["head.weight", "1.bias", "mask"])[2] == 3
    with pytest.raises(SaveError, match="'nope' is not a tensor of the model"):
        cast_copy(ckpt, "float16", names=["nope"])


def test_cast_to_safetensors_clones_tied_tensors(tmp_path):
    sd = state_dict()
    src = tmp_path / "m.pt"
    torch.save(sd, src)
    ckpt = open_checkpoint(src)
    before, after, _ = preview_cast(ckpt, "bf16", fmt="safetensors")
    out = cast_copy(ckpt, "bf16", fmt="safetensors")
    assert out.name == "m.bf16.safetensors"
    got = load_file(out)
    for name, tensor in sd.items():
        want = expected(tensor, torch.bfloat16)
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    with safe_open(out, "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["mscope.tied"]) == {"head.weight": "0.weight"}
    assert metadata["format"] == "pt"
    assert after == sum(t.numel() * t.element_size() for t in got.values())
    assert before == sum(t.numel() * t.element_size() for t in sd.values())


def test_cast_safetensors_source(tmp_path):
    src = tmp_path / "w.safetensors"
    sd = {"a": torch.randn(3, 4), "n": torch.arange(6, dtype=torch.int32), "e": torch.empty(0, 2)}
    save_file(sd, src, metadata={"format": "pt", "model": "tiny"})
    ckpt = open_checkpoint(src)
    out = cast_copy(ckpt, "float16")
    assert out.name == "w.fp16.safetensors"
    got = load_file(out)
    assert all(torch.equal(got[k], expected(v, torch.float16)) for k, v in sd.items())
    with safe_open(out, "pt") as f:
        assert f.metadata() == {"format": "pt", "model": "tiny"}
    out = cast_copy(ckpt, "bfloat16", fmt="torch")
    assert out.name == "w.bf16.pt"
    assert all(torch.equal(load(out)[k], expected(v, torch.bfloat16)) for k, v in sd.items())


def test_cast_training_checkpoint_and_sharded(tmp_path):
    src = tmp_path / "train.pt"
    shutil.copy(SAMPLES / "train_checkpoint.pt", src)
    full = load(src)
    ckpt = open_checkpoint(src)
    out = cast_copy(ckpt, "bf16")
    got = load(out)
    model = full[ckpt.model_path]
    assert list(got) == list(model)
    assert all(torch.equal(got[k], expected(v, torch.bfloat16)) for k, v in model.items())

    shards = tmp_path / "hf"
    shutil.copytree(SAMPLES / "sharded_hf", shards)
    ckpt = open_checkpoint(shards)
    out = cast_copy(ckpt, "fp16")
    assert out == shards / "model.fp16.safetensors"
    parts = {}
    for f in shards.glob("model-*.safetensors"):
        parts.update(load_file(f))
    got = load_file(out)
    assert got.keys() == parts.keys()
    assert all(torch.equal(got[k], expected(v, torch.float16)) for k, v in parts.items())


def test_cast_refusals_leave_nothing_behind(tmp_path):
    for name in ("notebook_full.pt", "scripted_cnn.pt"):
        shutil.copy(SAMPLES / name, tmp_path / name)
        with pytest.raises(SaveError, match="full module|TorchScript"):
            cast_copy(open_checkpoint(tmp_path / name), "bf16")
    src = tmp_path / "m.pt"
    torch.save({"w": torch.randn(2)}, src)
    ckpt = open_checkpoint(src)
    with pytest.raises(SaveError, match="choose float32, bfloat16 or float16"):
        cast_copy(ckpt, "int8")
    with pytest.raises(SaveError, match="unknown output format"):
        cast_copy(ckpt, "bf16", fmt="onnx")
    (tmp_path / "m.bf16.pt").write_bytes(b"x")
    with pytest.raises(SaveError, match="destination exists"):
        cast_copy(ckpt, "bf16", dest=tmp_path / "m.bf16.pt")
    assert cast_copy(ckpt, "bf16").name == "m.bf16-1.pt"  # the default never takes a used name
    assert no_temp_files(tmp_path)
    assert (tmp_path / "m.bf16.pt").read_bytes() == b"x"


def test_cast_failure_midway_removes_the_temp_file(tmp_path, monkeypatch):
    src = tmp_path / "m.pt"
    torch.save({"a": torch.randn(4), "b": torch.randn(4)}, src)
    ckpt = open_checkpoint(src)
    calls = []

    def broken(data, block):
        calls.append(block.key)
        if len(calls) == 2:
            raise MscopeError("disk on fire")
        yield from original(data, block)

    original = cast_mod._block_chunks
    monkeypatch.setattr(cast_mod, "_block_chunks", broken)
    with pytest.raises(SaveError, match="disk on fire"):
        cast_copy(ckpt, "bf16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_cast_refuses_a_file_changed_since_it_was_opened(tmp_path):
    src = tmp_path / "m.pt"
    torch.save({"w": torch.randn(4)}, src)
    ckpt = open_checkpoint(src)
    torch.save({"w": torch.randn(2, 2), "v": torch.randn(3)}, src)
    with pytest.raises(SaveError, match="changed since it was opened"):
        cast_copy(ckpt, "bf16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_preview_reads_no_tensor_bytes_and_imports_no_torch():
    code = (
        "import sys; from modelscope_tui import open_checkpoint; "
        "from modelscope_tui.write.cast import preview_cast; "
        f"print(preview_cast(open_checkpoint({str(SAMPLES / 'transformer_tied.pt')!r}), 'bf16')); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    before, after, changed = ast.literal_eval(proc.stdout.strip())
    assert after * 2 == before and changed > 0
