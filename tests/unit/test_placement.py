"""Moving tensors onto a device: values as torch loads them, ties kept, all-or-nothing."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from modelscope_tui import open_checkpoint
from modelscope_tui.training import placement as placement_mod
from modelscope_tui.training.placement import FILE, Placement, PlacementError, available_devices

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"


def test_move_whole_model_to_cpu_matches_torch():
    ckpt = open_checkpoint(SAMPLES / "transformer_tied.pt")
    expected = torch.load(SAMPLES / "transformer_tied.pt", weights_only=True)
    placement = Placement(ckpt)
    seen = []
    result = placement.move([t.name for t in ckpt.model_tensors], "cpu", progress=lambda d, t: seen.append((d, t)))
    assert result.moved == len(expected)
    for name, ref in expected.items():
        ours = placement.tensors[name]
        assert ours.dtype == ref.dtype and ours.shape == ref.shape and torch.equal(ours, ref), name
        assert placement.device_of(name) == "cpu"
    # tied weights stay one storage after the move
    assert placement.tensors["lm_head.weight"].data_ptr() == placement.tensors["embed.weight"].data_ptr()
    assert seen[-1][0] == seen[-1][1] == result.bytes
    by_device = placement.bytes_by_device()
    assert by_device == {"cpu": ckpt.totals().nbytes}


def test_subtree_move_and_release():
    ckpt = open_checkpoint(SAMPLES / "cnn_state_dict.pt")
    placement = Placement(ckpt)
    names = [t.name for t in ckpt.tree.children["classifier"].all_tensors()]
    placement.move(names, "meta")
    assert {placement.device_of(n) for n in names} == {"meta"}
    assert placement.device_of("features.0.weight") == FILE
    assert placement.tensors["classifier.weight"].is_meta
    placement.release(names)
    assert placement.device_of("classifier.weight") == FILE


def test_failure_midway_rolls_back(monkeypatch):
    ckpt = open_checkpoint(SAMPLES / "cnn_state_dict.pt")
    placement = Placement(ckpt)
    placement.move(["classifier.bias"], "cpu")
    before = dict(placement.device)
    calls = {"n": 0}
    real = placement_mod._transfer

    def flaky(host, target):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return real(host, target)

    monkeypatch.setattr(placement_mod, "_transfer", flaky)
    with pytest.raises(PlacementError) as info:
        placement.move([t.name for t in ckpt.model_tensors], "cpu")
    assert "out of memory on cpu: needed 6.5 KiB;" in info.value.line() and "nothing was moved" in info.value.line()
    assert placement.device == before
    assert set(placement.tensors) == {"classifier.bias"}


def test_cancel_leaves_nothing_half_moved():
    ckpt = open_checkpoint(SAMPLES / "cnn_state_dict.pt")
    placement = Placement(ckpt)
    cancel = threading.Event()

    def progress(done, total):
        cancel.set()

    result = placement.move([t.name for t in ckpt.model_tensors], "cpu", progress=progress, cancel=cancel)
    assert result.cancelled and not placement.tensors and not placement.device


def test_unknown_device_is_a_clear_error():
    placement = Placement(open_checkpoint(SAMPLES / "cnn_state_dict.pt"))
    with pytest.raises(PlacementError, match="unknown device"):
        placement.move(["classifier.bias"], "tpu:7")


def test_device_list_explains_missing_accelerators():
    devices = {d.name: d for d in available_devices()}
    assert devices["cpu"].available
    if not torch.cuda.is_available():
        cuda = devices["cuda"]
        assert not cuda.available and cuda.reason


def test_failed_move_frees_what_it_copied_even_while_the_error_is_kept(monkeypatch):
    """The error's traceback kept the copied tensors (and so their device
    memory) alive for as long as anyone held the error, e.g. the explorer showing it."""
    import gc

    ckpt = open_checkpoint(SAMPLES / "cnn_state_dict.pt")
    placement = Placement(ckpt)
    copied: list[int] = []
    real = placement_mod._transfer

    def flaky(host, target):
        if len(copied) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        out = real(host, target)
        copied.append(out.untyped_storage().data_ptr())
        return out

    monkeypatch.setattr(placement_mod, "_transfer", flaky)
    with pytest.raises(PlacementError) as info:
        placement.move([t.name for t in ckpt.model_tensors], "cpu")
    kept = info.value  # held, as a UI holds the error it shows
    gc.collect()
    alive = [
        o
        for o in gc.get_objects()
        if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() in copied
    ]
    assert len(copied) == 2 and not alive, f"{len(alive)} copied tensor(s) outlived the rollback"
    assert "needed" in kept.line()
