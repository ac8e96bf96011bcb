"""Records that lie after they were validated (issue #12, section 1).

The pickle's BUILD opcode runs `__setstate__` (or writes attributes) on whatever is on top of the
stack: a tensor record, a storage record, or the very class or function find_class returned.
These files are built opcode by opcode (craft.py) and try every spelling of the state; the
records must come out exactly as validated, and the attempt must be reported as dangerous.
Then the point-of-use checks: records built with numbers the readers would never accept (as a
bug or a future reader might) must be refused where the bytes are used, never read out of bounds.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from craft import BUILD, build_state, glob, state_pickle, storage, tensor, torch_zip  # noqa: E402

from modelscope_tui.audit.runner import run_audit  # noqa: E402
from modelscope_tui.checkpoint import StorageRecord, TensorRecord  # noqa: E402
from modelscope_tui.diff.stream import diff_checkpoints  # noqa: E402
from modelscope_tui.errors import TensorDataError  # noqa: E402
from modelscope_tui.readers import open_checkpoint  # noqa: E402
from modelscope_tui.values import kernels  # noqa: E402
from modelscope_tui.values.data import TensorData  # noqa: E402
from modelscope_tui.values.stream import tensor_stats  # noqa: E402

VALUES = (1.0, 2.0, 3.0, 4.0)
DATA = struct.pack("<4f", *VALUES)
SPELLINGS = ("dict", "slots", "tuple2")


def _write(tmp_path: Path, name: str, value: bytes) -> Path:
    return torch_zip(tmp_path / f"{name}.pt", state_pickle({"w": value}), {"0": DATA})


def _attack(where: str, attrs: dict, spelling: str) -> bytes:
    change = build_state(attrs, spelling) + BUILD
    if where == "tensor":
        return tensor(storage("0", 4), 0, (4,), (1,), after=change)
    if where == "storage":
        return tensor(storage("0", 4, after=change), 0, (4,), (1,))
    if where == "class":
        return tensor(storage("0", 4), 0, (4,), (1,), on_class=change)
    raise AssertionError(where)


ATTACKS = [
    ("tensor", {"storage_offset": -2}),
    ("tensor", {"storage_offset": 1 << 40, "stride": 5}),
    ("tensor", {"shape": 7, "numel": 1 << 40}),
    ("storage", {"file": "/etc/passwd", "data_offset": 0}),
    ("storage", {"data_offset": -64, "numel": 1 << 20}),
    ("storage", {"dtype": "float64", "data_size": 1 << 40}),
    ("class", {"storage_offset": 3}),
    ("class", {"__init__": "x"}),
]


def test_benign_twin_is_what_torch_loads(tmp_path):
    path = _write(tmp_path, "ok", tensor(storage("0", 4), 0, (4,), (1,)))
    assert torch.load(path, weights_only=True)["w"].tolist() == list(VALUES)
    ckpt = open_checkpoint(path)
    assert not [g for g in ckpt.globals if g.safety != "safe"]


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize(("where", "attrs"), ATTACKS)
def test_build_cannot_rewrite_a_record(tmp_path, where, attrs, spelling):
    path = _write(tmp_path, "attack", _attack(where, attrs, spelling))
    ckpt = open_checkpoint(path)  # strict: nothing the reader validated became a problem
    (t,) = ckpt.tensors
    assert (t.shape, t.stride, t.storage_offset, t.numel) == ((4,), (1,), 0, 4)
    s = t.storage
    assert (s.file, s.dtype, s.numel, s.data_size) == (path, "float32", 4, 16)
    assert s.data_offset == path.read_bytes().index(DATA)
    refused = [g for g in ckpt.globals if g.name.endswith("__setstate__")]
    assert [g.safety for g in refused] == ["dangerous"]
    assert refused[0].calls and next(iter(attrs)) in refused[0].calls[0]
    report = run_audit(ckpt, stats=True)
    assert report.stats["w"].mean == pytest.approx(2.5)  # the archive's bytes, never another file's
    assert report.loadability["weights_only"] is False
    assert "__setstate__" in " ".join(report.loadability["dangerous_globals"])


def test_build_on_the_class_does_not_leak_into_the_next_file(tmp_path):
    """The classes are shared by every file this process opens (the explorer opens several)."""
    from modelscope_tui.readers.pickle.unpickler import TensorRef

    attack = _attack("class", {"__init__": "x", "storage_offset": 9}, "slots")
    open_checkpoint(_write(tmp_path, "attack", attack))
    assert "storage_offset" not in TensorRef.__dict__ and TensorRef.__init__ is not None
    ckpt = open_checkpoint(_write(tmp_path, "ok", tensor(storage("0", 4), 0, (4,), (1,))))
    assert ckpt.tensors[0].storage_offset == 0


@pytest.mark.parametrize(
    ("module", "name", "attrs"),
    [
        ("torch._utils", "_rebuild_parameter", {"__defaults__": "x"}),
        ("torch._utils", "_rebuild_tensor_v3", {"__kwdefaults__": "x"}),
        ("torch", "Size", {"__len__": "x"}),
        ("torch", "float16", {"itemsize": 3}),
        ("torch", "FloatStorage", {"dtype": "float64"}),
        ("torch", "Tensor", {"name": "x"}),
    ],
)
def test_build_on_an_allowlisted_global_is_refused(tmp_path, module, name, attrs):
    """Functions (their __defaults__ would change every later call), torch.Size, dtypes, storage
    types and markers: BUILD on any of them is refused and reported, and the file still opens."""
    value = glob(module, name) + build_state(attrs, "slots") + BUILD + b"0"  # POP: leave it
    good = tensor(storage("0", 4), 0, (4,), (1,))
    path = torch_zip(tmp_path / "g.pt", state_pickle({"w": good, "v": value + b"N"}), {"0": DATA})
    ckpt = open_checkpoint(path)
    refused = [g for g in ckpt.globals if g.name.endswith("__setstate__")]
    assert [(g.module, g.name, g.safety) for g in refused] == [(module, f"{name}.__setstate__", "dangerous")]
    again = open_checkpoint(_write(tmp_path, "ok", good))
    assert not [g for g in again.globals if g.safety != "safe"]
    assert again.tensors[0].dtype == "float32" and again.tensors[0].shape == (4,)


# ----------------------------------------------------------------------------------------------
# Point of use: records that no reader makes, handed straight to every consumer of bytes
# ----------------------------------------------------------------------------------------------
def _forged(tmp_path, **lie) -> TensorRecord:
    path = _write(tmp_path, "ok", tensor(storage("0", 4), 0, (4,), (1,)))
    good = open_checkpoint(path).tensors[0]
    s = good.storage
    store = StorageRecord(s.key, "float32", 4, file=path, data_offset=lie.pop("data_offset", s.data_offset), data_size=16)
    t = TensorRecord("w", lie.pop("shape", (4,)), "float32", lie.pop("stride", (1,)), lie.pop("offset", 0), store)
    return t


LIES = {
    "negative offset": {"offset": -3},
    "negative stride": {"shape": (4,), "stride": (-(1 << 40),)},
    "stride 2**42": {"shape": (4,), "stride": (1 << 42,)},
    "2d stride 2**42": {"shape": (2, 2), "stride": (1 << 42, 1)},
    "offset past the end": {"offset": 1 << 40, "shape": (1,)},
    "negative data_offset": {"data_offset": -16},
    "data_offset past the file": {"data_offset": 1 << 40},
}


@pytest.mark.parametrize("lie", LIES)
def test_point_of_use_refuses_forged_records(tmp_path, lie, monkeypatch):
    t = _forged(tmp_path, **LIES[lie])
    with TensorData() as data:
        with pytest.raises(TensorDataError):
            data.tensor(t)
        with pytest.raises(TensorDataError):
            list(data.chunks(t))
        with pytest.raises(TensorDataError):
            tensor_stats(data, t)  # the compiled kernel's path
        monkeypatch.setenv("MSCOPE_STATS_KERNEL", "numpy")
        monkeypatch.setattr(kernels, "compiled", None)
        with pytest.raises(TensorDataError):
            tensor_stats(data, t)  # numpy's as_strided path


def test_kernel_binding_checks_its_range():
    from modelscope_tui.values import statkernel

    kernel = statkernel.load()
    if kernel is None:
        pytest.skip("compiled kernel not built")
    buf = (statkernel.ctypes.c_char * 16)()
    base = statkernel.ctypes.addressof(buf)
    assert kernel.stats(base, 4, 2, base, base + 16).n == 4
    for address, count in ((base - 4, 4), (base, 5), (base + 8, 1 << 40), (0, 1), (base, -1)):
        with pytest.raises(TensorDataError):
            kernel.stats(address, count, 2, base, base + 16)


def test_placement_bounds_check(tmp_path):
    from modelscope_tui.checkpoint import Checkpoint
    from modelscope_tui.training.placement import Placement, PlacementError

    t = _forged(tmp_path, offset=1 << 40, shape=(1,))
    with TensorData() as data, pytest.raises((PlacementError, TensorDataError)):
        Placement(Checkpoint(tmp_path, "torch-zip"))._materialise(data, [t], torch.device("cpu"))


def test_diff_skips_what_the_reader_flagged(tmp_path):
    """diff opens files strict=False; a stride of 2**42 over 16 bytes is flagged and skipped."""
    bad = _write(tmp_path, "bad", tensor(storage("0", 4), 0, (4,), (1 << 42,)))
    good = _write(tmp_path, "good", tensor(storage("0", 4), 0, (4,), (1,)))
    for a, b in ((bad, good), (good, bad), (bad, bad)):
        report = diff_checkpoints(open_checkpoint(a, strict=False), open_checkpoint(b, strict=False))
        (d,) = report.tensors
        assert d.status == "unreadable" and "skipped" in d.message


@pytest.mark.parametrize("rows", [2, 3])
def test_diff_contiguous_against_expanded(tmp_path, rows):
    """Same shape, one side contiguous, the other stride 0, larger than one chunk."""
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"x": torch.zeros(rows, 600000, dtype=torch.float16)}, a)
    torch.save({"x": torch.zeros(1, 600000, dtype=torch.float16).expand(rows, 600000)}, b)
    for x, y in ((a, b), (b, a)):
        report = diff_checkpoints(open_checkpoint(x), open_checkpoint(y), chunk_bytes=1 << 20)
        assert [d.status for d in report.tensors] == ["identical"]
    c = tmp_path / "c.pt"
    ramp = torch.arange(600000, dtype=torch.float16)
    torch.save({"x": ramp.expand(rows, 600000).t()}, c)  # stride (1, 0): strided both ways
    torch.save({"x": ramp.expand(rows, 600000).t().contiguous()}, a)
    report = diff_checkpoints(open_checkpoint(a), open_checkpoint(c), chunk_bytes=1 << 20)
    assert [d.status for d in report.tensors] == ["identical"]
