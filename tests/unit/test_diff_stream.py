"""The incremental diff (DiffStream / LiveDiff) behind the explorer's diff mode, and the norm
profile of a module's children (audit/norms.py): domain code, no terminal."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from diffpair import after_state_dict, before_state_dict, write_pair
from modelscope_tui.audit.norms import format_profile, module_norms, norm_rows
from modelscope_tui.diff.live import LiveDiff
from modelscope_tui.diff.report import (
    ADDED,
    CHANGED,
    CLOSE,
    DTYPE_CHANGED,
    IDENTICAL,
    PENDING,
    REMOVED,
    RENAMED,
    SHAPE_CHANGED,
)
from modelscope_tui.diff.stream import DiffStream, diff_checkpoints
from modelscope_tui.errors import Cancelled
from modelscope_tui.readers import open_checkpoint


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    a, b = write_pair(tmp_path_factory.mktemp("pair"))
    return open_checkpoint(a, strict=False), open_checkpoint(b, strict=False)


def test_metadata_first_then_values(pair):
    a, b = pair
    stream = DiffStream(a, b)
    meta = {(d.a_name, d.b_name): d for d in stream.metadata}
    # Known from metadata alone, before a byte is read:
    assert meta[("head.weight", "head.weight")].status == SHAPE_CHANGED
    assert meta[("blocks.0.mlp.bias", "blocks.0.mlp.bias")].status == DTYPE_CHANGED
    assert meta[("blocks.0.mlp.bias", "blocks.0.mlp.bias")].pending  # figures still to come
    assert meta[("dropped.weight", None)].status == REMOVED
    assert meta[(None, "adapter.lora_A")].status == ADDED
    assert meta[("blocks.2.attn.weight", "blocks.2.attn.weight")].status == PENDING
    assert stream.done_bytes == 0

    live = LiveDiff(stream)
    assert live.counts[PENDING] == 17 and live.pending == 18  # + the cast, still pending
    assert live.module("blocks.2").status == PENDING
    assert live.module("head").status == CHANGED  # a shape change needs no values
    assert live.module("dropped").status == REMOVED
    assert live.ghost_modules("") == ["old_proj", "dropped"]  # in A only (old_proj: renamed, later)
    assert live.tensor("proj.weight").status == ADDED  # until its bytes show it is old_proj
    assert [t.name for t in live.ghost_tensors("blocks.1.attn")] == ["blocks.1.attn.bias"]

    seen = []
    for d in stream.run():
        live.apply(d)
        seen.append(d)
    # Results are new objects: the metadata a UI read meanwhile never changed under it.
    assert meta[("blocks.2.attn.weight", "blocks.2.attn.weight")].status == PENDING
    report = stream.finish()
    assert live.pending == 0 and live.counts[PENDING] == 0
    assert live.tensor("blocks.2.attn.weight").status == CHANGED
    assert live.tensor("blocks.1.norm.weight").status == CLOSE
    assert live.tensor("embed.weight").status == IDENTICAL
    renamed = live.tensor("proj.weight")
    assert renamed.status == RENAMED and live.a_tensor("old_proj.weight") is renamed
    assert live.counts[ADDED] == 2 and live.counts[REMOVED] == 2 and live.counts[RENAMED] == 1
    assert live.module("blocks.2").status == CHANGED and live.module("blocks.2").moved == 6
    assert live.module("embed").status == IDENTICAL
    assert live.module("old_proj").status == RENAMED  # A's module, aggregated under A's name
    # The live view agrees with the one-shot report.
    final = {(d.a_name, d.b_name): d.status for d in report.tensors}
    assert final == {(d.a_name, d.b_name): d.status for d in {id(d): d for d in [*live.by_a.values(), *live.by_b.values()]}.values()}
    assert report.counts() == diff_checkpoints(a, b).counts()
    blocks = live.module("blocks")
    assert blocks.rel_l2 == pytest.approx(report.module("blocks").rel_l2, rel=1e-12)
    assert live.summary()[0] == (CHANGED, 6)
    assert "6 changed" in live.summary_line()


def test_cancelled_stream_keeps_metadata_statuses(pair):
    a, b = pair
    cancel = threading.Event()
    stream = DiffStream(a, b)
    got = []
    for d in stream.run(cancel=cancel):
        got.append(d)
        cancel.set()  # stop after the first comparison
    report = stream.finish()
    assert report.cancelled and len(got) == 1
    statuses = {d.name: d.status for d in report.tensors}
    assert statuses["head.weight"] == SHAPE_CHANGED and statuses["adapter.lora_A"] == ADDED
    assert not any(d.pending for d in report.tensors)  # pairs never compared are left out
    assert len(report.tensors) < len(stream.metadata)


def torch_norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def test_module_norms_match_torch(pair, tmp_path):
    _, b = pair
    ref = after_state_dict(before_state_dict())
    stats: dict = {}
    rows = {r.label: r for r in module_norms(b, "blocks", stats)}
    assert set(rows) == {"0", "1", "2"} and all(r.kind == "module" and r.complete for r in rows.values())
    for i in "012":
        expect = torch_norm(v for k, v in ref.items() if k.startswith(f"blocks.{i}."))
        assert rows[i].norm == pytest.approx(expect, rel=1e-6)
    # a leaf module: one row per parameter
    leaf = {r.label: r for r in module_norms(b, "blocks.0.mlp", stats)}
    assert leaf["weight"].kind == "tensor"
    assert leaf["weight"].norm == pytest.approx(torch_norm([ref["blocks.0.mlp.weight"]]), rel=1e-6)
    assert leaf["bias"].norm == pytest.approx(torch_norm([ref["blocks.0.mlp.bias"]]), rel=1e-3)  # fp16
    # cached: nothing left to read, so no statistics are recomputed
    calls = []
    module_norms(b, "blocks", stats, on_stats=lambda r, st: calls.append(r.name))
    assert calls == []
    lines = format_profile(list(rows.values()), width=50)
    assert lines[0].startswith("0 ") and "█" in lines[2]


def test_module_norms_tied_and_cancel():
    a = open_checkpoint(__import__("conftest").SAMPLES / "transformer_tied.pt")
    ref = torch.load(a.path, weights_only=True)
    rows = {r.label: r for r in module_norms(a, "", {})}
    assert rows["lm_head"].note == "tied to embed.weight"
    assert rows["lm_head"].norm == pytest.approx(float(ref["embed.weight"].double().norm()), rel=1e-6)
    cancel = threading.Event()
    cancel.set()
    stats: dict = {}
    with pytest.raises(Cancelled):
        module_norms(a, "blocks", stats, cancel=cancel)
    assert not all(r.complete for r in norm_rows(a, "blocks", stats))


def test_norms_and_diff_stay_free_of_textual_and_torch():
    from test_imports import modules_after

    loaded = modules_after(
        "import modelscope_tui.audit.norms, modelscope_tui.diff.live, modelscope_tui.diff.plan, modelscope_tui.diff.stream"
    )
    assert not {"textual", "torch", "numpy"} & loaded


def test_norm_profile_lists_numbered_blocks_in_layer_order(tmp_path):
    from safetensors.torch import save_file

    # safetensors sorts names: layers.0, layers.1, layers.10, layers.11, layers.2, ...
    save_file({f"layers.{i}.w": torch.full((2,), float(i)) for i in range(12)}, tmp_path / "m.safetensors")
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    rows = module_norms(ckpt, "layers", {})
    assert [r.label for r in rows] == [str(i) for i in range(12)]
    assert [round(r.norm, 6) for r in rows] == [round(math.sqrt(2) * i, 6) for i in range(12)]
