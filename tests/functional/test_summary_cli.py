"""`mscope summary` as a user runs it: text that fits 80 columns, JSON with a stable schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"
ALL_SAMPLES = sorted(
    p.name for p in SAMPLES.iterdir() if p.name not in ("README.md", "make_samples.py") and not p.name.startswith(".")
)


def mscope(*args: str, columns: int = 80) -> subprocess.CompletedProcess:
    # PYTHONPATH: this tree's sources, not whichever checkout the environment installed
    env = {"COLUMNS": str(columns), "PATH": "/usr/bin:/bin", "TERM": "dumb", "PYTHONPATH": str(SAMPLES.parent / "src")}
    return subprocess.run(
        [sys.executable, "-m", "modelscope_tui", *args], capture_output=True, text=True, timeout=60, env=env
    )


@pytest.mark.parametrize("sample", ALL_SAMPLES)
def test_text_summary_fits_80_columns(sample):
    result = mscope("summary", str(SAMPLES / sample))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and max(len(line) for line in lines) <= 80
    assert any(line.startswith("trainable params: ") for line in lines)
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("sample", ALL_SAMPLES)
def test_json_summary_schema(sample):
    result = mscope("summary", "--json", str(SAMPLES / sample))
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema"] == "mscope.summary" and doc["schema_version"] == 1
    for key in ("file", "format", "kind", "totals", "modules", "tensors", "entries", "globals", "sections"):
        assert key in doc
    model = [t for t in doc["tensors"] if t["section"] == ""]
    assert doc["totals"]["tensors"] == len(model)
    unique_params = sum(t["numel"] for t in model if t["kind"] == "parameter" and t["alias_of"] is None)
    assert doc["totals"]["parameters"] == unique_params
    assert doc["modules"][0]["name"] == ""
    assert doc["modules"][0]["parameters"] == doc["totals"]["parameters"]


def test_totals_line_matches_torch_counts():
    sd = torch.load(SAMPLES / "transformer_tied.pt", weights_only=True)
    unique = {t.untyped_storage().data_ptr(): t.numel() for t in sd.values() if t.is_floating_point()}
    result = mscope("summary", str(SAMPLES / "transformer_tied.pt"))
    total = sum(unique.values())
    assert f"all params: {total:,}" in result.stdout


def test_filter_and_depth():
    result = mscope("summary", "--json", "--filter", "blocks.0.*", str(SAMPLES / "transformer_tied.pt"))
    names = [t["name"] for t in json.loads(result.stdout)["tensors"]]
    assert names and all(n.startswith("blocks.0.") for n in names)
    text = mscope("summary", "--depth", "1", str(SAMPLES / "transformer_tied.pt")).stdout
    assert "blocks" in text and "blocks.0.attn" not in text and "weight " not in text.split("trainable params")[0].split("\n", 3)[-1]


def test_mixed_trainable_full_module_totals():
    result = mscope("summary", str(SAMPLES / "notebook_full.pt"))
    doc = json.loads(mscope("summary", "--json", str(SAMPLES / "notebook_full.pt")).stdout)
    frozen = sum(t["numel"] for t in doc["tensors"] if t["kind"] == "parameter" and not t["trainable"])
    assert frozen > 0 and doc["totals"]["frozen"] == frozen
    pct = 100 * doc["totals"]["trainable"] / doc["totals"]["parameters"]
    assert f"trainable%: {pct:.2f}" in result.stdout
    assert "__main__.Net" in result.stdout


def test_optimizer_summary_counts_parameters_with_state():
    from modelscope_tui import open_checkpoint
    from modelscope_tui.summary import optimizer_summaries

    loaded = torch.load(SAMPLES / "train_checkpoint.pt", weights_only=True)
    line = optimizer_summaries(open_checkpoint(SAMPLES / "train_checkpoint.pt"))["optimizer"]
    assert line.startswith("Adam-like: 1 param group(s), lr 0.0005")
    assert f"state for {len(loaded['optimizer']['state'])} parameter(s)" in line


@pytest.mark.parametrize("sample", ALL_SAMPLES)
@pytest.mark.parametrize("depth, pattern", [(None, None), (1, None), (None, "*weight*")])
def test_fast_json_is_exactly_the_dict_encoding(sample, depth, pattern):
    from modelscope_tui.readers import open_checkpoint
    from modelscope_tui.summary import summary_dict, summary_json

    ckpt = open_checkpoint(SAMPLES / sample)
    expected = json.dumps(summary_dict(ckpt, depth, pattern), separators=(",", ":"))
    assert summary_json(ckpt, depth, pattern) == expected


def test_fast_json_escapes_odd_names(tmp_path):
    from modelscope_tui.readers import open_checkpoint
    from modelscope_tui.summary import summary_dict, summary_json

    names = ['quote".weight', "back\\slash.bias", "tab\tnew\nline.w", "ünïcödé.层.weight", "emoji.🙂"]
    path = tmp_path / "odd.pt"
    torch.save({n: torch.zeros(2, dtype=torch.float16) for n in names} | {"step": torch.tensor(3)}, path)
    ckpt = open_checkpoint(path)
    text = summary_json(ckpt)
    assert text == json.dumps(summary_dict(ckpt), separators=(",", ":"))
    assert sorted(t["name"] for t in json.loads(text)["tensors"]) == sorted([*names, "step"])


def test_output_cut_short_by_a_pipe_exits_quietly(tmp_path):
    path = tmp_path / "many.pt"
    torch.save({f"blocks.{i}.weight": torch.zeros(1) for i in range(4000)}, path)
    # 4,000 tensor lines is far more than a pipe buffer holds, so `head` closes the pipe mid-write.
    shell = f'"{sys.executable}" -m modelscope_tui summary --filter "*" "{path}" | head -1; echo "rc=${{PIPESTATUS[0]}}"'
    result = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines()[0].startswith("many.pt")
    assert result.stdout.splitlines()[-1] == "rc=0"
    assert result.stderr == ""


def test_text_summary_folds_long_runs_of_modules(tmp_path):
    """Past AUTO_DEPTH_TENSORS the report picks depth 2 itself; one module with 500 children
    must not print 500 rows (10,000 blocks took 11 s of table layout): 24, then one row with
    the rest's totals. An asked-for --depth still lists every module."""
    sd = {f"layers.{i}.{leaf}": torch.zeros(3) for i in range(500) for leaf in ("weight", "bias")}
    sd["head.weight"] = torch.zeros(7)
    path = tmp_path / "wide.pt"
    torch.save(sd, path)
    text = mscope("summary", str(path)).stdout
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines)
    rows = [line.split() for line in lines]
    assert ["│", "├─", "23", "yes", "6", "24", "B"] in rows
    assert not any(row[:3] == ["│", "├─", "24"] for row in rows)
    assert ["│", "└─", "…", "476", "more", "(24", "…", "499)", "yes", "2.9K", "11.2", "KiB"] in rows
    assert ["└─", "head", "yes", "7", "28", "B"] in rows  # the module after the folded run
    assert "trainable params: 3,007 || all params: 3,007" in text
    asked = mscope("summary", "--depth", "2", str(path)).stdout.splitlines()
    assert not any("more (" in line for line in asked)
    assert ["│", "└─", "499", "yes", "6", "24", "B"] in [line.split() for line in asked]


def test_lightning_entries_put_hyper_parameters_first_and_fold_counters():
    """A Lightning checkpoint listed ~30 loop counters, pushed hyper-parameters into "... more",
    and showed six identical-looking callback lines (the key is the callback's repr)."""
    import os

    path = Path(__file__).resolve().parents[2] / "sample_models" / "lightning.ckpt"
    run = subprocess.run(
        [sys.executable, "-m", "modelscope_tui", "summary", str(path)],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"},
    )  # fmt: skip
    entries = run.stdout.split("Entries", 1)[1].splitlines()
    text = "\n".join(entries)
    assert text.index("hyper_parameters.lr") < text.index("epoch = 2") < text.index("loops.")
    assert "loops.fit_loop.* = 18 counters (1 to 120)" in text
    assert sum("batch_progress" in line for line in entries) == 0
    assert "callbacks.ModelCheckpoint{…}.monitor = val_loss" in text
    body = [line for line in entries if line.startswith("  ")]
    assert len(body) == len(set(body))


def test_optimizer_hyper_parameters_are_not_folded_as_counters():
    """Folding is for repeated counters; lr, eps and weight_decay stay listed."""
    from modelscope_tui.checkpoint import Entry
    from modelscope_tui.cli.summary import entry_lines

    groups = [Entry(f"optimizer.param_groups.0.{k}", "float", v) for k, v in
              {"lr": 5e-4, "eps": 1e-8, "weight_decay": 0, "momentum": 0.9, "dampening": 0, "initial_lr": 1e-3, "beta": 0.5}.items()]  # fmt: skip
    progress = [Entry(f"loops.fit.{w}.{k}", "int", 3) for w in ("total", "current") for k in ("ready", "started", "completed", "processed")]
    lines, hidden = entry_lines(groups + progress)
    assert "optimizer.param_groups.0.lr = 0.0005" in lines and not hidden
    assert lines[-1] == "loops.fit.* = 8 counters (3 to 3)"


def _table_rows(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Module / tensor"))
    end = next(i for i, line in enumerate(lines) if line.startswith("trainable params: ") or line.endswith("shows more)"))
    return lines[start + 1 : end]


@pytest.mark.parametrize("columns", [80, 200])
@pytest.mark.parametrize("sample", ALL_SAMPLES)
def test_text_summary_never_cuts_shape_or_dtype(sample, columns):
    """Every tensor row shows its whole shape and dtype, at 80 and at 200 columns."""
    doc = json.loads(mscope("summary", "--json", str(SAMPLES / sample)).stdout)
    result = mscope("summary", str(SAMPLES / sample), columns=columns)
    assert result.returncode == 0, result.stderr
    assert max(len(line) for line in result.stdout.splitlines()) <= columns
    rows = _table_rows(result.stdout)
    assert not any("…" in cell for row in rows for cell in row.split("  ")[1:] if cell.strip())
    if len(doc["tensors"]) <= 400:  # listed one per row
        model = [t for t in doc["tensors"] if t["section"] == "" or doc["sections"].get(t["section"]) == "model"]
        for t in model:
            shape = "×".join(map(str, t["shape"])) or "scalar"
            assert any(shape in row and t["dtype"] in row for row in rows), (t["name"], shape)


def _long_names(tmp_path: Path) -> Path:
    sd = {}
    for i in range(2):
        block = f"model.decoder.layers.{i}.self_attn_with_a_very_long_module_name"
        sd[f"{block}.in_proj_weight_of_the_attention"] = torch.zeros(96, 32)
        sd[f"{block}.in_proj_bias_of_the_attention"] = torch.zeros(96)
        sd[f"{block}.norm.running_mean_of_this_long_batch_norm"] = torch.zeros(4)
        sd[f"{block}.norm.running_var_of_this_long_batch_norm"] = torch.zeros(4)
    sd["model.decoder.embed_tokens.weight"] = torch.zeros(50272, 20, dtype=torch.bfloat16)
    sd["tiny_fp8"] = torch.zeros(3, dtype=torch.float8_e4m3fn)
    sd["tiny_complex"] = torch.zeros(3, dtype=torch.complex128)
    path = tmp_path / "long.pt"
    torch.save(sd, path)
    return path


@pytest.mark.parametrize("columns", [80, 100, 200])
def test_shortened_siblings_stay_apart(tmp_path, columns):
    """Names give way to shape and dtype, but two siblings never read the same."""
    result = mscope("summary", str(_long_names(tmp_path)), columns=columns)
    assert result.returncode == 0, result.stderr
    rows = _table_rows(result.stdout)
    assert max(len(line) for line in result.stdout.splitlines()) <= columns
    for shape, dtype in (("96×32", "float32"), ("50272×20", "bfloat16"), ("3", "float8_e4m3fn"), ("3", "complex128")):
        assert any(f" {shape} " in f" {row} " and dtype in row for row in rows)
    def name(row: str) -> str:
        return row.lstrip("│├└─ ").split("  ")[0]

    tensor_names = [name(row) for row in rows if "float32" in row]
    assert len(set(tensor_names[:2])) == 2, tensor_names  # in_proj_weight… / in_proj_bias…
    norms = [name(row) for row in rows if " 4 " in f" {row} "]
    assert len(norms) == 4 and norms[0] != norms[1], norms  # running_mean… / running_var…


def test_wide_shows_exact_counts_and_full_names(tmp_path):
    result = mscope("summary", "--wide", str(_long_names(tmp_path)), columns=80)
    assert "1,005,440" in result.stdout and "in_proj_weight_of_the_attention" in result.stdout
    narrow = mscope("summary", str(_long_names(tmp_path)), columns=80).stdout
    assert "1,005,440" not in narrow and "1.0M" in narrow


def test_header_wraps_between_dtypes_and_marks_views():
    out = mscope("summary", str(SAMPLES / "dtypes.pt"), columns=80).stdout
    head = out.split("Module / tensor")[0].splitlines()[1:]
    assert len(head) > 1
    for line in head:  # a size is never split from its unit: no line starts with "B," or ends in a number
        assert not line.startswith(("B", "KiB")) and not line.rstrip(",").split()[-1].isdigit(), line
    assert "526 B (470 B stored: views share storage)" in out
    assert "base_slice (view of base)" in out
