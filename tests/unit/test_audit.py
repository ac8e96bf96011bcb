"""mscope audit: statistics against torch's own reductions, planted defects, bad input, the CLI."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import tracemalloc
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_cli
from modelscope_tui.audit.norms import children_norms
from modelscope_tui.audit.runner import audit_path, run_audit
from modelscope_tui.cli.audit import fit_name, fmt_g, render_audit
from modelscope_tui.errors import Cancelled, TensorDataError
from modelscope_tui.readers import open_checkpoint
from modelscope_tui.values import kernels
from modelscope_tui.values.chunks import stats_supported
from modelscope_tui.values.data import TensorData
from modelscope_tui.values.stats import DEFAULT_CHUNK_BYTES
from modelscope_tui.values.stream import stream_stats, tensor_histogram, tensor_stats
from statref import reference


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def assert_stats(st, x: torch.Tensor, rel: float = 2e-6) -> None:
    ref = reference(x)
    scale = ref["norm"] / math.sqrt(max(1, x.numel())) or 1.0  # RMS: the size of a typical value
    for key in ("zeros", "nan", "inf"):
        assert getattr(st, key) == ref[key], (st.name, key, getattr(st, key), ref[key])
    for key in ("min", "max"):
        assert getattr(st, key) == ref[key], (st.name, key, getattr(st, key), ref[key])  # exact
    for key in ("mean", "std", "norm"):
        got, want = getattr(st, key), ref[key]
        if want is None:
            assert got is None
            continue
        assert math.isclose(got, want, rel_tol=rel, abs_tol=rel * scale), (st.name, key, got, want)


def stats_of(path: Path, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> dict:
    ckpt = open_checkpoint(path, strict=False)
    with TensorData() as data:
        return {t.name: tensor_stats(data, t, chunk_bytes) for t in ckpt.tensors}


def rewrite_zip(src: Path, dest: Path, change) -> Path:
    """Copy a torch zip member by member (stored), letting `change(name, data)` edit or drop
    (return None) each member."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
    return dest


@contextlib.contextmanager
def stored_as(tag):
    """torch.save as if the storages lived where `tag(storage)` says (no GPU needed)."""
    original = torch.serialization.location_tag
    torch.serialization.location_tag = tag
    try:
        yield
    finally:
        torch.serialization.location_tag = original


def codes(report) -> list[str]:
    return [f.code for f in report.findings]


def by_code(report, code: str) -> list:
    return [f for f in report.findings if f.code == code]


def layered_state_dict(layers: int = 6, width: int = 32, dtype=torch.float32) -> OrderedDict:
    g = torch.Generator().manual_seed(1)
    sd = OrderedDict()
    sd["embed.weight"] = torch.randn(50, width, generator=g).to(dtype)
    for i in range(layers):
        sd[f"layers.{i}.fc.weight"] = (torch.randn(width, width, generator=g) * 0.1).to(dtype)
        sd[f"layers.{i}.fc.bias"] = torch.zeros(width, dtype=dtype)
        sd[f"layers.{i}.norm.weight"] = torch.ones(width, dtype=dtype)
    return sd


# ----------------------------------------------------------------------------------------------
# statistics == torch
# ----------------------------------------------------------------------------------------------
def stats_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([1.5, float("nan"), float("-inf"), 0.0, -0.0, 3.0, float("inf"), -2.0])
    return {
        "fp32": torch.randn(300, 257, generator=g),
        "fp16": (torch.randn(1000, 301, generator=g) * 0.02).half(),
        "bf16": (torch.randn(999, 300, generator=g) * 0.02).bfloat16(),
        # a large mean next to a small spread: LayerNorm weights after training
        "ln_fp16": (1 + 1e-3 * torch.randn(70_000, generator=g)).half(),
        "ln_bf16": (1 + 1e-2 * torch.randn(70_000, generator=g)).bfloat16(),
        "ln_fp32": 3 + 1e-4 * torch.randn(70_000, generator=g),
        "fp64": torch.randn(4099, generator=g, dtype=torch.float64) * 1e3,
        "int64": torch.randint(-5, 100, (1000,), generator=g),
        "uint8": torch.randint(0, 255, (333,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(100, generator=g) > 0.5,
        "special_fp32": special,
        "special_fp16": special.half(),
        "special_bf16": special.bfloat16(),
        "special_fp64": special.double(),
        "neg_zero_fp16": torch.tensor([-0.0, -0.0, 1.0, -1.0]).half(),
        "all_negative_fp16": -torch.rand(500, generator=g).half() - 0.1,
        "subnormal_fp16": torch.tensor([6e-8, -6e-8, 1e-6, 5e-5, 65504.0, -65504.0]).half(),
        "huge_bf16": torch.tensor([3e38, -3e38, 1e20, 1.0]).bfloat16(),  # squares overflow float32
        "all_nan": torch.full((10,), float("nan")),
        "transposed": torch.randn(200, 100, generator=g).t(),
        "strided": torch.randn(100, 100, generator=g)[::3, 2:50],
        "expanded": torch.randn(1, 64, generator=g).expand(8, 64),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 5),
        "complex": torch.randn(40, generator=g, dtype=torch.complex64),
        "fp8": torch.randn(100, generator=g).to(torch.float8_e4m3fn),
    }


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("stats") / "stats.pt"
    tensors = stats_tensors()
    torch.save(tensors, path)
    return path, tensors


@pytest.mark.parametrize("backend", ["native", "numpy"])
@pytest.mark.parametrize("chunk", [4096, DEFAULT_CHUNK_BYTES])
def test_stats_match_torch(stats_file, chunk, backend, monkeypatch):
    """Both kernels: the compiled one-pass loop (statkernel.c) and the numpy fallback."""
    if backend == "numpy":
        monkeypatch.setattr(kernels, "compiled", None)
    else:
        assert kernels.compiled_kernel() is not None
    path, tensors = stats_file
    got = stats_of(path, chunk)
    for name, x in tensors.items():
        if name == "expanded":  # torch.save stores the expanded view's 64 values once
            x = x.contiguous()
        assert_stats(got[name], x)


def test_stats_of_half_precision_are_accurate_on_a_big_tensor(tmp_path):
    """fp16 / bf16 sums go through float32 per chunk and float64 between chunks: compare with
    float64 reductions on 4M values (many chunks)."""
    g = torch.Generator().manual_seed(3)
    tensors = {
        "h": (torch.randn(2048, 2048, generator=g) * 0.02 + 0.001).half(),
        "b": (torch.randn(2048, 2048, generator=g) * 0.02).bfloat16(),
    }
    save_file(tensors, tmp_path / "big.safetensors")
    got = stats_of(tmp_path / "big.safetensors")
    for name, x in tensors.items():
        assert_stats(got[name], x, rel=1e-6)


def test_threads_give_the_same_numbers(stats_file):
    path, _ = stats_file
    ckpt = open_checkpoint(path, strict=False)
    records = [t for t in ckpt.tensors if stats_supported(t.dtype)]
    with TensorData() as data:
        one = {r.name: s.to_dict() for r, s in stream_stats(data, records, 4096, threads=1)}
        three = {r.name: s.to_dict() for r, s in stream_stats(data, records, 4096, threads=3)}
    assert one == three and len(one) == len(records)


def test_flags(stats_file):
    path, _ = stats_file
    got = stats_of(path)
    assert got["special_fp16"].flags == ["nan", "inf"]
    assert got["all_nan"].flags == ["nan"]
    assert got["empty"].flags == []
    assert "all-zero" not in got["neg_zero_fp16"].flags


def test_histogram_matches_torch(stats_file):
    path, tensors = stats_file
    ckpt = open_checkpoint(path, strict=False)
    with TensorData() as data:
        h = tensor_histogram(data, ckpt.tensor("fp16"), bins=16)
        s = tensor_histogram(data, ckpt.tensor("special_fp32"), bins=4)
    x = tensors["fp16"].float()
    want = torch.histc(x, bins=16, min=x.min().item(), max=x.max().item())
    assert sum(h.counts) == x.numel()
    assert max(abs(a - b) for a, b in zip(h.counts, want.tolist())) <= 2  # edge rounding only
    assert len(h.edges) == 17
    assert (s.nan, s.inf, sum(s.counts), s.lo, s.hi) == (1, 2, 5, -2.0, 3.0)


def test_histogram_of_constant_and_nearly_constant_tensors(tmp_path):
    """A LayerNorm weight of ones (float32 and bf16) and two adjacent float32 values: the range
    is narrower than float32 can split into bins, which numpy refused with a ValueError (the
    explorer showed an internal error on the transformer sample's ln_f.weight)."""
    one = torch.ones(32)
    tensors = {
        "ones": one,
        "ones_bf16": one.bfloat16(),
        "adjacent": torch.tensor([1.0, float(torch.nextafter(one[0], torch.tensor(2.0)))] * 8),
        "zeros": torch.zeros(10),
    }
    save_file(tensors, tmp_path / "c.safetensors")
    ckpt = open_checkpoint(tmp_path / "c.safetensors")
    with TensorData() as data:
        for name, x in tensors.items():
            h = tensor_histogram(data, ckpt.tensor(name), bins=30)
            assert sum(h.counts) == x.numel(), name
            assert h.lo == x.float().min().item(), name
    assert h.counts[0] == 10 and max(h.counts[1:]) == 0  # all of "zeros" in the first bin


def test_memory_is_bounded_by_the_chunk_not_the_tensor(tmp_path):
    """A 16 MB fp16 tensor (and a gapped view of another) stream in 64 KB chunks: the Python-side
    peak (numpy allocations included) stays far below the tensor size."""
    torch.save(
        {"big": torch.randn(4096, 2048).half(), "gapped": torch.randn(2048, 2048)[:, ::2]},
        tmp_path / "big.pt",
    )
    ckpt = open_checkpoint(tmp_path / "big.pt", strict=False)
    with TensorData() as data:
        for name in ("big", "gapped"):
            tensor_stats(data, ckpt.tensor(name), 64 << 10)  # warm-up: lazy tables, scratch
            tracemalloc.start()
            tensor_stats(data, ckpt.tensor(name), 64 << 10)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < 2 << 20, (name, peak)


def test_stream_reports_progress_and_can_be_cancelled(stats_file):
    path, _ = stats_file
    ckpt = open_checkpoint(path, strict=False)
    records = [t for t in ckpt.tensors if stats_supported(t.dtype)]
    seen = []
    with TensorData() as data:
        list(stream_stats(data, records, 4096, threads=1, progress=seen.append))
    assert seen[-1].done == seen[-1].total == sum(r.nbytes for r in records)
    assert seen[-1].fraction == 1.0 and seen[-1].eta == 0.0
    cancel = threading.Event()
    cancel.set()
    report = run_audit(ckpt, stats=True, cancel=cancel)
    assert report.cancelled and report.verdict == "cancelled" and report.exit_code == 1
    with TensorData() as data, pytest.raises(Cancelled):
        tensor_stats(data, ckpt.tensor("fp32"), 4096, cancel=cancel)


# ----------------------------------------------------------------------------------------------
# planted defects
# ----------------------------------------------------------------------------------------------
def test_planted_defects_give_exact_findings(tmp_path):
    sd = layered_state_dict()
    sd["layers.2.fc.weight"].zero_()  # a zeroed layer
    sd["layers.4.fc.weight"][3, 7] = float("nan")
    sd["layers.5.fc.weight"][0, 0] = float("inf")
    sd["layers.1.fc.weight"][1, 1] = 5e4
    base = torch.randn(100, 1024)
    sd["head.weight"] = base[7]  # a 1% slice, saved with its 100x larger base
    path = tmp_path / "planted.pt"
    torch.save(sd, path)

    report = audit_path(path, stats=True)
    found = {(f.code, f.tensor) for f in report.findings}
    assert ("nan", "layers.4.fc.weight") in found
    assert ("inf", "layers.5.fc.weight") in found
    assert ("all-zero", "layers.2.fc.weight") in found
    assert ("exploding", "layers.1.fc.weight") in found
    assert ("norm-outlier", "layers.2.fc.weight") in found
    assert ("oversized-storage", "head.weight") in found
    assert by_code(report, "nan")[0].message == "layers.4.fc.weight: 1 NaN value(s) of 1,024"
    assert "100x" in by_code(report, "oversized-storage")[0].message
    # zero biases and unit norm weights are normal: notes, not warnings
    zero_bias = [f for f in report.findings if f.code == "all-zero" and f.tensor.endswith("bias")]
    assert len(zero_bias) == 6 and all(f.severity == "info" for f in zero_bias)
    # no duplicate noise from the six identical zero biases / unit norms
    assert "duplicate-tensor" not in codes(report)
    assert report.verdict == "fail" and report.failed() == {"nan": 1, "inf": 1}
    assert report.verdict_line().startswith("FAIL: inf (1), nan (1)")
    assert report.stats["layers.4.fc.weight"].nan == 1
    profile = report.norm_profile[0]
    assert profile["container"] == "layers" and [r["index"] for r in profile["layers"]] == list(
        range(6)
    )
    # the metadata-only audit reads no values and finds only the layout problem
    quick = audit_path(path)
    assert {f.code for f in quick.findings} == {"oversized-storage"} and quick.stats == {}
    assert quick.ok and quick.verdict_line().endswith("(metadata only; --stats reads the values)")


def test_cuda_location_needs_map_location(tmp_path):
    path = tmp_path / "gpu.pt"
    with stored_as(lambda storage: "cuda:1"):
        torch.save({"w": torch.randn(4, 4)}, path)
    report = audit_path(path)
    (f,) = by_code(report, "map-location")
    assert "cuda:1" in f.message and "map_location='cpu'" in f.message
    assert report.loadability["map_location"] == "cpu"
    assert report.loadability["locations"]["cuda:1"]["tensors"] == 1
    assert report.ok  # a warning, not in the default --fail-on
    assert not audit_path(path, fail_on=("device",)).ok


def test_unsafe_globals_get_an_add_safe_globals_line_that_works(tmp_path):
    path = tmp_path / "train.pt"
    torch.save({"model": layered_state_dict(2), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(Exception, match="weights_only"):
        torch.load(path, weights_only=True)
    report = audit_path(path)
    (f,) = by_code(report, "unsafe-global")
    line = report.loadability["add_safe_globals"]
    assert (
        line == "import torch, argparse; torch.serialization.add_safe_globals([argparse.Namespace])"
    )
    assert f.details["add_safe_globals"] == line and "add_safe_globals" in f.message
    code = f"{line}\nx = torch.load({str(path)!r}, weights_only=True)\nprint(x['args'].lr)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "0.1", out.stderr
    assert report.loadability["weights_only"] is False and report.ok
    assert not audit_path(path, fail_on=("unsafe",)).ok


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_dangerous_globals_are_loud_and_fail_by_default(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": _Payload()}, path)
    report = audit_path(path)
    (f,) = by_code(report, "dangerous-global")
    assert f.severity == "error" and "DANGEROUS" in f.message and "echo pwned" in f.message
    assert report.failed() == {"dangerous": 1} and report.exit_code == 1
    assert report.loadability["add_safe_globals"] is None  # never offered for code execution


def test_waste_optimizer_share_and_fp32_copies(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    half = {k: v.half() for k, v in model.state_dict().items()}
    master = {k: v.float().clone() for k, v in model.state_dict().items()}
    path = tmp_path / "train.pt"
    torch.save({"model": half, "optimizer": opt.state_dict(), "master": master}, path)
    report = audit_path(path)
    (opt_f,) = by_code(report, "optimizer-state")
    moments = sum(4 * p.numel() for p in model.parameters()) * 2
    assert report.waste["optimizer_bytes"] == moments + 4 * 4  # exp_avg, exp_avg_sq, step
    assert 0.4 < report.waste["optimizer_share"] < 0.7 and "%" in opt_f.message
    (fp32,) = by_code(report, "fp32-copies")
    assert report.waste["fp32_copies"]["tensors"] == 4  # the master copy, not Adam's moments
    assert fp32.tensor.startswith("master/")


def test_duplicates_found_from_stats_and_by_hash(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g)
    sd = {
        "a.weight": w,
        "b.weight": w.clone(),
        "tied.weight": w,
        "c.weight": torch.randn(64, 64, generator=g),
    }
    sd["z1"], sd["z2"] = torch.zeros(512), torch.zeros(512)
    path = tmp_path / "dup.pt"
    torch.save(sd, path)
    for report in (audit_path(path, stats=True), audit_path(path, dedupe=True)):
        (f,) = by_code(report, "duplicate-tensor")
        assert f.details["tensors"] == ["a.weight", "b.weight"]  # tied.weight shares a's storage
        assert report.waste["duplicate_waste_bytes"] == 64 * 64 * 4
    assert "duplicate-tensor" not in codes(audit_path(path))  # metadata only: no bytes read


# ----------------------------------------------------------------------------------------------
# bad input: findings, not crashes
# ----------------------------------------------------------------------------------------------
def test_truncated_and_missing_storages_are_findings(tmp_path):
    src = tmp_path / "ok.pt"
    torch.save({"a": torch.randn(100), "b": torch.randn(100), "c": torch.full((10,), 2.0)}, src)
    keys = {t.name: t.storage.key for t in open_checkpoint(src).tensors}

    def damage(name: str, data: bytes):
        if name.endswith(f"/data/{keys['a']}"):
            return data[:50]  # truncated
        if name.endswith(f"/data/{keys['b']}"):
            return None  # missing
        return data

    bad = rewrite_zip(src, tmp_path / "bad.pt", damage)
    report = audit_path(bad, stats=True)
    found = {(f.code, f.tensor) for f in report.findings}
    assert ("truncated-storage", "a") in found and ("missing-storage", "b") in found
    assert set(report.stats) == {"c"} and report.stats["c"].flags == ["constant"]
    assert report.failed() == {"corrupt": 2} and report.exit_code == 1


def test_rezipped_archive_is_flagged(tmp_path):
    """A deflated storage: torch.load reads it, torch.load(mmap=True) silently returns garbage."""
    src = tmp_path / "ok.pt"
    torch.save({"a": torch.arange(10.0)}, src)
    with (
        zipfile.ZipFile(src) as zin,
        zipfile.ZipFile(tmp_path / "rezipped.pt", "w", zipfile.ZIP_DEFLATED) as zout,
    ):
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    report = audit_path(tmp_path / "rezipped.pt", stats=True)
    (f,) = report.findings
    assert (f.code, f.tensor, f.severity) == ("compressed-storage", "a", "warning")
    assert "mmap=True" in f.message and report.stats == {}
    assert not audit_path(tmp_path / "rezipped.pt", fail_on=("compressed",)).ok


def test_truncated_legacy_file(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(
        {"a": torch.randn(1000), "b": torch.randn(10)}, path, _use_new_zipfile_serialization=False
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 2000])
    report = audit_path(path, stats=True)
    assert report.failed().get("corrupt", 0) >= 1
    assert {f.code for f in report.findings} & {"truncated-storage", "missing-storage"}


def test_unopenable_file_is_a_finding(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"a": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    report = audit_path(path, stats=True)
    (f,) = report.findings
    assert f.code == "unreadable-file" and "past the end of the file" in f.message
    assert report.exit_code == 1
    data = json.loads(report.to_json())
    assert data["verdict"]["status"] == "fail" and data["findings"][0]["category"] == "corrupt"


def test_crc_check_finds_a_flipped_byte(tmp_path):
    src = tmp_path / "ok.pt"
    torch.save({"a": torch.randn(1000), "b": torch.randn(10)}, src)
    assert not by_code(audit_path(src, crc=True), "crc-mismatch")
    key = {t.name: t.storage.key for t in open_checkpoint(src).tensors}["a"]
    ckpt = open_checkpoint(src)
    offset = ckpt.tensor("a").storage.data_offset + 100
    raw = bytearray(src.read_bytes())
    raw[offset] ^= 0xFF
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(raw))
    report = audit_path(bad, crc=True)
    (f,) = by_code(report, "crc-mismatch")
    assert f.tensor == "a" and f.details["member"].endswith(f"data/{key}")
    assert report.integrity["crc_checked"] == report.integrity["crc_members"] > 3


# ----------------------------------------------------------------------------------------------
# sharded sets
# ----------------------------------------------------------------------------------------------
def make_shards(tmp_path: Path) -> Path:
    d = tmp_path / "sharded"
    d.mkdir(parents=True)
    save_file({"a": torch.randn(100), "b": torch.randn(50)}, d / "model-00001-of-00002.safetensors")
    save_file({"c": torch.randn(100)}, d / "model-00002-of-00002.safetensors")
    index = {
        "metadata": {"total_size": 250 * 4},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00001-of-00002.safetensors",
            "c": "model-00002-of-00002.safetensors",
        },
    }
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def test_sharded_set_consistent(tmp_path):
    d = make_shards(tmp_path)
    report = audit_path(d, stats=True)
    assert report.ok and not [f for f in report.findings if f.severity != "info"]
    assert report.integrity["shards"] == 2 and len(report.stats) == 3


def test_sharded_missing_shard(tmp_path):
    d = make_shards(tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    report = audit_path(d)
    (f,) = report.findings
    assert f.code == "shard-missing" and "model-00002-of-00002.safetensors" in f.message
    assert report.failed() == {"corrupt": 1}


def test_sharded_wrong_size_and_total(tmp_path):
    d = make_shards(tmp_path)
    shard = d / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-40])
    report = audit_path(d)
    (f,) = report.findings
    assert (
        f.code == "shard-unreadable" and "model-00002" in f.message and "past the end" in f.message
    )

    d2 = make_shards(tmp_path / "second")
    index = json.loads((d2 / "model.safetensors.index.json").read_text())
    index["metadata"]["total_size"] = 12345
    index["weight_map"]["ghost"] = "model-00002-of-00002.safetensors"
    (d2 / "model.safetensors.index.json").write_text(json.dumps(index))
    report = audit_path(d2)
    assert [f.code for f in report.findings] == ["shard-tensor-missing"]
    del index["weight_map"]["ghost"]
    (d2 / "model.safetensors.index.json").write_text(json.dumps(index))
    report = audit_path(d2)
    (f,) = by_code(report, "shard-total-size")
    assert "12,345" in f.message and report.ok
    assert not audit_path(d2, fail_on=("shard",)).ok


# ----------------------------------------------------------------------------------------------
# explorer API and CLI
# ----------------------------------------------------------------------------------------------
def test_children_norms(tmp_path):
    sd = layered_state_dict(3)
    torch.save(sd, tmp_path / "m.pt")
    report = audit_path(tmp_path / "m.pt", stats=True)
    ckpt = open_checkpoint(tmp_path / "m.pt")
    rows = children_norms(report.stats, ckpt, "layers")
    assert [r["name"] for r in rows] == ["layers.0", "layers.1", "layers.2"]
    want = math.sqrt(
        sum(
            float(sd[f"layers.1.{k}"].double().pow(2).sum())
            for k in ("fc.weight", "fc.bias", "norm.weight")
        )
    )
    assert math.isclose(rows[1]["norm"], want, rel_tol=1e-6) and rows[1]["complete"]
    assert children_norms(report.stats, ckpt, "nope") == []


def test_stats_do_not_import_numpy_for_contiguous_half_and_float32(tmp_path):
    """The compiled kernel reads the mapping by address: numpy's ~0.1 s import is not paid."""
    g = torch.Generator().manual_seed(4)
    tensors = {
        "h": torch.randn(64, 33, generator=g).half(),
        "b": torch.randn(1000, generator=g).bfloat16(),
        "f": torch.randn(7, 9, generator=g),
    }
    save_file(tensors, tmp_path / "m.safetensors")
    code = (
        "import sys; from modelscope_tui.audit.runner import audit_path;"
        f"r = audit_path({str(tmp_path / 'm.safetensors')!r}, stats=True);"
        "print(len(r.stats), 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["3", "False"], out.stderr


def test_native_source_refuses_a_view_past_its_storage(stats_file):
    """The compiled loop reads raw addresses, so a view that claims more than its storage holds
    is refused before any read (a crafted file must not make it read past the mapping)."""
    path, _ = stats_file
    ckpt = open_checkpoint(path, strict=False)
    record = next(t for t in ckpt.tensors if t.name == "fp16")
    assert kernels.compiled_kernel() is not None
    record.storage_offset = record.storage.nbytes // 2 // record.itemsize
    with TensorData() as data, pytest.raises(TensorDataError, match="does not fit its storage"):
        tensor_stats(data, record)


def test_audit_module_is_light():
    """Every module of audit/, diff/ and values/ imports without torch, numpy, textual or rich."""
    code = (
        "import importlib, pkgutil, sys\n"
        "for name in ('audit', 'diff', 'values'):\n"
        "    pkg = importlib.import_module('modelscope_tui.' + name)\n"
        "    for m in pkgutil.iter_modules(getattr(pkg, '__path__', [])):\n"
        "        importlib.import_module(f'{pkg.__name__}.{m.name}')\n"
        "print(sorted({'torch', 'numpy', 'textual', 'rich'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


def test_cli_audit_json_and_exit_codes(tmp_path):
    sd = layered_state_dict(2)
    sd["layers.0.fc.weight"][0, 0] = float("nan")
    path = tmp_path / "m.pt"
    torch.save(sd, path)
    res = run_cli("audit", path, "--stats", "--json")
    assert res.rc == 1, res.stderr
    data = json.loads(res.stdout)
    assert data["schema"] == "mscope.audit" and data["schema_version"] == 1
    assert data["verdict"]["failed"] == {"nan": 1}
    names = {s["name"]: s for s in data["stats"]["tensors"]}
    assert names["layers.0.fc.weight"]["nan"] == 1 and data["stats"]["bytes_read"] > 0
    assert res.stderr == ""  # no progress bar when stderr is not a terminal
    res = run_cli("audit", path, "--stats", "--fail-on", "none")
    assert res.rc == 0 and "PASS with findings" in res.stdout and "nan" in res.stdout
    res = run_cli("audit", path, "--fail-on", "bogus")
    assert res.rc == 2 and "unknown name 'bogus'" in res.stderr
    res = run_cli("audit", tmp_path / "missing.pt")
    assert res.rc == 2 and "no such file" in res.stderr


def test_text_report_keeps_every_number_whole_at_80_columns(tmp_path):
    """`mscope audit --stats` in an 80-column terminal: the statistics columns take what they
    need (they showed "-0.1…") and long tensor names are shortened in the middle instead."""
    import io

    from rich.console import Console

    g = torch.Generator().manual_seed(9)
    sd = {
        f"model.encoder.layers.{i}.self_attention.in_proj_weight": torch.randn(64, 32, generator=g) * 0.02 - 0.0007
        for i in range(3)
    }
    torch.save(sd, tmp_path / "m.pt")
    report = audit_path(tmp_path / "m.pt", stats=True)
    out = io.StringIO()
    render_audit(report, Console(file=out, width=80, color_system=None, highlight=False))
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    for i in range(3):
        st = report.stats[f"model.encoder.layers.{i}.self_attention.in_proj_weight"]
        row = next(line for line in text.splitlines() if line.startswith(f"m.e.l.{i}.s.in_proj_weight "))
        for value in (st.min, st.max, st.mean, st.std, st.norm):
            assert fmt_g(value) in row.split(), row


def test_fit_name_keeps_layer_numbers():
    name = "model.encoder.layers.11.self_attention.in_proj_weight"
    assert fit_name(name, 60) == name
    assert fit_name(name, 40) == "m.e.l.11.self_attention.in_proj_weight"
    assert fit_name(name, 25) == "m.e.l.11.s.in_proj_weight"
    short = fit_name(name, 12)
    assert len(short) == 12 and short.startswith("m.e.l") and "…" in short


def test_stats_text_says_how_many_rows_it_shows_and_all_stats_shows_every_one():
    path = str(Path(__file__).resolve().parents[2] / "sample_models" / "train_checkpoint.pt")
    cmd = [sys.executable, "-m", "modelscope_tui", "audit", "--stats"]
    short = subprocess.run([*cmd, path], capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"})
    assert "10 of 46 tensors shown" in short.stdout and "--all-stats" in short.stdout
    assert all(len(line) <= 80 for line in short.stdout.splitlines())
    full = subprocess.run([*cmd, "--all-stats", path], capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"})
    assert full.returncode == 0 and "tensors shown" not in full.stdout
    table = full.stdout.split("statistics:", 1)[1]
    assert sum(1 for line in table.splitlines() if line.strip().endswith("%")) == 46
