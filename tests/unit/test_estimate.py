"""Memory estimates against published numbers, on real checkpoints written by torch.

Published numbers reproduced here:
- accelerate's `accelerate estimate-memory bert-base-cased` table (docs, "Model memory
  estimator"): float32 Total Size 413.18 MB, float16 206.59 MB, float32 "Training using Adam"
  1.61 GB (4x the fp32 model: weights + grads + 2 Adam states). accelerate counts the model's
  int64 buffers (`position_ids`, `token_type_ids`, 1x512 each) at 8 bytes: 413.18 needs them.
- the ZeRO paper (Rajbhandari et al., 2019, sec. 3.1 and Figure 1): mixed-precision Adam needs
  2 + 2 + 12 = 16 bytes per parameter: 24 GB for GPT-2's 1.5B parameters, 120 GB for 7.5B.
- DeepSpeed's ZeRO-2 estimator with `offload_optimizer=cpu`: 2 bytes/param on the GPU, 5.31 GB
  for t5-3b's 2851M parameters (DeepSpeed docs, "Memory Requirements").
- Megatron-LM's distributed-optimizer table: fp32 params + fp32 grads = 16 bytes/param.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelscope_tui import open_checkpoint
from modelscope_tui.checkpoint import PARAMETER
from modelscope_tui.cli.estimate import render_table, render_text
from modelscope_tui.errors import MscopeError
from modelscope_tui.training.estimate import (
    OPTIMIZERS,
    PANEL_WIDTH,
    PRECISIONS,
    EstimateError,
    MemoryEstimate,
    estimate,
    estimate_for_session,
    estimate_table,
    fits,
    inventory,
    panel_lines,
    tensor_bytes,
)
from modelscope_tui.training.session import Session

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"
MiB, GiB = 2**20, 2**30


def accelerate_mb(nbytes: int) -> float:
    """accelerate's convert_bytes: binary units, rounded to 2 decimals."""
    return round(nbytes / MiB, 2)


# -- bert-base-cased, written by torch -------------------------------------------------------------
def bert_base_cased_shapes() -> dict[str, tuple[tuple[int, ...], str]]:
    """BertModel(bert-base-cased) tensors: vocab 28996, hidden 768, 12 layers, ffn 3072."""
    h, ffn, vocab = 768, 3072, 28996
    out: dict[str, tuple[tuple[int, ...], str]] = {
        "embeddings.word_embeddings.weight": ((vocab, h), "f"),
        "embeddings.position_embeddings.weight": ((512, h), "f"),
        "embeddings.token_type_embeddings.weight": ((2, h), "f"),
        "embeddings.LayerNorm.weight": ((h,), "f"),
        "embeddings.LayerNorm.bias": ((h,), "f"),
        "embeddings.position_ids": ((1, 512), "i"),
        "embeddings.token_type_ids": ((1, 512), "i"),
    }
    for i in range(12):
        p = f"encoder.layer.{i}"
        for lin, (o, n) in {
            "attention.self.query": (h, h),
            "attention.self.key": (h, h),
            "attention.self.value": (h, h),
            "attention.output.dense": (h, h),
            "intermediate.dense": (ffn, h),
            "output.dense": (h, ffn),
        }.items():
            out[f"{p}.{lin}.weight"] = ((o, n), "f")
            out[f"{p}.{lin}.bias"] = ((o,), "f")
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            out[f"{p}.{ln}.weight"] = ((h,), "f")
            out[f"{p}.{ln}.bias"] = ((h,), "f")
    out["pooler.dense.weight"] = ((h, h), "f")
    out["pooler.dense.bias"] = ((h,), "f")
    return out


@pytest.fixture(scope="module")
def bert_file(tmp_path_factory) -> Path:
    """A real torch.save of a state_dict with bert-base-cased's exact shapes and dtypes.

    Each tensor is a stride-0 view of its own one-element storage, so the file is tiny while
    the metadata (shape, dtype, numel) is the real model's.
    """
    import torch

    sd = {}
    for name, (shape, kind) in bert_base_cased_shapes().items():
        dtype = torch.float32 if kind == "f" else torch.int64
        sd[name] = torch.zeros(1, dtype=dtype).expand(*shape)
    path = tmp_path_factory.mktemp("bert") / "pytorch_model.bin"
    torch.save(sd, path)
    return path


BERT_PARAMS = 108_310_272
BERT_INT64_BUFFER_BYTES = 2 * 512 * 8


def test_bert_inventory_matches_the_model(bert_file):
    session = Session(open_checkpoint(bert_file))
    assert session.totals() == (BERT_PARAMS, BERT_PARAMS)
    est = estimate_for_session(session, "fp32", "none")
    assert est.parameters == BERT_PARAMS and est.buffers == 1024


def test_bert_reproduces_accelerate_total_size(bert_file):
    session = Session(open_checkpoint(bert_file))
    fp32 = estimate_for_session(session, "fp32", "none")
    assert fp32.total == BERT_PARAMS * 4 + BERT_INT64_BUFFER_BYTES == 433_249_280
    assert accelerate_mb(fp32.total) == 413.18  # accelerate: float32 Total Size 413.18 MB
    half = estimate_for_session(session, "fp16", "none")
    assert half.total == BERT_PARAMS * 2 + BERT_INT64_BUFFER_BYTES  # int64 buffers not cast
    assert accelerate_mb(half.total) == 206.59  # accelerate: float16 Total Size 206.59 MB


def test_bert_reproduces_accelerate_training_with_adam(bert_file):
    session = Session(open_checkpoint(bert_file))
    adam = estimate_for_session(session, "fp32", "adam")
    assert adam.weights == 433_249_280
    assert adam.gradients == BERT_PARAMS * 4
    assert adam.optimizer_states == BERT_PARAMS * 8
    assert adam.master_weights == 0
    # accelerate multiplies the whole model (buffers too) by 4; buffers need no grads or states
    assert 4 * adam.weights - adam.total == 3 * BERT_INT64_BUFFER_BYTES
    assert round(adam.total / GiB, 2) == 1.61  # accelerate: "Training using Adam" 1.61 GB
    assert estimate_for_session(session, "amp", "adam").total == adam.total


def test_bert_freezing_the_embeddings(bert_file):
    session = Session(open_checkpoint(bert_file))
    full = estimate_for_session(session, "fp32", "adamw")
    session.freeze_pattern("embeddings.*")
    frozen = estimate_for_session(session, "fp32", "adamw")
    emb = (28996 + 512 + 2) * 768 + 2 * 768
    assert frozen.trainable == BERT_PARAMS - emb
    assert frozen.weights == full.weights
    assert full.gradients - frozen.gradients == emb * 4
    assert full.optimizer_states - frozen.optimizer_states == emb * 8


# -- ZeRO / DeepSpeed / Megatron -----------------------------------------------------------------
def one_tensor(numel: int, dtype: str = "float32", trainable: bool = True):
    return [(numel, dtype, trainable, True)]


def test_zero_paper_16_bytes_per_parameter():
    for psi, published_gb in ((1.5e9, 24), (7.5e9, 120)):
        for precision in ("fp16-mixed", "bf16-mixed"):
            est = estimate(one_tensor(int(psi)), precision, "adam")
            assert est.weights == 2 * psi  # fp16 parameters
            assert est.gradients == 2 * psi  # fp16 gradients
            assert est.master_weights + est.optimizer_states == 12 * psi  # K = 12
            assert est.total == 16 * psi == published_gb * 10**9


def test_deepspeed_offload_optimizer_gpu_share():
    # estimate_zero2_model_states_mem_needs(..., cpu_offload=True): gpu = 2 * params
    est = estimate(one_tensor(2851 * 10**6), "fp16-mixed", "none")
    assert est.total == 2 * 2851 * 10**6
    assert round(est.total / GiB, 2) == 5.31  # DeepSpeed docs: 5.31GB per GPU for t5-3b


def test_megatron_fp32_row_and_sgd():
    assert sum(tensor_bytes(1, "float32", True, True, "fp32", "adam")) == 16
    assert sum(tensor_bytes(1, "float32", True, True, "bf16-mixed", "sgd")) == 8  # 2+2+4 master
    assert sum(tensor_bytes(1, "float32", True, True, "bf16", "sgd-momentum")) == 6
    assert sum(tensor_bytes(1, "bfloat16", True, True, "as-saved", "adamw")) == 8


def test_per_parameter_bytes_for_every_combination():
    expected = {  # (weights, grads, master, states) per trainable fp32-stored parameter, Adam
        "as-saved": (4, 4, 0, 8),
        "fp32": (4, 4, 0, 8),
        "amp": (4, 4, 0, 8),
        "bf16-mixed": (2, 2, 4, 8),
        "fp16-mixed": (2, 2, 4, 8),
        "bf16": (2, 2, 0, 4),
        "fp16": (2, 2, 0, 4),
    }
    assert set(expected) == set(PRECISIONS)
    for precision, parts in expected.items():
        assert tensor_bytes(1, "float32", True, True, precision, "adamw") == parts
        frozen = tensor_bytes(1, "float32", False, True, precision, "adamw")
        assert frozen == (parts[0], 0, 0, 0)
        assert tensor_bytes(1, "float32", True, True, precision, "none") == (parts[0], 0, 0, 0)


# -- freeze state, buffers, ties on the samples ----------------------------------------------------
@pytest.fixture
def two_halves(tmp_path) -> Path:
    """A real state_dict of two identical halves (enc and dec)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    half = lambda: nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8))  # noqa: E731
    model = nn.ModuleDict({"enc": half(), "dec": half()})
    path = tmp_path / "halves.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_freezing_half_halves_grads_and_states(two_halves, precision, optimizer):
    session = Session(open_checkpoint(two_halves))
    full = estimate_for_session(session, precision, optimizer)
    session.freeze_pattern("dec")
    half = estimate_for_session(session, precision, optimizer)
    assert half.trainable * 2 == full.trainable
    assert half.weights == full.weights
    assert half.gradients * 2 == full.gradients
    assert half.master_weights * 2 == full.master_weights
    assert half.optimizer_states * 2 == full.optimizer_states


def test_integer_buffers_are_never_cast():
    session = Session(open_checkpoint(SAMPLES / "cnn_state_dict.pt"))
    floats = sum(t.numel for t in session.records.values() if t.dtype == "float32")
    ints = [t for t in session.records.values() if t.dtype == "int64"]
    assert [t.name.rsplit(".", 1)[1] for t in ints] == ["num_batches_tracked"] * 2
    for precision, size in (("fp32", 4), ("bf16-mixed", 2), ("fp16", 2), ("as-saved", 4)):
        est = estimate_for_session(session, precision, "adamw")
        assert est.weights == floats * size + 2 * 8
        # running stats are buffers: no grads or states
        assert est.gradients == session.totals()[0] * size


def test_dtypes_sample_keeps_ints_bools_and_complex():
    ckpt = open_checkpoint(SAMPLES / "dtypes.pt")
    session = Session(ckpt)
    est = estimate_for_session(session, "bf16", "none")
    expected = 0
    for t in ckpt.model_tensors:
        if t.dtype.startswith(("float", "bfloat")):
            expected += t.numel * 2
        else:  # ints, bool, complex: as stored
            expected += t.nbytes
    assert est.weights == expected
    assert any("complex" in note for note in est.notes)
    training = estimate_for_session(session, "fp32", "adam")
    c64 = ckpt.tensor("complex64")
    assert session.is_trainable("complex64")
    grads_without_complex = estimate(
        [
            (t.numel, t.dtype, session.is_trainable(t.name), t.kind == "parameter")
            for t in ckpt.model_tensors
            if not t.dtype.startswith("complex")
        ],
        "fp32",
        "adam",
    ).gradients
    complex_grads = c64.nbytes + ckpt.tensor("complex128").nbytes
    assert training.gradients == grads_without_complex + complex_grads


def test_tied_weights_count_once():
    tied = estimate_for_session(Session(open_checkpoint(SAMPLES / "transformer_tied.pt")), "fp32")
    untied = estimate_for_session(
        Session(open_checkpoint(SAMPLES / "transformer.safetensors")), "fp32"
    )
    lm_head = 128 * 32
    assert tied.parameters == 21_760 and untied.parameters == 21_760 + lm_head
    assert untied.total - tied.total == lm_head * 16


def test_tied_weights_freeze_together(tmp_path):
    import torch

    w = torch.randn(10, 4)
    path = tmp_path / "tied.pt"
    torch.save({"embed.weight": w, "head.weight": w, "head.bias": torch.zeros(10)}, path)
    session = Session(open_checkpoint(path))
    assert estimate_for_session(session, "fp32", "sgd").gradients == (40 + 10) * 4
    session.freeze(["head.weight"])  # one Parameter: the embedding freezes too
    est = estimate_for_session(session, "fp32", "sgd")
    assert (est.trainable, est.gradients, est.weights) == (10, 40, 200)


def test_frozen_as_saved_in_a_full_module():
    session = Session(open_checkpoint(SAMPLES / "notebook_full.pt"))
    trainable, total = session.totals()
    est = estimate_for_session(session, "bf16-mixed", "adamw")
    assert (est.trainable, est.parameters) == (trainable, total) == (2090, 2170)
    assert est.gradients == trainable * 2 and est.master_weights == trainable * 4
    assert est.optimizer_states == trainable * 8
    assert estimate_for_session(session.ckpt, "bf16-mixed", "adamw") == est  # as saved


def test_nothing_trainable_is_just_the_weights():
    session = Session(open_checkpoint(SAMPLES / "transformer_tied.pt"))
    session.freeze_all()
    for optimizer in OPTIMIZERS:
        est = estimate_for_session(session, "fp16-mixed", optimizer)
        assert est.total == est.weights == 21_760 * 2
    assert any("nothing is trainable" in n for n in est.notes) is False  # "none" is inference
    assert any("nothing is trainable" in n for n in estimate_for_session(session).notes)


def test_notes_say_activations_are_excluded():
    est = estimate(one_tensor(10), "amp", "adamw")
    assert any("activations are not included" in n for n in est.notes)
    assert any("autocast" in n for n in est.notes)


def test_as_saved_half_checkpoint(tmp_path):
    import torch

    path = tmp_path / "half.pt"
    torch.save({"w": torch.zeros(100, dtype=torch.bfloat16), "b": torch.zeros(10)}, path)
    session = Session(open_checkpoint(path))
    est = estimate_for_session(session, "as-saved", "adam")
    assert est.weights == 200 + 40
    assert est.gradients == 200 + 40
    assert est.optimizer_states == 2 * (200 + 40)
    cast = estimate_for_session(session, "fp32", "none")
    assert cast.weights == 440
    assert any("bfloat16" in n for n in cast.notes)


# -- table, fits, rendering ------------------------------------------------------------------------
def test_estimate_table_covers_every_combination():
    session = Session(open_checkpoint(SAMPLES / "transformer_tied.pt"))
    rows = estimate_table(session)
    assert [(r.precision, r.optimizer) for r in rows] == [
        (p, o) for p in PRECISIONS for o in OPTIMIZERS
    ]
    for row in rows:
        assert row == estimate_for_session(session, row.precision, row.optimizer)
    sub = estimate_table(session, ["fp32"], ["sgd", "none"])
    assert [(r.precision, r.optimizer) for r in sub] == [("fp32", "sgd"), ("fp32", "none")]


def test_fits_and_headroom():
    """Whether it fits is judged on the step's peak: torch's default Adam step makes one more
    fp32 temporary per parameter (16 bytes held, 20 at the peak)."""
    est = estimate(one_tensor(1000), "fp32", "adam")
    assert est.total == 16_000 and est.peak == 20_000
    assert fits(est, 20_000) == (True, 0)
    assert fits(est, 19_999) == (False, -1)
    assert fits(est, 24_000) == (True, 4_000)
    assert fits(123, 100) == (False, -23)
    sgd = estimate(one_tensor(1000), "fp32", "sgd-momentum")
    assert sgd.peak == sgd.total == 12_000  # SGD steps in place


H200 = json.loads((Path(__file__).resolve().parents[1] / "data" / "h200_training_memory.json").read_text())


@pytest.mark.parametrize(
    "row", H200["rows"], ids=lambda r: f"{r['freeze']}-{r['precision']}-{r['optimizer']}"
)
def test_estimate_matches_a_real_training_step_on_an_h200(row):
    """scripts/gpu_check.py --full measured these; the estimate must stay within 2% of both what
    a training step leaves allocated and the step's peak (docs/memory-estimate.md)."""
    n, trainable = H200["parameters"], row["trainable"]
    params = [(trainable, "float32", True, True), (n - trainable, "float32", False, True)]
    est = estimate(params, row["precision"], row["optimizer"])
    assert est.trainable == trainable
    assert abs(est.total - row["steady"]) <= 0.02 * row["steady"]
    if row["optimizer"] != "none":
        assert abs(est.peak - row["step_peak"]) <= 0.02 * row["step_peak"]
    if "fused_step_peak" in row:  # fused=True: no temporaries, the peak is what stays
        assert abs(est.total - row["fused_step_peak"]) <= 0.02 * row["fused_step_peak"]


def test_unknown_names_are_one_line_errors():
    with pytest.raises(EstimateError) as exc:
        estimate(one_tensor(1), "fp8", "adam")
    assert isinstance(exc.value, MscopeError) and "\n" not in str(exc.value)
    assert "fp8" in str(exc.value) and "bf16-mixed" in str(exc.value)
    with pytest.raises(EstimateError, match="lion"):
        estimate_for_session(
            Session(open_checkpoint(SAMPLES / "cnn_state_dict.pt")), "fp32", "lion"
        )


def test_integer_parameters_never_train():
    est = estimate([(100, "int64", True, True)], "fp32", "adam")
    assert (est.trainable, est.gradients, est.optimizer_states, est.weights) == (0, 0, 0, 800)


@pytest.mark.parametrize("free", [None, 0, 10**6, 10**15])
def test_panel_fits_38_columns(bert_file, free):
    session = Session(open_checkpoint(bert_file))
    for est in estimate_table(session):
        lines = panel_lines(est, free)
        assert lines and all(len(line) <= PANEL_WIDTH for line in lines), lines
        assert any(line.startswith("total") for line in lines)
    huge = MemoryEstimate("fp16-mixed", "sgd-momentum", 10**15, 10**15, 10**15, 10**15, 1, 1, 0)
    assert all(len(line) <= PANEL_WIDTH for line in panel_lines(huge, 10**16))


@pytest.mark.parametrize("width", [20, 26, 30, 38])
def test_panel_narrow_widths_use_short_labels(width):
    est = estimate([(10**9, "float32", True, True)], "fp16-mixed", "sgd-momentum")
    lines = panel_lines(est, 10**10, width=width)
    assert all(len(line) <= width and line == line.rstrip() for line in lines), lines
    labels = [line.split("  ")[0].strip() for line in lines[1:5]]
    if width < 30:
        assert labels == ["weights", "grads", "master", "optim"]
    else:
        assert labels[0] == "weights (fp16)" and labels[2] == "master weights (fp32)"
    assert "…" not in "".join(lines[1:6])


def test_panel_says_whether_it_fits():
    est = estimate(one_tensor(1000), "fp32", "adam")
    assert "fits: 3.9 KiB to spare" in panel_lines(est, 24_000)  # the step peaks at 20,000 B
    assert any(line.startswith("does not fit") for line in panel_lines(est, 1_000))


def test_cli_renderings_fit_80_columns(bert_file):
    session = Session(open_checkpoint(bert_file))
    rows = estimate_table(session)
    table = render_table(rows, free_bytes=24 * GiB)
    assert all(len(line) <= 80 for line in table.splitlines())
    assert len(table.splitlines()) == 1 + len(rows) + 4  # header, rows, the free line, 3 notes
    assert len(render_table(rows).splitlines()) == 1 + len(rows) + 3
    text = render_text(rows[0], free_bytes=GiB)
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "does not fit" in text and "activations are not included" in text


# -- properties ------------------------------------------------------------------------------------
DTYPES = ["float32", "float16", "bfloat16", "float64", "int64", "bool", "complex64", "uint8"]
items = st.lists(
    st.tuples(st.integers(0, 10**9), st.sampled_from(DTYPES), st.booleans(), st.booleans()),
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(items, st.sampled_from(list(PRECISIONS)), st.sampled_from(list(OPTIMIZERS)))
def test_estimate_properties(params, precision, optimizer):
    est = estimate(params, precision, optimizer)
    assert est.total == est.weights + est.gradients + est.master_weights + est.optimizer_states
    assert est.total == sum(sum(tensor_bytes(*p, precision, optimizer)) for p in params)
    assert est.trainable <= est.parameters
    frozen = estimate([(n, d, False, p) for n, d, _, p in params], precision, optimizer)
    assert frozen.total == frozen.weights == est.weights
    inference = estimate(params, precision, "none")
    assert inference.total == est.weights


def test_inventory_groups_by_dtype_and_state():
    session = Session(open_checkpoint(SAMPLES / "notebook_full.pt"))
    counts = inventory(session)
    assert counts[("float32", False, True)] == 80  # stem.0 conv, frozen as saved
    assert counts[("int64", False, False)] == 2


@pytest.mark.parametrize("sample", ["transformer_tied.pt", "dtypes.pt", "notebook_full.pt", "lightning.ckpt"])
def test_session_inventory_matches_a_tally_tensor_by_tensor(sample):
    """inventory(session) moves each dtype's trainable elements over from a frozen tally kept
    per checkpoint: it must equal the plain loop over every tensor after any freeze state (tied
    parameters, integer parameters and buffers included), and a second session of the same
    checkpoint must not see the first one's state."""
    ckpt = open_checkpoint(SAMPLES / sample)
    session = Session(ckpt)
    names = list(session.records)
    assert session.canonical, "the sample has no trainable parameters: nothing is tested"
    rng = random.Random(sample)

    def tally(s: Session) -> Counter:
        counts = Counter()
        for t in ckpt.model_tensors:
            if t.alias_of is None:
                is_param = t.kind == PARAMETER
                counts[(t.dtype, bool(is_param and s.is_trainable(t.name)), is_param)] += t.numel
        return +counts

    def trains(s: Session) -> int:  # the header's total, which shares the inventory's per-dtype pass
        return sum(s.records[name].numel for name, on in s.trainable.items() if on)

    assert inventory(session) == tally(session)
    for _ in range(6):
        session.set_trainable(rng.sample(names, k=max(1, len(names) // 2)), rng.random() < 0.5)
        assert inventory(session) == tally(session)
        assert session.totals()[0] == trains(session) == sum(session.trainable_by_dtype().values())
    session.freeze_all()
    assert inventory(session) == tally(session) and not any(trains for _, trains, _ in inventory(session))
    fresh = Session(ckpt)
    assert inventory(fresh) == tally(fresh) != inventory(session)


def test_estimate_module_stays_light():
    code = (
        "import sys, modelscope_tui.training.estimate, modelscope_tui.training.devicemap\n"
        "print(sorted(m for m in ('torch', 'textual', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
