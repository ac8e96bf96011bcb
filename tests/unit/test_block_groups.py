""""Train the last N blocks" only on structurally alike blocks, checked on real torch-saved files
(full-module pickles and state_dicts), through the Session, `mscope plan` and the explorer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import run_cli
from modelscope_tui import open_checkpoint
from modelscope_tui.training.session import Session, SessionError

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"


class Mixed(nn.Module):
    """A CNN whose Sequentials mix layers, plus a transformer-like stack of alike layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True) for _ in range(3)
        )
        self.widths = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 8)])  # same class, other shapes
        self.single = nn.ModuleList([nn.Linear(4, 4)])  # one block is not a group
        self.acts = nn.Sequential(nn.ReLU(), nn.ReLU())  # alike, but nothing to train
        # Same tensor names and shapes, different classes: only a file with classes tells them apart.
        self.norms = nn.ModuleList(
            [nn.BatchNorm1d(4), nn.InstanceNorm1d(4, affine=True, track_running_stats=True)]
        )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks")
    model = Mixed()
    torch.save(model, root / "full.pt")
    torch.save(model.state_dict(), root / "state.pt")
    return root


def prefixes(path) -> list[str]:
    return [g.prefix for g in Session(open_checkpoint(path)).block_groups()]


def test_full_pickle_only_alike_blocks(files):
    groups = Session(open_checkpoint(files / "full.pt")).block_groups()
    assert [(g.prefix, g.indices) for g in groups] == [("layers", [0, 1, 2])]


def test_state_dict_alike_by_tensors(files):
    # Without classes the two norms look alike (same names, shapes, dtypes); the rest as above.
    assert sorted(prefixes(files / "state.pt")) == ["layers", "norms"]
    assert prefixes(files / "state.pt")[0] == "layers"


@pytest.mark.parametrize("name", ["full.pt", "state.pt"])
def test_train_last_freezes_only_the_blocks(files, name):
    s = Session(open_checkpoint(files / name))
    result = s.train_last_n_blocks(1)
    assert result.changed > 0
    assert not s.is_trainable("layers.0.linear1.weight") and not s.is_trainable("layers.1.norm2.bias")
    assert s.is_trainable("layers.2.linear1.weight") and s.is_trainable("layers.2.self_attn.in_proj_weight")
    assert s.is_trainable("stem.0.weight") and s.is_trainable("stem.1.weight")  # not a block group


@pytest.mark.parametrize("prefix", ["stem", "widths", "single", "acts"])
def test_explicit_non_group_refused(files, prefix):
    from modelscope_tui.training.session import BlockGroup

    s = Session(open_checkpoint(files / "full.pt"))
    with pytest.raises(SessionError, match="not a group of repeated blocks"):
        s.train_last_n_blocks(1, BlockGroup(prefix, [0, 1]))
    assert not s.can_undo


@pytest.mark.parametrize("name", ["notebook_full.pt", "cnn_state_dict.pt", "legacy_cnn.pt"])
def test_mixed_sequentials_are_not_blocks(name):
    s = Session(open_checkpoint(SAMPLES / name))
    assert s.block_groups() == []
    with pytest.raises(SessionError, match="no repeated blocks found") as exc:
        s.train_last_n_blocks(1)
    assert "same parameter names, shapes and dtypes" in exc.value.line()
    assert not s.can_undo


def test_cli_train_last_on_mixed_model(files, tmp_path):
    out = tmp_path / "p.json"
    bad = run_cli("plan", SAMPLES / "notebook_full.pt", "--train-last", "2", "-o", out)
    assert bad.rc == 2 and bad.stderr.count("\n") == 1 and "no repeated blocks found" in bad.stderr
    assert "Traceback" not in bad.output and not out.exists()
    good = run_cli("plan", files / "full.pt", "--train-last", "2", "-o", out)
    assert good.rc == 0, good.stderr
    assert "train only the last 2 of layers" in good.stdout


async def test_explorer_l_on_mixed_model_says_why():
    from modelscope_tui.tui.app import MscopeApp

    app = MscopeApp(SAMPLES / "notebook_full.pt")
    async with app.run_test(size=(120, 36)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        before = dict(app.session.trainable)
        await pilot.press("l")
        await pilot.pause()
        messages = " ".join(str(n.message) for n in app._notifications)
        assert "no repeated blocks found" in messages and "same parameter names" in messages
        assert app.screen is app.screen_stack[0]  # no block picker opened
        assert app.session.trainable == before and not app.session.can_undo
