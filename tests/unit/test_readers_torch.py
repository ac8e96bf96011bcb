"""The torch-format readers against torch itself: names, shapes, dtypes, flags, sharing, bytes."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from modelscope_tui import open_checkpoint
from modelscope_tui.checkpoint import BUFFER, PARAMETER
from modelscope_tui.values.data import TensorData

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"

DICT_SAMPLES = [
    "cnn_state_dict.pt",
    "transformer_tied.pt",
    "train_checkpoint.pt",
    "lightning.ckpt",
    "legacy_cnn.pt",
    "legacy_train_checkpoint.pt",
    "dtypes.pt",
]


def full_path(ckpt, t) -> str:
    if t.section:
        return f"{t.section}.{t.name}"
    return f"{ckpt.model_path}.{t.name}" if ckpt.model_path else t.name


def flatten(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a torch.load result, keyed the way mscope names them."""
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


def raw(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a tensor, so NaNs and fp8 compare exactly."""
    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)


def assert_same_tensor(ours: torch.Tensor, theirs: torch.Tensor, name: str) -> None:
    assert ours.dtype == theirs.dtype, name
    assert ours.shape == theirs.shape, name
    assert torch.equal(raw(ours), raw(theirs)), name


@pytest.mark.parametrize("sample", DICT_SAMPLES)
def test_dict_checkpoints_match_torch(sample):
    path = SAMPLES / sample
    ckpt = open_checkpoint(path)
    expected = flatten(torch.load(path, weights_only=True, map_location="cpu"))
    ours = {full_path(ckpt, t): t for t in ckpt.tensors}
    assert set(ours) == set(expected)
    with TensorData() as data:
        for name, record in ours.items():
            ref = expected[name]
            assert record.shape == tuple(ref.shape), name
            assert record.dtype == str(ref.dtype).removeprefix("torch."), name
            assert record.stride == ref.stride(), name
            assert record.storage_offset == ref.storage_offset(), name
            assert record.requires_grad == ref.requires_grad, name
            assert_same_tensor(data.tensor(record), ref, name)
            view = data.tensor(record, copy=False)
            assert view.stride() == ref.stride(), name


@pytest.mark.parametrize("sample", DICT_SAMPLES)
def test_shared_storages_match_torch(sample):
    path = SAMPLES / sample
    ckpt = open_checkpoint(path)
    loaded = flatten(torch.load(path, weights_only=True, map_location="cpu"))
    by_storage: dict[int, list[str]] = {}
    for name, tensor in loaded.items():
        by_storage.setdefault(tensor.untyped_storage().data_ptr(), []).append(name)
    torch_groups = sorted(sorted(g) for g in by_storage.values() if len(g) > 1)
    ours: dict[int, list[str]] = {}
    for t in ckpt.tensors:
        ours.setdefault(id(t.storage), []).append(full_path(ckpt, t))
    our_groups = sorted(sorted(g) for g in ours.values() if len(g) > 1)
    assert our_groups == torch_groups


def test_tied_embedding_counts_once():
    ckpt = open_checkpoint(SAMPLES / "transformer_tied.pt")
    head = ckpt.tensor("lm_head.weight")
    assert head.alias_of == "embed.weight"
    totals = ckpt.totals()
    unique = {id(t.storage): t.numel for t in ckpt.model_tensors if t.kind == PARAMETER}
    assert totals.parameters == sum(unique.values())


def test_training_checkpoint_sections():
    ckpt = open_checkpoint(SAMPLES / "train_checkpoint.pt")
    loaded = torch.load(SAMPLES / "train_checkpoint.pt", weights_only=True)
    assert ckpt.kind == "training_checkpoint" and ckpt.model_path == "model"
    assert {t.name for t in ckpt.model_tensors} == set(loaded["model"])
    optimizer = [t for t in ckpt.tensors if t.section == "optimizer"]
    assert len(optimizer) == len(flatten(loaded["optimizer"]))
    assert ckpt.sections["optimizer"] == "optimizer"
    entries = {e.path: e.value for e in ckpt.entries}
    assert entries["epoch"] == loaded["epoch"]
    assert entries["best_acc"] == loaded["best_acc"]
    assert entries["config.arch"] == loaded["config"]["arch"]
    totals = ckpt.totals()
    assert totals.sections["optimizer"]["tensors"] == len(optimizer)
    assert totals.tensors == len(loaded["model"])


def test_lightning_checkpoint():
    ckpt = open_checkpoint(SAMPLES / "lightning.ckpt")
    loaded = torch.load(SAMPLES / "lightning.ckpt", weights_only=True)
    assert ckpt.kind == "lightning" and ckpt.model_path == "state_dict"
    assert {t.name for t in ckpt.model_tensors} == set(loaded["state_dict"])
    assert ckpt.sections["optimizer_states"] == "optimizer"
    entries = {e.path: e.value for e in ckpt.entries}
    assert entries["global_step"] == loaded["global_step"]
    assert entries["pytorch-lightning_version"] == loaded["pytorch-lightning_version"]
    for key, value in loaded["hyper_parameters"].items():
        if isinstance(value, (int, float, str)):
            assert entries[f"hyper_parameters.{key}"] == value


def test_torchscript_matches_jit_load():
    path = SAMPLES / "scripted_cnn.pt"
    ckpt = open_checkpoint(path)
    module = torch.jit.load(str(path))  # only the test runs the archive's code, to compare
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    ours = {t.name: t for t in ckpt.model_tensors}
    assert {n for n, t in ours.items() if t.kind == PARAMETER} == set(params)
    assert {n for n, t in ours.items() if t.kind == BUFFER} == set(buffers)
    with TensorData() as data:
        for name, p in params.items():
            assert ours[name].requires_grad == p.requires_grad, name
            assert ours[name].trainable == p.requires_grad, name
            assert_same_tensor(data.tensor(ours[name]), p, name)
        for name, b in buffers.items():
            assert_same_tensor(data.tensor(ours[name]), b, name)
    classes = {n.name: n.class_name for n in ckpt.tree.walk()}
    for name, sub in module.named_modules():
        assert classes[name] == sub.original_name, name
    assert all(g.safety == "safe" for g in ckpt.globals)


MODEL_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.ln = nn.LayerNorm(d)
            self.fc = nn.Linear(d, 2 * d)
            self.register_buffer("scale", torch.full((d,), 0.5))
            self.register_buffer("cache", torch.zeros(2), persistent=False)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 8)
            self.blocks = nn.ModuleList([Block(8) for _ in range(2)])
            self.bn = nn.BatchNorm1d(16)
            self.head = nn.Linear(8, 11, bias=False)
            self.head.weight = self.embed.weight
            self.temperature = 0.7
    """
)


@pytest.fixture
def vanished_model(tmp_path, monkeypatch):
    """A full-module pickle whose defining package is deleted before we read it."""
    pkg = tmp_path / "src" / "mscope_vanishing_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(MODEL_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    mod = importlib.import_module("mscope_vanishing_pkg.models")
    torch.manual_seed(0)
    model = mod.Net()
    model.blocks[0].fc.weight.requires_grad_(False)
    model.bn.eval()
    target = tmp_path / "full.pt"
    torch.save(model, target)
    for name in [m for m in sys.modules if m.startswith("mscope_vanishing_pkg")]:
        del sys.modules[name]
    for f in pkg.iterdir():
        f.unlink()
    pkg.rmdir()
    return target, model


def test_full_module_without_its_class(vanished_model):
    path, model = vanished_model
    ckpt = open_checkpoint(path)
    assert "mscope_vanishing_pkg" not in sys.modules
    assert ckpt.kind == "full_module" and ckpt.has_real_hierarchy
    ours = {t.name: t for t in ckpt.model_tensors}
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    assert {n for n, t in ours.items() if t.kind == PARAMETER} == set(params)
    assert {n for n, t in ours.items() if t.kind == BUFFER} == set(buffers)
    with TensorData() as data:
        for name, p in params.items():
            assert ours[name].requires_grad == p.requires_grad, name
            assert_same_tensor(data.tensor(ours[name]), p, name)
        for name, b in buffers.items():
            assert_same_tensor(data.tensor(ours[name]), b, name)
    assert ours["blocks.0.fc.weight"].trainable is False
    assert ours["blocks.1.fc.weight"].trainable is True
    assert ours["blocks.0.cache"].persistent is False
    assert ours["head.weight"].alias_of == "embed.weight"
    nodes = {n.name: n for n in ckpt.tree.walk()}
    for name, sub in model.named_modules():
        cls = type(sub)
        assert nodes[name].class_path == f"{cls.__module__}.{cls.__qualname__}", name
        assert nodes[name].training == sub.training, name
    assert nodes[""].attributes["temperature"] == 0.7
    assert nodes["blocks.0.fc"].attributes["in_features"] == 8
    assert nodes["blocks.0.fc"].attributes["out_features"] == 16
    assert nodes["bn"].attributes["eps"] == model.bn.eps
    unsafe = {g.qualname for g in ckpt.unsafe_globals}
    assert "mscope_vanishing_pkg.models.Net" in unsafe
    assert "torch.nn.modules.linear.Linear" in unsafe
    assert not ckpt.dangerous_globals


def test_notebook_and_gone_samples():
    notebook = open_checkpoint(SAMPLES / "notebook_full.pt")
    assert notebook.tree.class_path == "__main__.Net"
    frozen = [t.name for t in notebook.model_tensors if t.kind == PARAMETER and not t.trainable]
    assert frozen and all(name.startswith("stem.0.") for name in frozen)
    gone = open_checkpoint(SAMPLES / "gone_module_full.pt")
    assert gone.tree.class_path.startswith("mscope_gone_models.")
    with pytest.raises(ImportError):
        importlib.import_module(gone.tree.class_path.rsplit(".", 1)[0])


def test_legacy_matches_zip():
    zipped = open_checkpoint(SAMPLES / "cnn_state_dict.pt")
    legacy = open_checkpoint(SAMPLES / "legacy_cnn.pt")
    assert legacy.format == "torch-legacy" and zipped.format == "torch-zip"
    with TensorData() as data:
        for a, b in zip(zipped.tensors, legacy.tensors, strict=True):
            assert (a.name, a.shape, a.dtype) == (b.name, b.shape, b.dtype)
            assert torch.equal(raw(data.tensor(a)), raw(data.tensor(b)))


def test_stored_location_is_reported(tmp_path):
    # Saved "on" another device: rewrite the location string the way a CUDA save records it.
    path = tmp_path / "gpu.pt"
    torch.save({"w": torch.ones(3)}, path)
    blob = path.read_bytes().replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:1", 1)
    # the zip directory stores the member size; rebuild the archive with the edited pickle instead
    import zipfile

    with zipfile.ZipFile(path) as src:
        members = {i.filename: src.read(i.filename) for i in src.infolist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = members[pkl].replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:1")
    out = tmp_path / "gpu2.pt"
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for name, data in members.items():
            dst.writestr(name, data)
    del blob
    ckpt = open_checkpoint(out)
    assert ckpt.tensor("w").location == "cuda:1"
    assert ckpt.totals().bytes_by_location == {"cuda:1": 12}


def test_reading_leaves_no_archive_behind(tmp_path):
    """`mscope summary` runs with gc disabled: a reference cycle through the storage table kept
    the archive and its directory (100k entries in a big state_dict) alive to the end."""
    import gc

    from modelscope_tui.readers.ziparchive import ZipArchive

    path = tmp_path / "sd.pt"
    torch.save({f"l{i}.weight": torch.ones(2) * i for i in range(50)}, path)
    enabled = gc.isenabled()
    gc.disable()
    try:
        gc.collect()
        ckpt = open_checkpoint(path)
        alive = [o for o in gc.get_objects() if isinstance(o, ZipArchive)]
    finally:
        if enabled:
            gc.enable()
    assert alive == []
    assert [s.data_offset is not None for s in {id(t.storage): t.storage for t in ckpt.tensors}.values()] == [True] * 50
