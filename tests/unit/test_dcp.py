"""torch.distributed.checkpoint directories, against what torch.distributed.checkpoint.load gives."""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
from torch.distributed.checkpoint.filesystem import SerializationFormat
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from modelscope_tui.errors import CorruptCheckpointError, MscopeError
from modelscope_tui.readers import open_checkpoint
from modelscope_tui.values.data import TensorData

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def training_state() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "epoch": 7,
        "config": {"lr": 1e-3, "name": "run"},
        "extra": {
            "bf16": torch.randn(3, 5).to(torch.bfloat16),
            "fp16": torch.randn(6).to(torch.float16),
            "fp8": torch.randn(4, 4).to(torch.float8_e4m3fn),
            "fp8b": torch.randn(7).to(torch.float8_e5m2),
            "mask": torch.rand(9) > 0.5,
            "ids": torch.arange(5, dtype=torch.int64),
            "codes": torch.randint(-100, 100, (2, 3), dtype=torch.int8),
            "transposed": base.t(),  # saved with its storage and stride (1, 4)
            "row": base[1],
            "scalar": torch.tensor(2.5),
        },
    }


def flatten(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


def full_name(ckpt, t) -> str:
    if t.section:
        return f"{t.section}.{t.name}" if t.name else t.section
    return f"{ckpt.model_path}.{t.name}" if ckpt.model_path else t.name


def raw(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def file_bytes(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def from_file(
    path, data_offset, data_size, storage_dtype, dtype, shape, stride, storage_offset
) -> torch.Tensor:
    """The tensor a reader describes, rebuilt from plain file bytes (what TensorData must do)."""
    data = bytearray(file_bytes(Path(path), data_offset, data_size))
    assert len(data) == data_size
    flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return flat.view(getattr(torch, dtype)).as_strided(shape, stride, storage_offset)


def zeros_like_state(state):
    """A template with the right shapes for dcp.load to fill in."""
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state.contiguous())
    if isinstance(state, dict):
        return {k: zeros_like_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [zeros_like_state(v) for v in state]
    return copy.deepcopy(state)


def load_back(directory: Path, state: dict) -> dict:
    template = zeros_like_state(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(template, checkpoint_id=directory)
    return template


def save(state: dict, directory: Path, **writer) -> Path:
    planner = writer.pop("planner", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=FileSystemWriter(directory, **writer), planner=planner)
    return directory


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict]:
    state = training_state()
    return save(state, tmp_path_factory.mktemp("dcp") / "ckpt"), state


# ----------------------------------------------------------------------------------------------
def test_dcp_matches_dcp_load(saved):
    directory, state = saved
    ckpt = open_checkpoint(directory)
    assert ckpt.format == "dcp"
    loaded = flatten(load_back(directory, state))
    ours = {full_name(ckpt, t): t for t in ckpt.tensors}
    assert ours.keys() == loaded.keys()
    with TensorData() as data:
        for name, t in ours.items():
            ref = loaded[name]
            assert t.shape == tuple(ref.shape), name
            assert t.dtype == str(ref.dtype).removeprefix("torch."), name
            s = t.storage
            assert s is not None and s.file.suffix == ".distcp" and t.shard == s.file.name, name
            rebuilt = from_file(
                s.file,
                s.data_offset,
                s.data_size,
                s.dtype,
                t.dtype,
                t.shape,
                t.stride,
                t.storage_offset,
            )
            assert raw(rebuilt) == raw(ref), name
            if (
                t.is_contiguous and t.storage_offset == 0
            ):  # the common case: the range is the tensor
                assert file_bytes(s.file, s.data_offset, t.nbytes) == raw(ref), name
            assert raw(data.tensor(t)) == raw(ref), name
    assert not ckpt.problems and not ckpt.warnings


def test_dcp_sections_entries_and_globals(saved):
    directory, state = saved
    ckpt = open_checkpoint(directory)
    assert (ckpt.kind, ckpt.model_path) == ("training_checkpoint", "model")
    assert ckpt.sections["model"] == "model" and ckpt.sections["optim"] == "optimizer"
    assert {t.name for t in ckpt.model_tensors} == set(state["model"])
    assert ckpt.tensor("0.weight").kind == "parameter"
    assert ckpt.tensor("1.running_mean").kind == "buffer"
    assert ckpt.tensor("transposed", "extra").stride == (1, 4)
    entries = {e.path: e.value for e in ckpt.entries}
    assert (
        entries["epoch"] == 7 and entries["config.name"] == "run" and entries["config.lr"] == 1e-3
    )
    assert entries["optim.param_groups.0.lr"] == 1e-3
    assert all(g.safety == "safe" for g in ckpt.globals), [
        g for g in ckpt.globals if g.safety != "safe"
    ]
    assert {g.pickle for g in ckpt.globals} == {".metadata", "__0_0.distcp"}
    assert ckpt.files == [directory / ".metadata", directory / "__0_0.distcp"]
    assert ckpt.metadata["dcp_version"] == "1.0.0"


def test_reading_dcp_does_not_import_torch(saved):
    code = (
        "import sys; from modelscope_tui.readers import open_checkpoint; "
        f"c = open_checkpoint({str(saved[0])!r}); assert c.tensors and 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_flat_hf_names_stay_whole(tmp_path):
    """A flat state_dict whose keys start with "model." keeps them: load_state_dict needs them."""
    state = {"model.layers.0.weight": torch.randn(2, 2), "lm_head.weight": torch.randn(3, 2)}
    ckpt = open_checkpoint(save(state, tmp_path / "flat"))
    assert ckpt.model_path == "" and {t.name for t in ckpt.tensors} == set(state)


# -- sharded tensors ---------------------------------------------------------------------------
class SplitPlanner(DefaultSavePlanner):
    """Writes every tensor with two or more rows as two row chunks, as FSDP ranks would."""

    def create_local_plan(self):
        plan = super().create_local_plan()
        items = []
        for wi in plan.items:
            td = wi.tensor_data
            if wi.type == WriteItemType.BYTE_IO or len(td.size) == 0 or td.size[0] < 2:
                items.append(wi)
                continue
            n = td.size[0]
            for start, rows in ((0, n // 2), (n // 2, n - n // 2)):
                offsets = torch.Size([start] + [0] * (len(td.size) - 1))
                sizes = torch.Size([rows, *td.size[1:]])
                chunk = ChunkStorageMetadata(offsets=offsets, sizes=sizes)
                items.append(
                    WriteItem(
                        index=MetadataIndex(wi.index.fqn, offsets),
                        type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(
                            chunk=chunk, properties=td.properties, size=td.size
                        ),
                    )
                )
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def resolve_data(self, write_item):
        obj = self.lookup_object(MetadataIndex(write_item.index.fqn))
        if write_item.type == WriteItemType.BYTE_IO:
            return self.transform_object(write_item, obj)
        chunk = write_item.tensor_data.chunk
        for dim, (o, s) in enumerate(zip(chunk.offsets, chunk.sizes)):
            obj = obj.narrow(dim, o, s)
        return obj


@pytest.mark.parametrize("one_file", [True, False])
def test_dcp_sharded_chunks(tmp_path, one_file):
    state = {
        "w": torch.randn(5, 3),
        "e": torch.randn(4).to(torch.bfloat16),
        "b": torch.randn(1),
        "step": 3,
    }
    directory = save(
        state, tmp_path / "sharded", planner=SplitPlanner(), single_file_per_rank=one_file
    )
    loaded = load_back(directory, state)
    for name in ("w", "e", "b"):
        assert torch.equal(loaded[name], state[name])
    ckpt = open_checkpoint(directory)
    chunks = ckpt.metadata["dcp_chunks"]
    assert set(chunks) == {"w", "e"}
    for name in ("w", "e"):
        t = ckpt.tensor(name)
        assert t.storage is None and t.note == "sharded in 2 chunks"
        assert (t.shape, t.dtype) == (
            tuple(state[name].shape),
            str(state[name].dtype).removeprefix("torch."),
        )
        for c in chunks[name]:
            expected = state[name]
            for dim, (o, s) in enumerate(zip(c["offsets"], c["sizes"])):
                expected = expected.narrow(dim, o, s)
            rebuilt = from_file(c["path"], c["data_offset"], c["data_size"], c["storage_dtype"], t.dtype,
                                tuple(c["sizes"]), tuple(c["stride"]), c["storage_offset"])  # fmt: skip
            assert raw(rebuilt) == raw(expected)
    whole = ckpt.tensor("b")
    assert whole.storage is not None and file_bytes(
        whole.storage.file, whole.storage.data_offset, 4
    ) == raw(state["b"])
    distcp = sorted(directory.glob("*.distcp"))
    assert ckpt.files == [directory / ".metadata", *distcp]
    assert len(distcp) == (1 if one_file else 6)
    assert not ckpt.problems


def test_dcp_safetensors_serialization(tmp_path):
    """FileSystemWriter(serialization_format=SAFETENSORS) appends one safetensors blob per file."""
    state = {"a": torch.randn(2, 3), "h": torch.randn(4).half(), "n": 5}
    directory = save(state, tmp_path / "st", serialization_format=SerializationFormat.SAFETENSORS)
    ckpt = open_checkpoint(directory)
    for name in ("a", "h"):
        s = ckpt.tensor(name).storage
        assert file_bytes(s.file, s.data_offset, s.data_size) == raw(state[name])
    assert {e.path: e.value for e in ckpt.entries}["n"] == 5


# -- hostile and broken directories ------------------------------------------------------------
@pytest.fixture
def small(tmp_path) -> Path:
    return save({"w": torch.randn(3, 2), "b": torch.randn(3), "epoch": 1}, tmp_path / "small")


def rewrite_metadata(directory: Path, change) -> None:
    """Edit a .metadata we wrote ourselves (test-only trusted pickle)."""
    path = directory / ".metadata"
    with open(path, "rb") as fh:
        meta = pickle.load(fh)
    change(meta)
    with open(path, "wb") as fh:
        pickle.dump(meta, fh)


def retarget(directory: Path, fqn: str, relative_path: str) -> None:
    def change(meta):
        for key, info in meta.storage_data.items():
            if key.fqn == fqn:
                meta.storage_data[key] = dataclasses.replace(info, relative_path=relative_path)

    rewrite_metadata(directory, change)


@pytest.mark.parametrize(
    "target", ["../outside.distcp", "sub/../../outside.distcp", "/etc/passwd", "link.distcp"]
)
def test_dcp_path_traversal_is_refused(small, target):
    outside = small.parent / "outside.distcp"
    outside.write_bytes((small / "__0_0.distcp").read_bytes())
    if target == "link.distcp":
        os.symlink(outside, small / "link.distcp")
    retarget(small, "w", target)
    with pytest.raises(CorruptCheckpointError) as info:
        open_checkpoint(small)
    line = info.value.line()
    assert str(small / ".metadata") in line and "'w'" in line and "\n" not in line


def test_dcp_missing_distcp_file(small):
    (small / "__0_0.distcp").unlink()
    with pytest.raises(CorruptCheckpointError) as info:
        open_checkpoint(small)
    assert str(small / ".metadata") in info.value.line() and "__0_0.distcp" in info.value.line()


def test_dcp_truncated_distcp(small):
    path = small / "__0_0.distcp"
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(CorruptCheckpointError) as info:
        open_checkpoint(small)
    assert str(small) in info.value.line()
    ckpt = open_checkpoint(small, strict=False)
    assert ckpt.problems and any("runs past the end of __0_0.distcp" in p for p in ckpt.problems)
    assert {t.name for t in ckpt.tensors} == {"w", "b"}


def test_dcp_metadata_that_is_not_metadata(small):
    (small / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    with pytest.raises(CorruptCheckpointError) as info:
        open_checkpoint(small)
    assert str(small / ".metadata") in info.value.line()


def test_dcp_garbage_metadata(small):
    (small / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(MscopeError) as info:
        open_checkpoint(small)
    assert str(small / ".metadata") in info.value.line()


def test_dcp_bad_chunk_geometry(small):
    def change(meta):
        md = meta.state_dict_metadata["w"]
        md.chunks[0] = ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([4, 2]))

    rewrite_metadata(small, change)
    with pytest.raises(CorruptCheckpointError) as info:
        open_checkpoint(small)
    assert str(small / ".metadata") in info.value.line() and "'w'" in info.value.line()


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_dcp_payloads_are_reported_not_run(tmp_path):
    marker = tmp_path / "pwned"
    directory = save({"w": torch.ones(2), "hook": Payload(marker)}, tmp_path / "evil")

    def change(meta):
        meta.planner_data = Payload(marker)

    rewrite_metadata(directory, change)
    assert not marker.exists()
    ckpt = open_checkpoint(directory)
    assert not marker.exists()
    system = f"{os.system.__module__}.system"
    dangerous = {(g.qualname, g.pickle) for g in ckpt.dangerous_globals}
    assert {(system, ".metadata"), (system, "__0_0.distcp")} <= dangerous


def test_dcp_metadata_that_is_a_payload(small, tmp_path):
    marker = tmp_path / "pwned"
    (small / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CorruptCheckpointError) as info:
        open_checkpoint(small)
    assert not marker.exists()
    assert str(small / ".metadata") in info.value.line() and "system" in info.value.line()


def _dtensor_rank(rank: int, world: int, store: str, directory: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        state = {
            "model": {
                "w": distribute_tensor(dtensor_state()["w"], mesh, [Shard(0)]),
                "c": distribute_tensor(dtensor_state()["c"], mesh, [Shard(0)]),
                "b": distribute_tensor(dtensor_state()["b"], mesh, [Replicate()]),
            },
            "step": 4,
        }
        dcp.save(state, checkpoint_id=directory)
    finally:
        dist.destroy_process_group()


def dtensor_state() -> dict[str, torch.Tensor]:
    return {
        "w": torch.arange(30, dtype=torch.float32).reshape(6, 5),
        "c": torch.arange(7, dtype=torch.float16),
        "b": torch.ones(3, dtype=torch.bfloat16),
    }


def test_dcp_real_two_rank_dtensor_save(tmp_path):
    """Two gloo ranks save row-sharded DTensors, as FSDP2 does: one .distcp per rank."""
    import torch.multiprocessing as mp

    directory = tmp_path / "fsdp"
    args = (2, str(tmp_path / "store"), str(directory))
    # fork: the children inherit the imported torch (spawn would spend seconds importing it again)
    ctx = mp.start_processes(_dtensor_rank, args=args, nprocs=2, start_method="fork", join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the two ranks did not finish within 120 s")
    ckpt = open_checkpoint(directory)
    assert ckpt.model_path == "model"
    assert ckpt.files == [
        directory / ".metadata",
        directory / "__0_0.distcp",
        directory / "__1_0.distcp",
    ]
    expected = dtensor_state()
    for name in ("w", "c"):
        t = ckpt.tensor(name)
        assert (t.shape, t.storage, t.note) == (
            tuple(expected[name].shape),
            None,
            "sharded in 2 chunks",
        )
        chunks = ckpt.metadata["dcp_chunks"][f"model.{name}"]
        assert [c["file"] for c in chunks] == ["__0_0.distcp", "__1_0.distcp"]
        for c in chunks:
            part = expected[name].narrow(0, c["offsets"][0], c["sizes"][0])
            rebuilt = from_file(c["path"], c["data_offset"], c["data_size"], c["storage_dtype"], t.dtype,
                                tuple(c["sizes"]), tuple(c["stride"]), c["storage_offset"])  # fmt: skip
            assert raw(rebuilt) == raw(part)
    b = ckpt.tensor("b")
    assert file_bytes(b.storage.file, b.storage.data_offset, 6) == raw(expected["b"])
    assert not ckpt.problems
