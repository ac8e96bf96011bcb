"""mscope diff: two checkpoints of any formats, tensor by tensor, per module, against a freeze plan."""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_cli
from modelscope_tui.diff.plan import check_plan
from modelscope_tui.diff.report import (
    ADDED,
    CHANGED,
    CLOSE,
    DTYPE_CHANGED,
    IDENTICAL,
    REMOVED,
    RENAMED,
    SHAPE_CHANGED,
    UNREADABLE,
)
from modelscope_tui.diff.stream import diff_checkpoints
from modelscope_tui.readers import open_checkpoint


def base_state_dict() -> OrderedDict:
    g = torch.Generator().manual_seed(0)
    sd = OrderedDict()
    sd["embed.weight"] = torch.randn(100, 16, generator=g)
    for i in range(4):
        sd[f"blocks.{i}.fc.weight"] = torch.randn(16, 16, generator=g)
        sd[f"blocks.{i}.fc.bias"] = torch.randn(16, generator=g)
    sd["head.weight"] = torch.randn(10, 16, generator=g)
    sd["old_name.weight"] = torch.randn(8, 8, generator=g)
    return sd


def plan(frozen: list[str], trainable: list[str]) -> dict:
    return {
        "format": "mscope.freeze-plan",
        "version": 1,
        "frozen": sorted(frozen),
        "trainable": sorted(trainable),
    }


def diff_paths(a, b, **kw):
    return diff_checkpoints(
        open_checkpoint(a, strict=False), open_checkpoint(b, strict=False), **kw
    )


def test_identical_across_formats(tmp_path):
    sd = base_state_dict()
    torch.save({"model": sd, "epoch": 3}, tmp_path / "a.pt")  # a training checkpoint
    save_file(dict(sd), tmp_path / "b.safetensors")
    report = diff_paths(tmp_path / "a.pt", tmp_path / "b.safetensors")
    assert report.counts()[IDENTICAL] == len(sd) and report.exit_code == 0
    assert all(d.cosine == pytest.approx(1.0) and d.max_abs == 0 for d in report.tensors)
    assert report.module("").status == IDENTICAL
    assert report.summary_line().startswith(
        f"{len(sd)} common tensors: {len(sd)} identical, 0 close, 0 changed"
    )


def fine_tuned(sd: OrderedDict) -> OrderedDict:
    g = torch.Generator().manual_seed(1)
    b = OrderedDict((k, v.clone()) for k, v in sd.items())
    b["blocks.2.fc.weight"] += 0.01 * torch.randn(16, 16, generator=g)  # trained
    b["blocks.3.fc.bias"] *= 1 + 2e-6  # within tolerance
    b["head.weight"] = torch.randn(12, 16, generator=g)  # new head size
    b["blocks.0.fc.bias"] = b["blocks.0.fc.bias"].half()  # cast
    b["new_name.weight"] = b.pop("old_name.weight")  # renamed, same bytes
    del b["blocks.1.fc.bias"]
    b["lora.A"] = torch.randn(4, 16, generator=g)
    return b


def test_statuses_and_numbers_match_torch(tmp_path):
    sd = base_state_dict()
    b = fine_tuned(sd)
    torch.save(sd, tmp_path / "a.pt")
    save_file(dict(b), tmp_path / "b.safetensors")
    report = diff_paths(tmp_path / "a.pt", tmp_path / "b.safetensors", chunk_bytes=256)
    status = {d.name: d.status for d in report.tensors}
    assert status["embed.weight"] == IDENTICAL
    assert status["blocks.2.fc.weight"] == CHANGED
    assert status["blocks.3.fc.bias"] == CLOSE
    assert status["head.weight"] == SHAPE_CHANGED
    assert status["blocks.0.fc.bias"] == DTYPE_CHANGED
    assert status["new_name.weight"] == RENAMED
    assert status["blocks.1.fc.bias"] == REMOVED
    assert status["lora.A"] == ADDED
    (renamed,) = [d for d in report.tensors if d.status == RENAMED]
    assert (renamed.a_name, renamed.b_name) == ("old_name.weight", "new_name.weight")

    d = report.by_name["blocks.2.fc.weight"]
    x, y = sd["blocks.2.fc.weight"].double(), b["blocks.2.fc.weight"].double()
    assert d.max_abs == pytest.approx((x - y).abs().max().item(), rel=1e-12)
    assert d.rel_l2 == pytest.approx(((x - y).norm() / x.norm()).item(), rel=1e-9)
    assert d.cosine == pytest.approx(
        torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), 0).item(), rel=1e-12
    )
    assert d.mismatched == int((~torch.isclose(x, y, rtol=1e-5, atol=1e-8)).sum())
    cast = report.by_name["blocks.0.fc.bias"]
    assert cast.max_abs == pytest.approx(
        (sd["blocks.0.fc.bias"] - sd["blocks.0.fc.bias"].half().float()).abs().max().item()
    )

    blocks = report.module("blocks")
    assert (blocks.tensors, blocks.identical, blocks.changed, blocks.removed) == (8, 4, 3, 1)
    assert report.module("blocks.1").status == CHANGED  # lost its bias
    assert report.module("blocks.2").rel_l2 == pytest.approx(
        d.rel_l2
        * x.norm().item()
        / math.sqrt(x.norm().item() ** 2 + sd["blocks.2.fc.bias"].double().norm().item() ** 2),
        rel=1e-9,
    )


def test_plan_check_frozen_bit_identical_or_moved(tmp_path):
    sd = base_state_dict()
    b = OrderedDict((k, v.clone()) for k, v in sd.items())
    b["blocks.3.fc.weight"] += 0.1
    b["head.weight"] += 0.1
    torch.save(sd, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    frozen = [f"blocks.{i}.fc.{k}" for i in range(3) for k in ("weight", "bias")]
    trainable = [
        "blocks.3.fc.weight",
        "blocks.3.fc.bias",
        "head.weight",
        "embed.weight",
        "old_name.weight",
    ]
    report = diff_paths(tmp_path / "a.pt", tmp_path / "b.pt")
    check = check_plan(report, plan(frozen, trainable))
    assert check.ok and report.exit_code == 0
    assert check.lines()[0] == "these 6 parameters were frozen; all are bit-identical in B"
    assert check.trainable_unchanged == ["blocks.3.fc.bias", "embed.weight", "old_name.weight"]

    check = check_plan(report, plan([*frozen, "blocks.3.fc.weight"], ["head.weight"]))
    assert not check.ok and report.exit_code == 1
    assert [d.name for d in check.moved] == ["blocks.3.fc.weight"]
    assert check.lines()[0] == "1 of 7 parameters frozen moved in B:"
    assert check.lines()[1].startswith("  blocks.3.fc.weight: max |Δ| 0.1")


def test_cli_diff_json_and_plan(tmp_path):
    sd = base_state_dict()
    b = OrderedDict((k, v.clone()) for k, v in sd.items())
    b["head.weight"] += 1.0
    torch.save(sd, tmp_path / "a.pt")
    save_file(dict(b), tmp_path / "b.safetensors")
    (tmp_path / "ok.json").write_text(json.dumps(plan(["embed.weight"], ["head.weight"])))
    (tmp_path / "bad.json").write_text(json.dumps(plan(["head.weight"], ["embed.weight"])))
    res = run_cli(
        "diff",
        tmp_path / "a.pt",
        tmp_path / "b.safetensors",
        "--json",
        "--plan",
        tmp_path / "ok.json",
    )
    assert res.rc == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["schema"] == "mscope.diff" and data["schema_version"] == 1
    assert data["counts"]["changed"] == 1 and data["plan"]["ok"] is True
    head = next(t for t in data["tensors"] if t["name"] == "head.weight")
    assert head["max_abs"] == pytest.approx(1.0) and head["status"] == "changed"
    res = run_cli(
        "diff", tmp_path / "a.pt", tmp_path / "b.safetensors", "--plan", tmp_path / "bad.json"
    )
    assert res.rc == 1
    assert "1 of 1 parameters frozen in bad.json moved in B:" in res.stdout
    assert "head.weight" in res.stdout and "1 changed" in res.stdout


def test_nan_is_data_and_damage_is_a_status(tmp_path):
    sd = base_state_dict()
    sd["embed.weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "a.pt")
    save_file(dict(sd), tmp_path / "b.safetensors")
    path = tmp_path / "c.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-300])  # the last storages are cut short
    same = diff_paths(tmp_path / "a.pt", tmp_path / "b.safetensors")
    assert same.by_name["embed.weight"].status == IDENTICAL
    damaged = diff_paths(tmp_path / "a.pt", path)
    assert UNREADABLE in {d.status for d in damaged.tensors}
    assert damaged.counts()[IDENTICAL] >= 5  # the others are still compared


def test_prefix_mapping_ddp_names(tmp_path):
    sd = base_state_dict()
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pt")
    torch.save(sd, tmp_path / "plain.pt")
    report = diff_paths(tmp_path / "ddp.pt", tmp_path / "plain.pt")
    assert report.counts()[IDENTICAL] == len(sd)
    assert report.notes and "'module.'" in report.notes[0]


def test_diff_cancel_and_progress(tmp_path):
    sd = base_state_dict()
    torch.save(sd, tmp_path / "a.pt")
    torch.save(sd, tmp_path / "b.pt")
    seen = []
    report = diff_paths(tmp_path / "a.pt", tmp_path / "b.pt", progress=seen.append)
    assert seen[-1].done == seen[-1].total == 2 * sum(v.numel() * 4 for v in sd.values())
    cancel = threading.Event()
    cancel.set()
    report = diff_paths(tmp_path / "a.pt", tmp_path / "b.pt", cancel=cancel)
    assert report.cancelled and report.exit_code == 1
