"""Session: freezing rules, tied weights, counts kept incrementally, undo/redo."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelscope_tui import open_checkpoint
from modelscope_tui.checkpoint import PARAMETER
from modelscope_tui.training.session import Session, SessionError

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"


@pytest.fixture(scope="module")
def tied():
    return open_checkpoint(SAMPLES / "transformer_tied.pt")


def brute_force_counts(session: Session) -> dict[str, int]:
    counts = {}
    for node in session.ckpt.tree.walk():
        counts[node.name] = sum(
            t.numel for t in node.all_tensors() if t.alias_of is None and session.can_train(t.name) and session.is_trainable(t.name)
        )
    return counts


def assert_consistent(session: Session) -> None:
    expected = brute_force_counts(session)
    for node in session.ckpt.tree.walk():
        assert session.trainable_in(node) == expected[node.name], node.name


def test_pattern_glob_and_regex(tied):
    s = Session(tied)
    glob = s.match("blocks.0.*")
    regex = s.match(r"^blocks\.0\.", "regex")
    assert glob == regex and len(glob) == 12
    with pytest.raises(SessionError):
        s.match("blocks[", "regex")
    s.freeze_pattern("blocks.0.*")
    assert all(not s.is_trainable(n) for n in glob)
    assert_consistent(s)


def test_tied_parameters_share_state(tied):
    s = Session(tied)
    s.freeze(["lm_head.weight"])
    assert not s.is_trainable("embed.weight")
    trainable, total = s.totals()
    assert total - trainable == tied.tensor("embed.weight").numel  # counted once


def test_integer_buffers_are_untouchable():
    s = Session(open_checkpoint(SAMPLES / "cnn_state_dict.pt"))
    result = s.freeze(["features.1.num_batches_tracked"])
    assert result.changed == 0 and "cannot require grad" in result.message
    assert not s.can_undo


def test_last_n_blocks_and_groups(tied):
    s = Session(tied)
    groups = s.block_groups()
    assert groups[0].prefix == "blocks" and groups[0].count == 2
    s.train_last_n_blocks(1)
    assert not s.is_trainable("blocks.0.linear1.weight") and s.is_trainable("blocks.1.linear1.weight")
    assert s.is_trainable("embed.weight")  # outside the group: untouched
    with pytest.raises(SessionError):
        s.train_last_n_blocks(3)


def test_class_freeze_and_norm_caveat():
    s = Session(open_checkpoint(SAMPLES / "notebook_full.pt"))
    assert "BatchNorm2d" in s.classes()
    s.freeze_class("BatchNorm2d")
    norms = s.frozen_norm_layers()
    assert norms and all(s.node(n).class_name == "BatchNorm2d" for n in norms)
    s.set_eval_mode(norms)
    assert set(norms) <= s.eval_modules
    s.undo()
    assert not s.eval_modules


def test_saved_flags_are_the_starting_point():
    ckpt = open_checkpoint(SAMPLES / "notebook_full.pt")
    s = Session(ckpt)
    for t in ckpt.model_tensors:
        if t.kind == PARAMETER:
            assert s.is_trainable(t.name) == t.requires_grad


def test_undo_redo_dirty(tied):
    s = Session(tied)
    assert not s.dirty
    s.freeze_all()
    s.invert()
    assert s.dirty and s.totals()[0] == s.totals()[1]
    s.undo()
    assert s.totals()[0] == 0
    s.undo()
    assert not s.dirty and s.trainable == s.initial
    s.redo()
    s.mark_saved()
    assert not s.dirty
    with pytest.raises(SessionError):
        Session(tied).undo()


OPS = st.lists(
    st.tuples(st.sampled_from(["toggle", "freeze", "unfreeze", "pattern", "invert", "undo", "redo", "last"]), st.integers(0, 50)),
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(OPS)
def test_counts_stay_exact_under_any_sequence(tied, ops):
    s = Session(tied)
    names = list(s.records)
    modules = [n for n in s.ckpt.tree.walk()]
    for op, k in ops:
        if op == "toggle":
            s.toggle([t.name for t in modules[k % len(modules)].all_tensors()])
        elif op == "freeze":
            s.freeze(names[k % len(names) :: 3])
        elif op == "unfreeze":
            s.unfreeze(names[: k % len(names)])
        elif op == "pattern":
            s.freeze_pattern(f"blocks.{k % 2}.*", value=bool(k % 3))
        elif op == "invert":
            s.invert()
        elif op == "last":
            s.train_last_n_blocks(k % 3)
        elif op == "undo" and s.can_undo:
            s.undo()
        elif op == "redo" and s.can_redo:
            s.redo()
    assert_consistent(s)
    while s.can_undo:
        s.undo()
    assert s.trainable == s.initial
    assert_consistent(s)


def test_totals_line_shows_a_change_the_compact_counts_would_hide():
    """Freezing one BatchNorm (16 of 1,610 parameters) reads `1.6K / 1.6K` in compact counts:
    the line goes exact then, as the explorer's header does, and says 100% only when it is."""
    s = Session(open_checkpoint(SAMPLES / "train_checkpoint.pt"))
    assert s.totals_line() == "trainable 1.6K / 1.6K (100.0%)"
    s.freeze(s.match("features.1.*"))
    assert s.totals_line() == "trainable 1,594 / 1,610 (99.0%)"
    s.freeze(s.match("*"))
    s.unfreeze(["classifier.bias"])
    assert s.totals_line() == "trainable 10 / 1.6K (0.6%)"
    s.unfreeze(s.match("*"))
    s.freeze(["classifier.bias"])
    assert s.totals_line() == "trainable 1,600 / 1,610 (99.4%)"
@pytest.fixture(scope="module")
def wrapped(tmp_path_factory):
    """Wrappers holding all of their parent's parameters (`model` -> `model.decoder`, as in
    Hugging Face files), beside a head that is not wrapped."""
    import torch

    sd = {f"model.decoder.layers.{i}.{w}": torch.zeros(i + 2, 3) for i in range(4) for w in ("q", "k")}
    sd["model.decoder.norm.weight"] = torch.ones(3)
    sd["model.decoder.norm.steps"] = torch.zeros(1, dtype=torch.int64)  # cannot train
    sd["head.weight"] = torch.zeros(5, 3)
    path = tmp_path_factory.mktemp("wrapped") / "wrapped.pt"
    torch.save(sd, path)
    return open_checkpoint(path)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(OPS, st.booleans())
def test_wrapper_counts_follow_their_parent_in_any_order(wrapped, ops, parents_first):
    """A module holding every parameter of its parent takes its parent's count (one pass over
    the names per change, not one per level): exact after every change, undo and redo, whether
    parents or children were counted first."""
    s = Session(wrapped)
    names = list(s.records)
    modules = list(s.ckpt.tree.walk())
    order = modules if parents_first else modules[::-1]
    for op, k in [("count", 0), *ops]:
        if op == "toggle":
            s.toggle([t.name for t in modules[k % len(modules)].all_tensors()])
        elif op in ("freeze", "pattern", "last"):
            s.freeze(names[k % len(names) :: 2])
        elif op == "unfreeze":
            s.unfreeze(names[: k % len(names)])
        elif op == "invert":
            s.invert()
        elif op == "undo" and s.can_undo:
            s.undo()
        elif op == "redo" and s.can_redo:
            s.redo()
        expected = brute_force_counts(s)
        assert {n.name: s.trainable_in(n) for n in order} == expected
    assert s.node_state(s.node("model.decoder")) == s.node_state(s.node("model"))
