"""safetensors files and sharded HF checkpoints, against what safetensors/torch themselves load."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelscope_tui.errors import CorruptCheckpointError, MscopeError, UnsupportedFormatError
from modelscope_tui.readers import open_checkpoint
from modelscope_tui.readers.safetensors import natural_key, read_safetensors
from modelscope_tui.values.data import TensorData


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(10, 8, generator=g),
        "layers.0.attn.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "layers.0.attn.bias": torch.randn(8, generator=g).to(torch.float16),
        "layers.0.mlp.weight": torch.randn(16, 8, generator=g).to(torch.float8_e4m3fn),
        "layers.0.mlp.scale": torch.randn(4, generator=g).to(torch.float8_e5m2),
        "layers.0.norm.running_mean": torch.randn(8, generator=g).double(),
        "mask": torch.rand(3, 5, generator=g) > 0.5,
        "position_ids": torch.arange(12, dtype=torch.int64).reshape(1, 12),
        "codes": torch.randint(-128, 127, (7,), dtype=torch.int8, generator=g),
        "bytes": torch.randint(0, 255, (5,), dtype=torch.uint8, generator=g),
        "ids32": torch.arange(6, dtype=torch.int32),
        "u16": torch.arange(4, dtype=torch.int32).to(torch.uint16),
        "cplx": torch.randn(3, dtype=torch.complex64, generator=g),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5),
    }


def raw(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def file_bytes(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def assert_matches(ckpt, expected: dict[str, torch.Tensor], full_names: bool = True) -> None:
    """Every record has torch's name/shape/dtype, and its file bytes are torch's bytes."""
    assert {t.name for t in ckpt.tensors} == set(expected)
    with TensorData() as data:
        for t in ckpt.tensors:
            ref = expected[t.name]
            assert t.shape == tuple(ref.shape), t.name
            assert t.dtype == str(ref.dtype).removeprefix("torch."), t.name
            s = t.storage
            assert s is not None and s.data_size == ref.numel() * ref.element_size(), t.name
            assert file_bytes(s.file, s.data_offset, s.data_size) == raw(ref), t.name
            assert raw(data.tensor(t)) == raw(ref), t.name


# ----------------------------------------------------------------------------------------------
# single safetensors files
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def st_file(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(tensors(), path, metadata={"format": "pt", "note": "hello"})
    return path


def test_safetensors_matches_load_file(st_file):
    ckpt = open_checkpoint(st_file)
    assert ckpt.format == "safetensors"
    assert ckpt.files == [st_file]
    assert_matches(ckpt, load_file(st_file))
    assert ckpt.metadata["safetensors_metadata"] == {"format": "pt", "note": "hello"}
    assert {(e.path, e.value) for e in ckpt.entries} == {
        ("__metadata__.format", "pt"),
        ("__metadata__.note", "hello"),
    }
    kinds = {t.name: t.kind for t in ckpt.tensors}
    assert kinds["embed.weight"] == "parameter"
    assert kinds["layers.0.norm.running_mean"] == "buffer"
    assert kinds["position_ids"] == "buffer"
    assert ckpt.tensor("layers.0.attn.weight").stride == (8, 1)
    assert not ckpt.problems


def test_safetensors_lists_every_header_tensor_in_name_order(st_file):
    """The writer's header order (dtype size, then name) carries no information: every tensor
    is listed once, in numeric name order (see test_layers_are_listed_in_numeric_order)."""
    ckpt = open_checkpoint(st_file)
    with open(st_file, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    names = [t.name for t in ckpt.tensors]
    assert sorted(names) == sorted(k for k in header if k != "__metadata__")
    assert names == sorted(names, key=natural_key)


def test_safetensors_directory_with_one_file(st_file):
    ckpt = open_checkpoint(st_file.parent)
    assert ckpt.format == "safetensors" and len(ckpt.tensors) == len(tensors())


def test_reading_does_not_import_torch(st_file, tmp_path):
    code = (
        "import sys; from modelscope_tui.readers import open_checkpoint; "
        f"c = open_checkpoint({str(st_file)!r}); "
        "assert c.tensors and 'torch' not in sys.modules and 'safetensors' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- hand-made headers ---------------------------------------------------------------------------
def write_raw(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def f32(shape, begin, end):
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


def test_gaps_between_tensors_are_fine(tmp_path):
    path = write_raw(
        tmp_path / "gaps.safetensors",
        {"a": f32([2], 0, 8), "b": f32([1], 16, 20)},
        bytes(range(20)),
    )
    ckpt = open_checkpoint(path)
    b = ckpt.tensor("b")
    header_len = len(json.dumps({"a": f32([2], 0, 8), "b": f32([1], 16, 20)}))
    assert b.storage.data_offset == 8 + header_len + 16 and b.storage.data_size == 4


def test_header_padding_and_empty_header(tmp_path):
    ckpt = open_checkpoint(write_raw(tmp_path / "empty.safetensors", b"{}      "))
    assert ckpt.tensors == [] and ckpt.format == "safetensors"


def test_f4_and_f8_e8m0_codes(tmp_path):
    header = {
        "packed": {"dtype": "F4", "shape": [3, 4], "data_offsets": [0, 6]},
        "scales": {"dtype": "F8_E8M0", "shape": [3], "data_offsets": [6, 9]},
        "six": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [9, 12]},
    }
    ckpt = open_checkpoint(write_raw(tmp_path / "q.safetensors", header, bytes(12)))
    packed = ckpt.tensor("packed")
    assert (packed.dtype, packed.shape, packed.storage.data_size) == ("float4_e2m1fn_x2", (3, 2), 6)
    assert ckpt.tensor("scales").dtype == "float8_e8m0fnu"
    six = ckpt.tensor("six")
    assert six.storage is None and "no torch equivalent" in six.note


BAD_HEADERS = {
    "bad json": (b'{"a": ', b""),
    "not an object": (b'["a", 1]', b""),
    "unknown dtype": ({"a": {"dtype": "F31", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
    "shape not a list": ({"a": {"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}}, bytes(16)),
    "negative shape": ({"a": f32([-1, 2], 0, 8)}, bytes(8)),
    "float shape": ({"a": f32([2.0], 0, 8)}, bytes(8)),
    "bool shape": ({"a": f32([True], 0, 4)}, bytes(4)),
    "string offsets": ({"a": f32([1], "0", "4")}, bytes(4)),
    "negative offsets": ({"a": f32([1], -4, 0)}, bytes(4)),
    "three offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, bytes(8)),
    "reversed offsets": ({"a": f32([0], 4, 0)}, bytes(4)),
    "size mismatch": ({"a": f32([2, 3], 0, 20)}, bytes(24)),
    "past end of file": ({"a": f32([4], 0, 16)}, bytes(8)),
    "overlap": ({"a": f32([2], 0, 8), "b": f32([2], 4, 12)}, bytes(12)),
    "duplicate name": (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                       b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', bytes(4)),
    "entry not an object": ({"a": [1, 2]}, b""),
    "metadata not strings": ({"__metadata__": {"epoch": 3}}, b""),
    "missing dtype": ({"a": {"shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_headers_raise_corrupt(tmp_path, case):
    header, data = BAD_HEADERS[case]
    path = write_raw(tmp_path / "bad.safetensors", header, data)
    # a header that does not start with '{' is not sniffed as safetensors at all
    read = open_checkpoint if case != "not an object" else read_safetensors
    with pytest.raises(CorruptCheckpointError) as info:
        read(path)
    line = info.value.line()
    assert str(path) in line and "\n" not in line


@pytest.mark.parametrize("length", [1, 10_000, (100 << 20) + 1, 1 << 63])
def test_impossible_header_length(tmp_path, length):
    path = write_raw(tmp_path / "len.safetensors", b'{"a": 1}', length=length)
    with pytest.raises(CorruptCheckpointError) as info:
        open_checkpoint(path)
    assert str(path) in info.value.line()


# ----------------------------------------------------------------------------------------------
# sharded checkpoints
# ----------------------------------------------------------------------------------------------
def write_index(directory: Path, name: str, weight_map: dict, total_size=None) -> Path:
    doc: dict = {"weight_map": weight_map}
    if total_size is not None:
        doc["metadata"] = {"total_size": total_size}
    path = directory / name
    path.write_text(json.dumps(doc, indent=2, sort_keys=True))
    return path


def split(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    names = list(state)
    return [{k: state[k] for k in names[i::n]} for i in range(n)]


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


@pytest.fixture
def st_sharded(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = tensors()
    weight_map = {}
    for i, part in enumerate(split(state, 3), 1):
        name = f"model-{i:05d}-of-00003.safetensors"
        save_file(part, tmp_path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    return write_index(tmp_path, "model.safetensors.index.json", weight_map, nbytes(state)), state


@pytest.fixture
def bin_sharded(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = tensors()
    weight_map = {}
    for i, part in enumerate(split(state, 2), 1):
        name = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save(part, tmp_path / name)
        weight_map.update(dict.fromkeys(part, name))
    return write_index(tmp_path, "pytorch_model.bin.index.json", weight_map, nbytes(state)), state


def test_sharded_safetensors_matches(st_sharded):
    index, state = st_sharded
    ckpt = open_checkpoint(index)
    assert ckpt.format == "sharded-safetensors"
    loaded = {}
    for shard in sorted(index.parent.glob("*.safetensors")):
        part = load_file(shard)
        loaded.update(part)
        for name in part:
            assert ckpt.tensor(name).shard == shard.name
    assert loaded.keys() == state.keys()
    assert_matches(ckpt, loaded)
    assert ckpt.files == [index, *sorted(index.parent.glob("*.safetensors"))]
    assert ckpt.metadata["total_size"] == nbytes(state)
    assert ckpt.metadata["shards"] == 3
    assert ckpt.metadata["safetensors_metadata"] == {"format": "pt"}
    assert not ckpt.warnings and not ckpt.problems


def test_sharded_directory_prefers_safetensors_index(st_sharded, bin_sharded):
    ckpt = open_checkpoint(st_sharded[0].parent)
    assert ckpt.format == "sharded-safetensors" and len(ckpt.tensors) == len(tensors())


def test_sharded_torch_matches(bin_sharded):
    index, state = bin_sharded
    ckpt = open_checkpoint(index)
    assert ckpt.format == "sharded-torch"
    loaded = {}
    for shard in sorted(index.parent.glob("*.bin")):
        part = torch.load(shard, weights_only=True)
        loaded.update(part)
        for name in part:
            assert ckpt.tensor(name).shard == shard.name
    assert_matches(ckpt, loaded)
    assert ckpt.metadata["shards"] == 2
    assert len(ckpt.files) == 3
    pickles = {g.qualname: g.pickle for g in ckpt.globals}
    assert (
        pickles["torch._utils._rebuild_tensor_v2"]
        == "pytorch_model-00001-of-00002.bin, pytorch_model-00002-of-00002.bin"
    )
    assert all(g.safety == "safe" for g in ckpt.globals)
    assert not ckpt.warnings and not ckpt.problems


def test_sharded_torch_tied_weights_and_storage_size(tmp_path):
    w = torch.randn(4, 3)
    part1 = {"embed.weight": w, "lm_head.weight": w}  # tied: one storage, counted once by HF
    part2 = {"norm.weight": torch.ones(3)}
    torch.save(part1, tmp_path / "a.bin")
    torch.save(part2, tmp_path / "b.bin")
    weight_map = {"embed.weight": "a.bin", "lm_head.weight": "a.bin", "norm.weight": "b.bin"}
    index = write_index(tmp_path, "pytorch_model.bin.index.json", weight_map, 48 + 12)
    ckpt = open_checkpoint(index)
    assert not ckpt.warnings
    assert ckpt.tensor("lm_head.weight").tied_to == "embed.weight"


def test_hf_cache_snapshot_symlinks_are_accepted(tmp_path):
    repo = tmp_path / "models--org--name"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    state = {"w": torch.ones(2, 2)}
    save_file(state, blobs / "1111")
    (blobs / "2222").write_text(
        json.dumps({"metadata": {"total_size": 16}, "weight_map": {"w": "model-1.safetensors"}})
    )
    os.symlink("../../blobs/1111", snap / "model-1.safetensors")
    os.symlink("../../blobs/2222", snap / "model.safetensors.index.json")
    ckpt = open_checkpoint(snap)
    assert ckpt.format == "sharded-safetensors"
    assert_matches(ckpt, state)


def test_total_size_mismatch_is_a_warning(st_sharded):
    index, state = st_sharded
    doc = json.loads(index.read_text())
    doc["metadata"]["total_size"] = nbytes(state) + 1
    index.write_text(json.dumps(doc))
    ckpt = open_checkpoint(index)
    assert any("total_size" in w for w in ckpt.warnings)


def test_tensor_not_in_weight_map_is_a_warning(st_sharded):
    index, _ = st_sharded
    doc = json.loads(index.read_text())
    del doc["weight_map"]["codes"]
    del doc["metadata"]
    index.write_text(json.dumps(doc))
    ckpt = open_checkpoint(index)
    assert ckpt.tensor("codes") is not None
    assert any("'codes'" in w and "weight_map" in w for w in ckpt.warnings)


def test_config_json_is_not_an_index(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": 8}')
    with pytest.raises(UnsupportedFormatError) as info:
        open_checkpoint(path)
    assert str(path) in info.value.line()


def break_index(index: Path, case: str) -> str:
    """Damage a good 3-shard safetensors checkpoint; returns text the error must mention."""
    doc = json.loads(index.read_text())
    mention = _break(index, doc, case)
    index.write_text(json.dumps(doc))
    return mention


def _break(index: Path, doc: dict, case: str) -> str:
    wm = doc["weight_map"]
    first = "model-00001-of-00003.safetensors"
    if case == "dotdot":
        wm["embed.weight"] = "../" + first
        return "'..'"
    if case == "dotdot-inside":
        (index.parent / "sub").mkdir()
        wm["embed.weight"] = "sub/../" + first
        return "'..'"
    if case == "absolute":
        wm["embed.weight"] = str(index.parent / first)
        return "absolute"
    if case == "symlink-out":
        outside = index.parent.parent / "outside.safetensors"
        save_file({"embed.weight": torch.zeros(1)}, outside)
        os.symlink(outside, index.parent / "evil.safetensors")
        wm["embed.weight"] = "evil.safetensors"
        return "outside"
    if case == "missing-shard":
        (index.parent / first).unlink()
        return first
    if case == "absent-tensor":
        wm["ghost.weight"] = first
        return "ghost.weight"
    if case == "two-shards":
        save_file({"embed.weight": torch.zeros(1)}, index.parent / "extra.safetensors")
        wm["other"] = "extra.safetensors"
        save_file(
            {"embed.weight": torch.zeros(1), "other": torch.zeros(1)},
            index.parent / "extra.safetensors",
        )
        return "two shards"
    if case == "bad-total":
        doc["metadata"]["total_size"] = "12GB"
        return "total_size"
    if case == "bad-weight-map":
        doc["weight_map"] = {"a": 3}
        return "weight_map"
    if case == "corrupt-shard":
        shard = index.parent / first
        shard.write_bytes(shard.read_bytes()[:-3])
        return first
    if case == "shard-is-json":
        (index.parent / "inner.json").write_text("{}")
        wm["embed.weight"] = "inner.json"
        return "inner.json"
    raise AssertionError(case)


SHARD_CASES = ["dotdot", "dotdot-inside", "absolute", "symlink-out", "missing-shard", "absent-tensor",
               "two-shards", "bad-total", "bad-weight-map", "corrupt-shard"]  # fmt: skip


@pytest.mark.parametrize("case", SHARD_CASES)
def test_bad_sharded_checkpoints_raise_corrupt(st_sharded, case):
    index, _ = st_sharded
    mention = break_index(index, case)
    with pytest.raises(CorruptCheckpointError) as info:
        open_checkpoint(index)
    line = info.value.line()
    assert str(index) in line and mention in line and "\n" not in line


def test_shard_that_is_not_a_weights_file(st_sharded):
    index, _ = st_sharded
    mention = break_index(index, "shard-is-json")
    with pytest.raises(MscopeError) as info:
        open_checkpoint(index)
    assert str(index) in info.value.line() and mention in info.value.line()


def test_layers_are_listed_in_numeric_order(tmp_path):
    """The safetensors writer sorts its header by dtype size, then name (layers.10 before
    layers.2, an fp16 bias after every fp32 weight); mscope lists names in numeric order, while a
    header in another order (not written that way) keeps its own."""
    sd = {f"layers.{i}.w": torch.zeros(2) for i in [3, 0, 11, 2, 1, 10]}
    sd["a.bias"] = torch.zeros(1, dtype=torch.float16)
    save_file(sd, tmp_path / "m.safetensors")
    names = [t.name for t in open_checkpoint(tmp_path / "m.safetensors").tensors]
    assert names == ["a.bias"] + [f"layers.{i}.w" for i in (0, 1, 2, 3, 10, 11)]

    header = json.dumps(
        {"z.w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
         "b.w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    ).encode()  # fmt: skip
    (tmp_path / "kept.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    assert [t.name for t in open_checkpoint(tmp_path / "kept.safetensors").tensors] == ["z.w", "b.w"]


def test_sharded_safetensors_in_numeric_order_across_shards(tmp_path):
    shards = {
        "model-00001-of-00002.safetensors": {f"model.layers.{i}.w": torch.ones(2) for i in (0, 1, 10)},
        "model-00002-of-00002.safetensors": {f"model.layers.{i}.w": torch.ones(2) for i in (2, 11)},
    }
    weight_map = {}
    for shard, tensors in shards.items():
        save_file(tensors, tmp_path / shard)
        weight_map.update(dict.fromkeys(tensors, shard))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    ckpt = open_checkpoint(tmp_path)
    assert [t.name for t in ckpt.tensors] == [f"model.layers.{i}.w" for i in (0, 1, 2, 10, 11)]
    assert ckpt.tensor("model.layers.2.w").shard == "model-00002-of-00002.safetensors"
