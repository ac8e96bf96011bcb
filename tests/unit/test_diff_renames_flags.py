"""diff: renames only for bytes unique on both sides, and requires_grad changes reported (API,
text and JSON through the CLI, the explorer's diff mode), on real torch-saved files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

from conftest import run_cli, settle
from modelscope_tui.diff.report import ADDED, REMOVED, RENAMED
from modelscope_tui.diff.stream import diff_checkpoints
from modelscope_tui.readers import open_checkpoint


def diff(a: Path, b: Path):
    return diff_checkpoints(open_checkpoint(a, strict=False), open_checkpoint(b, strict=False))


def statuses(report) -> dict[str, str]:
    return {(d.a_name or "") + ">" + (d.b_name or ""): d.status for d in report.tensors}


# -- renames -------------------------------------------------------------------------------------
def test_equal_constant_tensors_are_not_renames(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(8, 4)
    torch.save({"bn1.weight": torch.ones(8), "bn2.weight": torch.ones(8), "conv.weight": w}, tmp_path / "a.pt")
    torch.save({"norm_a.weight": torch.ones(8), "norm_b.weight": torch.ones(8), "layer.weight": w.clone()}, tmp_path / "b.pt")
    report = diff(tmp_path / "a.pt", tmp_path / "b.pt")
    got = statuses(report)
    assert got["conv.weight>layer.weight"] == RENAMED  # unique bytes on both sides: a rename
    assert got["bn1.weight>"] == got["bn2.weight>"] == REMOVED
    assert got[">norm_a.weight"] == got[">norm_b.weight"] == ADDED
    assert any("not reported as renames" in n for n in report.notes)


@pytest.mark.parametrize(
    "a_names, b_names",
    [
        (["x.weight"], ["y.weight", "z.weight"]),  # unique in A, twice in B
        (["x.weight", "w.weight"], ["y.weight"]),  # twice in A, unique in B
    ],
)
def test_digest_must_be_unique_on_both_sides(tmp_path, a_names, b_names):
    torch.save({n: torch.ones(3, 3) for n in a_names}, tmp_path / "a.pt")
    torch.save({n: torch.ones(3, 3) for n in b_names}, tmp_path / "b.pt")
    report = diff(tmp_path / "a.pt", tmp_path / "b.pt")
    assert report.counts()[RENAMED] == 0
    assert report.counts()[REMOVED] == len(a_names) and report.counts()[ADDED] == len(b_names)


def test_full_module_pickle_renamed_module(tmp_path):
    """A full-module pickle whose BatchNorms (weights all ones) and a Linear were renamed."""
    torch.manual_seed(1)
    a = nn.Sequential()
    a.add_module("fc", nn.Linear(4, 4))
    a.add_module("bn1", nn.BatchNorm1d(4))
    a.add_module("bn2", nn.BatchNorm1d(4))
    b = nn.Sequential()
    b.add_module("proj", a.fc)
    b.add_module("norm1", nn.BatchNorm1d(4))
    b.add_module("norm2", nn.BatchNorm1d(4))
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    got = statuses(diff(tmp_path / "a.pt", tmp_path / "b.pt"))
    assert got["fc.weight>proj.weight"] == RENAMED and got["fc.bias>proj.bias"] == RENAMED
    assert not any(s == RENAMED for k, s in got.items() if "bn" in k or "norm" in k)


# -- requires_grad -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grad_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("grad")
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    torch.save(model, root / "a.pt")
    torch.save(model.state_dict(), root / "a_sd.pt")
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    model[2].weight.requires_grad_(False)
    torch.save(model, root / "b.pt")  # same bytes, three parameters now frozen
    torch.save(model.state_dict(), root / "b_sd.pt")
    other = nn.Linear(4, 4)
    other.weight.requires_grad_(False)
    torch.save({"w": nn.Parameter(torch.ones(2), requires_grad=True)}, root / "p_a.pt")
    torch.save({"w": nn.Parameter(torch.ones(2), requires_grad=False)}, root / "p_b.pt")
    return root


def test_requires_grad_changes_in_full_pickles(grad_pair):
    report = diff(grad_pair / "a.pt", grad_pair / "b.pt")
    changed = {d.name: (d.a_requires_grad, d.b_requires_grad) for d in report.grad_changes}
    assert changed == {"0.weight": (True, False), "0.bias": (True, False), "2.weight": (True, False)}
    assert report.counts()["identical"] == len(report.tensors)  # values did not move
    assert "3 requires_grad changed" in report.summary_line()


def test_saved_parameters_store_the_flag(grad_pair):
    report = diff(grad_pair / "p_a.pt", grad_pair / "p_b.pt")
    assert [(d.name, d.a_requires_grad, d.b_requires_grad) for d in report.grad_changes] == [("w", True, False)]


@pytest.mark.parametrize("a, b", [("a_sd.pt", "b_sd.pt"), ("a.pt", "b_sd.pt"), ("a_sd.pt", "b.pt")])
def test_state_dicts_store_no_flag(grad_pair, a, b):
    report = diff(grad_pair / a, grad_pair / b)
    assert report.grad_changes == [] and "requires_grad" not in report.summary_line()


def test_cli_text_and_json(grad_pair):
    text = run_cli("diff", grad_pair / "a.pt", grad_pair / "b.pt", "--text")
    assert text.rc == 0, text.stderr
    assert "requires_grad changed (3)" in text.stdout
    assert "0.weight: trainable → frozen" in text.stdout and "2.weight: trainable → frozen" in text.stdout
    js = run_cli("diff", grad_pair / "a.pt", grad_pair / "b.pt", "--json")
    assert js.rc == 0, js.stderr
    data = json.loads(js.stdout)
    assert sorted(e["b_name"] for e in data["requires_grad_changed"]) == ["0.bias", "0.weight", "2.weight"]
    assert all(e["a"] is True and e["b"] is False for e in data["requires_grad_changed"])
    by_name = {t["name"]: t for t in data["tensors"]}
    assert by_name["1.weight"]["a_requires_grad"] is True and by_name["1.weight"]["b_requires_grad"] is True
    sd = json.loads(run_cli("diff", grad_pair / "a_sd.pt", grad_pair / "b_sd.pt", "--json").stdout)
    assert sd["requires_grad_changed"] == [] and sd["tensors"][0]["a_requires_grad"] is None


async def test_explorer_diff_mode_shows_flag_changes(grad_pair):
    from modelscope_tui.tui.app import MscopeApp

    app = MscopeApp(grad_pair / "b.pt", compare=grad_pair / "a.pt", show_gpus=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        assert "3 requires_grad changed" in str(app.query_one("#header").render())

        def details() -> str:
            console = Console(width=120, record=True, file=open("/dev/null", "w"))
            console.print(app.query_one("#details").content)
            return console.export_text()

        app.tree.move_cursor(app.tree.root)
        await pilot.pause()
        text = details()
        assert "requires_grad" in text and "0.weight: trainable → frozen" in text
        app.tree.reveal(tensor_name="2.weight")
        await pilot.pause()
        text = details()
        assert "requires_grad" in text and "trainable → frozen" in text
