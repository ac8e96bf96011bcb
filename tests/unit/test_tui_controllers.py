"""The explorer's controllers driven without a terminal: real sample files in, the figures and
decisions the app would show out. Worker-thread methods are called inline here."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

from diffpair import after_state_dict, before_state_dict, write_pair
from modelscope_tui.gpu.simulated import SimulatedBackend
from modelscope_tui.gpu.snapshot import HostMemory
from modelscope_tui.readers import open_checkpoint
from modelscope_tui.training.session import Session
from modelscope_tui.tui.controllers.caveats import NormCaveat
from modelscope_tui.tui.controllers.devices import DeviceMover
from modelscope_tui.tui.controllers.diff import DiffController
from modelscope_tui.tui.controllers.estimate import HINT, Estimator
from modelscope_tui.tui.controllers.filter import TreeFilter, match
from modelscope_tui.tui.controllers.jobs import Job, Latest
from modelscope_tui.tui.controllers.values import AUDIT_HINT, COMPUTING, NormProfiler, TensorStats

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"


@pytest.fixture(scope="module")
def tied():
    return open_checkpoint(SAMPLES / "transformer_tied.pt")


@pytest.fixture(scope="module")
def tied_ref():
    return torch.load(SAMPLES / "transformer_tied.pt", weights_only=True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("pair"))


def test_controllers_never_import_textual():
    import subprocess

    code = (
        "import sys\n"
        "import modelscope_tui.tui.controllers.caveats, modelscope_tui.tui.controllers.devices\n"
        "import modelscope_tui.tui.controllers.diff, modelscope_tui.tui.controllers.estimate\n"
        "import modelscope_tui.tui.controllers.filter, modelscope_tui.tui.controllers.values\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'rich', 'torch')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout


# -- jobs -----------------------------------------------------------------------------------------
def test_the_newest_job_wins():
    latest = Latest()
    first = latest.start(Job())
    assert latest.is_current(first) and not first.cancel.is_set()
    second = latest.start(Job())
    assert first.cancel.is_set() and not latest.is_current(first)
    assert latest.is_current(second) and not second.cancel.is_set()
    latest.cancel()  # asked to stop, still the one whose results count
    assert second.cancel.is_set() and latest.is_current(second)
    latest.drop()
    assert not latest.is_current(second) and latest.job is None


# -- one tensor's statistics -------------------------------------------------------------------------
def test_tensor_statistics_match_torch_and_are_cached(tied, tied_ref):
    stats = TensorStats()
    record = tied.tensor("blocks.0.linear1.weight")
    assert stats.get(record.qualified_name) is None
    job = stats.start(record)
    result = TensorStats.compute(job)
    values, histogram = result
    ref = tied_ref["blocks.0.linear1.weight"].double()
    assert abs(values.mean - ref.mean().item()) < 1e-6
    assert abs(values.std - ref.std(correction=0).item()) < 1e-6
    assert values.min == ref.min().item() and values.max == ref.max().item()
    assert len(histogram.counts) == 30 and sum(histogram.counts) == ref.numel()
    assert stats.store(record.qualified_name, result) is values
    assert stats.get(record.qualified_name) == result
    # a later row cancels this one's job: a cancelled computation returns nothing
    other = stats.start(tied.tensor("blocks.0.linear2.weight"))
    assert job.cancel.is_set() and not other.cancel.is_set()
    assert TensorStats.compute(job) is None
    # the audit's statistics never replace a histogram already computed
    stats.add(record.qualified_name, values)
    assert stats.get(record.qualified_name)[1] is histogram
    assert stats.store("x", ("no statistics for foo", None)) is None


# -- norm profiles ------------------------------------------------------------------------------------
def child_norm(ref, prefix: str) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for k, v in ref.items() if k.startswith(prefix)))


def test_norm_profile_is_computed_once_per_module_and_matches_torch(tied, tied_ref):
    norms = NormProfiler(tied)
    root = norms.profile("", start=False)
    assert root.status == AUDIT_HINT and root.job is None and not norms.stats  # never unasked
    hidden = norms.profile("blocks.0", visible=False)
    assert hidden.job is None and hidden.status == COMPUTING  # the details pane is hidden

    first = norms.profile("blocks.0")
    assert first.job is not None and first.job.module == "blocks.0" and norms.running == "blocks.0"
    assert norms.profile("blocks.0").job is None  # running: not started twice
    seen = []
    result = norms.compute(first.job, progress=lambda p: seen.append((p.done, p.total)))
    assert result.complete and seen and seen[-1][0] == seen[-1][1]
    assert norms.progress(first.job, 1, 2) and "50%" in norms.profile("blocks.0").status
    assert norms.finish(first.job, result)
    assert "blocks.0" in norms.done and norms.running is None

    done = norms.profile("blocks.0")
    assert done.job is None and done.status is None
    rows = {r.label: r for r in done.rows}
    for child in ("self_attn", "linear1", "linear2", "norm1", "norm2"):
        assert rows[child].complete
        assert rows[child].norm == pytest.approx(child_norm(tied_ref, f"blocks.0.{child}."), rel=1e-6)


def test_a_replaced_norm_job_still_contributes_its_statistics(tied):
    norms = NormProfiler(tied)
    old = norms.profile("blocks.0").job
    new = norms.profile("blocks.1").job
    assert old.cancel.is_set() and norms.running == "blocks.1"
    cancelled = norms.compute(old)
    assert not cancelled.complete
    assert not norms.progress(old, 1, 2)  # a replaced job's progress is not shown
    assert not norms.finish(old, cancelled) and norms.running == "blocks.1"
    assert "blocks.0" not in norms.done
    assert norms.finish(new, norms.compute(new)) and "blocks.1" in norms.done
    # statistics from the tensor details or the audit fill profiles without a job
    for record in tied.model_tensors:
        norms.add(record.qualified_name, TensorStats.compute(TensorStats().start(record))[0])
    profile = norms.profile("", start=False)
    assert profile.job is None and profile.status is None and "" in norms.done
    assert any(r.label == "lm_head" and r.note for r in profile.rows)  # tied to embed


# -- the fine-tune estimate --------------------------------------------------------------------------
def fixed_sample(free_fraction: float = 0.5):
    backend = SimulatedBackend(2, seed=0, host=HostMemory(64 << 30, 48 << 30, 300 << 20), clock=lambda: 1.7e9, visible=None)
    sample = backend.sample()
    gpus = tuple(dataclasses.replace(g, memory_free=int(g.memory_total * free_fraction)) for g in sample.gpus)
    return dataclasses.replace(sample, gpus=gpus)


def test_estimator_cycles_recomputes_and_fits():
    tied = open_checkpoint(SAMPLES / "transformer_tied.pt")  # its own: no estimate tallied it yet
    session = Session(tied)
    estimator = Estimator()
    assert (estimator.precision, estimator.optimizer) == ("bf16-mixed", "adamw")
    seen = {estimator.cycle_precision() for _ in range(10)}
    assert "as-saved" not in seen and estimator.precision in seen
    while estimator.precision != "bf16-mixed":
        estimator.cycle_precision()
    assert estimator.cycle_optimizer() != "adamw"
    while estimator.optimizer != "adamw":
        estimator.cycle_optimizer()

    stale = estimator.start(session)
    job = estimator.start(session)
    assert not estimator.ready(stale, Estimator.compute(stale)) and estimator.estimate is None
    est = Estimator.compute(job)
    assert estimator.ready(job, est) and estimator.estimate is est
    assert est.trainable == est.parameters == sum(t.numel for t in tied.model_tensors if t.kind == "parameter" and t.alias_of is None)

    sample = fixed_sample()
    lines = estimator.lines(sample, 38)
    assert all(len(text) <= 38 for text, _ in lines)
    fits = [(text, style) for text, style in lines if text.startswith("GPU")]
    assert [t.split(":")[0] for t, _ in fits] == ["GPU0", "GPU1"]
    assert all(style == "green" and "fits" in text for text, style in fits)  # 22K parameters
    assert lines[-1] == (HINT, "dim")
    # the fit lines are redrawn when free memory moves by 64 MB, not on every tick
    key = estimator.fit_key(sample)
    nudged = dataclasses.replace(sample, gpus=tuple(dataclasses.replace(g, memory_free=g.memory_free + (1 << 20)) for g in sample.gpus))
    moved = dataclasses.replace(sample, gpus=tuple(dataclasses.replace(g, memory_free=g.memory_free + (1 << 27)) for g in sample.gpus))
    assert estimator.fit_key(nudged) == key and estimator.fit_key(moved) != key
    # freezing everything: the next estimate trains nothing. The checkpoint is tallied now, so
    # it is computed at once (no job), and a job still out for an older state no longer counts.
    session.freeze_all()
    assert estimator.start(session) is None and estimator.estimate.trainable == 0
    assert not estimator.ready(job, est) and estimator.estimate.trainable == 0


# -- diff mode ------------------------------------------------------------------------------------------
def run_diff(controller: DiffController, b):
    job = controller.start(controller.compare_path)
    stream, live = controller.open(job, b)
    assert live.running and controller.ready(job, live)
    for batch in controller.batches(job, stream):
        assert controller.apply(job, batch)
    return job


def test_diff_controller_compares_and_walks_the_changes(pair):
    a, b_path = pair
    b = open_checkpoint(b_path)
    controller = DiffController(a)
    assert controller.default_path(b) == str(a)
    run_diff(controller, b)
    live = controller.live
    assert not live.running and controller.exit_code == 0 and controller.progress_line() is None
    counts = dict(live.summary())
    assert counts["changed"] == 6 and counts["close"] == 1 and counts["renamed"] == 1
    assert counts["added"] == 2 and counts["removed"] == 2 and counts["identical"] == 10

    ref_a, ref_b = before_state_dict(), after_state_dict(before_state_dict())
    d = live.tensor("blocks.2.mlp.weight")
    assert d.max_abs == pytest.approx((ref_a["blocks.2.mlp.weight"] - ref_b["blocks.2.mlp.weight"]).abs().max().item(), rel=1e-6)

    order = controller.change_order(b)
    assert order[0] == ("adapter.lora_A", False) and order[-1] == ("dropped.weight", True)
    assert ("proj.weight", False) not in order  # a rename with the same bytes is no change
    assert controller.next_change(b, None, +1) == "adapter.lora_A"
    assert controller.next_change(b, None, -1) == "dropped.weight"
    assert controller.next_change(b, order[0], +1) == order[1][0]
    assert controller.next_change(b, order[0], -1) == "dropped.weight"  # wraps around

    controller.leave()
    assert controller.live is None and controller.compare_path is None and controller.exit_code == 0


def test_diff_controller_drops_a_replaced_comparison_and_stops(pair, tmp_path):
    a, b_path = pair
    b = open_checkpoint(b_path)
    controller = DiffController()
    assert controller.default_path(b) == str(b_path.parent) + "/"
    old = controller.start(a)
    stream, live = controller.open(old, b)
    new = controller.start(a)
    assert old.cancel.is_set()
    assert not controller.ready(old, live) and controller.live is None
    assert not controller.stop()  # nothing running yet

    stream, live = controller.open(new, b)
    assert controller.ready(new, live)
    assert controller.progress(new, 123) and live.done_bytes == 123
    assert not controller.progress(old, 456) and live.done_bytes == 123
    assert controller.progress_line().startswith("comparing ") and "x stops" in controller.progress_line()
    assert controller.stop() and new.cancel.is_set()
    batches = list(controller.batches(new, stream))
    assert not controller.apply(old, batches[-1])
    for batch in batches:
        assert controller.apply(new, batch)
    assert live.cancelled and not controller.running
    assert controller.exit_code == 1  # a stopped comparison, as `mscope diff` says


def test_diff_controller_checks_a_freeze_plan(pair, tmp_path):
    import json

    a, b_path = pair
    plan = tmp_path / "plan.json"
    frozen = [f"blocks.0.{m}.{p}" for m in ("attn", "mlp", "norm") for p in ("weight", "bias")]
    plan.write_text(json.dumps({"format": "mscope.freeze-plan", "version": 1, "frozen": frozen, "trainable": []}))
    controller = DiffController(a, plan=plan)
    run_diff(controller, open_checkpoint(b_path))
    assert not controller.plan_ok and controller.exit_code == 1
    assert any("blocks.0.mlp.bias: dtype float32 -> float16" in line for line in controller.plan_lines)
    frozen = [f"blocks.0.{m}.{p}" for m in ("attn", "norm") for p in ("weight", "bias")]
    plan.write_text(json.dumps({"format": "mscope.freeze-plan", "version": 1, "frozen": frozen, "trainable": []}))
    controller = DiffController(a, plan=plan)
    run_diff(controller, open_checkpoint(b_path))
    assert controller.plan_ok and controller.exit_code == 0


# -- devices -------------------------------------------------------------------------------------------
def test_device_mover_places_exports_and_rolls_back(tied, tmp_path):
    session = Session(tied)
    mover = DeviceMover(session)
    assert not mover.placed and mover.device_of("embed.weight") is None and mover.placed_line() == ""
    devices = {d.name: d for d in DeviceMover.devices()}
    assert devices["cpu"].available and "meta" in devices
    blocks = [n for n in session.records if n.startswith("blocks.")]
    message, severity = mover.move(mover.start(blocks, "meta"), progress=None)
    assert severity == "information" and message.startswith(f"moved {len(blocks):,} tensor(s)")
    assert mover.placed and mover.device_of("blocks.0.linear1.weight") == "meta"
    assert mover.device_of("embed.weight") == "file"
    assert mover.placed_line().startswith("meta ")
    assert mover.device_map()["blocks"] == "meta"
    assert all(v == "cpu" for k, v in mover.device_map().items() if k != "blocks")
    assert mover.default_map_path().name == "transformer_tied.device-map.json"
    job = mover.start(["embed.weight"], "cpu")
    job.cancel.set()  # cancelled before the first tensor: nothing changes
    message, severity = mover.move(job)
    assert severity == "warning" and "nothing changed" in message
    assert mover.device_of("embed.weight") == "file"


# -- the filter ----------------------------------------------------------------------------------------
def test_filter_matches_substrings_and_globs_with_their_modules(tied):
    names, modules = match("norm1", [t.name for t in tied.tensors])
    assert names and all("norm1" in n for n in names)
    assert modules == {"", "blocks", "blocks.0", "blocks.1", "blocks.0.norm1", "blocks.1.norm1"}
    names, _ = match("BLOCKS.0.*.bias", [t.name for t in tied.tensors])  # a glob, case-insensitive
    assert names and all(n.startswith("blocks.0.") and n.endswith(".bias") for n in names)

    tree_filter = TreeFilter()
    session = Session(tied)
    old = tree_filter.start("norm", session.records)
    job = tree_filter.start("norm1", session.records, lambda: ["gone.norm1.weight"])
    assert not tree_filter.is_current(old) and tree_filter.is_current(job)
    result = TreeFilter.compute(job)
    assert "gone.norm1.weight" in result.tensors and "gone.norm1" in result.modules  # what only A has
    cleared = TreeFilter.compute(tree_filter.start("", session.records))
    assert cleared.tensors is None and cleared.modules is None and cleared.text == ""


# -- caveats -------------------------------------------------------------------------------------------
def test_norm_caveat_is_said_once_per_set_of_frozen_norms():
    session = Session(open_checkpoint(SAMPLES / "notebook_full.pt"))
    caveat = NormCaveat()
    assert caveat.check(session) is None
    session.freeze_class("BatchNorm2d")
    pending = len(session.frozen_norm_layers())
    line = caveat.check(session)
    assert pending and line.startswith(f"{pending} frozen norm layer(s) still update running statistics")
    assert caveat.check(session) is None  # unrelated changes: said once
    session.set_eval_mode(session.frozen_norm_layers())
    assert caveat.check(session) is None
    session.set_eval_mode(session.frozen_norm_layers(), False)
    assert caveat.check(session) == line
