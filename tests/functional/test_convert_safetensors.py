"""`mscope convert`: every sample to safetensors and back through the diff, checked against the
libraries' own loaders (safetensors.torch.load_file against torch.load of the source)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from modelscope_tui.readers import open_checkpoint
from modelscope_tui.write.atomic import SaveError
from modelscope_tui.write.convert import INDEX_NAME, convert, verify_convert

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"
# every sample but the GGUF, whose tensors are block-quantized (refused: test below)
CONVERTIBLE = sorted(
    p.name
    for p in SAMPLES.iterdir()
    if p.name not in ("README.md", "make_samples.py", "llama_tiny.gguf")
)


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def reference(name: str, tmp_path: Path) -> dict[str, torch.Tensor] | None:
    """The model tensors as the source's own library loads them (None: it needs the model's code)."""
    path = SAMPLES / name
    if name.endswith(".safetensors"):
        return load_file(path)
    if name == "sharded_hf":
        return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}
    if name == "sharded_bin":
        return {
            k: v
            for f in sorted(path.glob("*.bin"))
            for k, v in torch.load(f, weights_only=True).items()
        }
    if name == "dcp_checkpoint":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(path, tmp_path / "dcp.pt")
        return torch.load(tmp_path / "dcp.pt", weights_only=True)["model"]
    if name in ("notebook_full.pt", "gone_module_full.pt", "scripted_cnn.pt"):
        return None  # torch.load needs the module's classes; the diff checks these
    obj = torch.load(path, weights_only=True)
    part = open_checkpoint(path).model_path
    for key in part.split(".") if part else ():
        obj = obj[key]
    if name == "lightning.ckpt":
        return obj
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def loaded_with_aliases(opened: Path) -> dict[str, torch.Tensor]:
    """load_file of every output file, with each tied alias from __metadata__ put back."""
    files = (
        [opened] if opened.suffix == ".safetensors" else sorted(opened.parent.glob("*.safetensors"))
    )
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
        with safe_open(f, "pt") as fh:
            tied = json.loads((fh.metadata() or {}).get("mscope.tied", "{}"))
    for alias, target in tied.items():
        out[alias] = out[target]
    return out


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_every_sample_converts_bit_exact(name, tmp_path):
    path = SAMPLES / name
    if name == "dtypes.pt":  # safetensors has no complex128: refused, then the rest converts
        with pytest.raises(SaveError, match=r"no dtype for tensor 'complex128' \(complex128\)"):
            convert(open_checkpoint(path), tmp_path / "refused")
        assert not (tmp_path / "refused").exists()
        sd = torch.load(path, weights_only=True)
        del sd["complex128"]
        torch.save(sd, tmp_path / name)  # views of one storage stay views (torch keeps them)
        path = tmp_path / name
    ckpt = open_checkpoint(path)
    result = convert(ckpt, tmp_path / "out")
    check = verify_convert(ckpt, result)
    assert check.ok, check.failures
    assert len(check.report.tensors) == len(ckpt.model_tensors)
    got = loaded_with_aliases(result.opened)
    meta = safe_open(result.files[0], "pt").metadata()
    assert meta["mscope.source"] == ckpt.path.name and meta["format"] == "pt"
    assert "/" not in meta["mscope.source"]  # a file name, never a local path
    want = reference(name, tmp_path) if name != "dtypes.pt" else torch.load(path, weights_only=True)
    if want is None:
        assert set(got) == {t.name for t in ckpt.model_tensors}
        return
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert as_bytes(got[key]) == as_bytes(value), key


def test_verify_fails_on_a_flipped_byte(tmp_path):
    ckpt = open_checkpoint(SAMPLES / "cnn_state_dict.pt")
    result = convert(ckpt, tmp_path / "one.safetensors")
    raw = bytearray(result.opened.read_bytes())
    raw[-3] ^= 0x40  # inside the last tensor's data
    result.opened.write_bytes(bytes(raw))
    check = verify_convert(ckpt, result)
    assert not check.ok and len(check.failures) == 1


def test_sharded_output_with_tiny_shard_size(cli, tmp_path):
    out = tmp_path / "hf"
    r = cli(
        "convert", SAMPLES / "transformer.safetensors", out, "--max-shard-size", "20KB", "--verify"
    )
    assert r.rc == 0, r.output
    assert "verified: 29 tensors" in r.stdout
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size()
        for t in load_file(SAMPLES / "transformer.safetensors").values()
    )
    for p in shards:  # each under 20 kB, unless one tensor alone is bigger
        tensors = load_file(p)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 20_000 or len(tensors) == 1
    merged = {k: v for p in shards for k, v in load_file(p).items()}
    want = load_file(SAMPLES / "transformer.safetensors")
    assert merged.keys() == want.keys() and all(torch.equal(merged[k], want[k]) for k in want)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left


def test_tied_weights_written_once_and_recorded(tmp_path):
    ckpt = open_checkpoint(SAMPLES / "transformer_tied.pt")
    result = convert(ckpt, tmp_path / "tied.safetensors")
    with safe_open(result.opened, "pt") as fh:
        keys, meta = set(fh.keys()), fh.metadata()
    assert json.loads(meta["mscope.tied"]) == {"lm_head.weight": "embed.weight"}
    assert "lm_head.weight" not in keys and "embed.weight" in keys
    src = torch.load(SAMPLES / "transformer_tied.pt", weights_only=True)
    assert torch.equal(load_file(result.opened)["embed.weight"], src["lm_head.weight"])


def test_dtype_bf16_equals_torch_cast(tmp_path):
    src = torch.load(SAMPLES / "cnn_state_dict.pt", weights_only=True)
    ckpt = open_checkpoint(SAMPLES / "cnn_state_dict.pt")
    result = convert(ckpt, tmp_path / "bf16.safetensors", dtype="bf16")
    assert verify_convert(ckpt, result).ok
    got = load_file(result.opened)
    for key, value in src.items():
        want = value.to(torch.bfloat16) if value.is_floating_point() else value
        assert got[key].dtype == want.dtype, key  # num_batches_tracked stays int64
        assert torch.equal(got[key], want), key
    assert safe_open(result.opened, "pt").metadata()["mscope.dtype"] == "bfloat16"


def test_strip_prefix(tmp_path):
    sd = {
        f"app.model.{k}": v
        for k, v in torch.load(SAMPLES / "cnn_state_dict.pt", weights_only=True).items()
    }
    sd["app.step_scale"] = torch.ones(2)  # not under the prefix: keeps its name
    torch.save(sd, tmp_path / "app.pt")
    ckpt = open_checkpoint(tmp_path / "app.pt")
    result = convert(ckpt, tmp_path / "out", strip_prefix="app.model.")
    assert verify_convert(ckpt, result).ok
    got = load_file(result.opened)
    assert set(got) == {k.removeprefix("app.model.") for k in sd}
    with pytest.raises(SaveError, match="no tensor name starts with 'nope.'"):
        convert(ckpt, tmp_path / "other", strip_prefix="nope.")


def test_views_and_big_strides_are_gathered(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {
        "t": base.t(),
        "cols": base[:, 1:4],
        "f8": base.to(torch.float8_e4m3fn).t(),
        "half": base.half()[::2],
    }
    torch.save(sd, tmp_path / "views.pt")
    ckpt = open_checkpoint(tmp_path / "views.pt")
    result = convert(ckpt, tmp_path / "v.safetensors")
    assert verify_convert(ckpt, result).ok
    got = load_file(result.opened)
    for k, v in sd.items():
        assert as_bytes(got[k]) == as_bytes(v) and got[k].shape == v.shape, k


def test_refuses_to_overwrite_without_force(cli, tmp_path):
    out = tmp_path / "o.safetensors"
    assert cli("convert", SAMPLES / "cnn_state_dict.pt", out).rc == 0
    first = out.read_bytes()
    r = cli("convert", SAMPLES / "legacy_cnn.pt", out)
    assert (
        r.rc == 2 and "destination exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    )
    assert out.read_bytes() == first
    r = cli("convert", SAMPLES / "legacy_cnn.pt", out, "--force")
    assert r.rc == 0, r.output
    assert (tmp_path / "o.safetensors.bak").read_bytes() == first
    d = tmp_path / "dir"
    assert cli("convert", SAMPLES / "cnn_state_dict.pt", d).rc == 0
    r = cli("convert", SAMPLES / "cnn_state_dict.pt", d)
    assert r.rc == 2 and "already holds model.safetensors" in r.stderr


def test_gguf_quantized_tensors_refused(cli, tmp_path):
    r = cli("convert", SAMPLES / "llama_tiny.gguf", tmp_path / "g")
    assert r.rc == 2 and "block-quantized" in r.stderr
    assert not (tmp_path / "g").exists()


def test_failure_midway_leaves_nothing(tmp_path):
    """A source truncated after it was opened: the last shard fails; no shard, index or temp stays."""
    sd = {f"w{i}": torch.full((1000,), float(i)) for i in range(6)}
    src = tmp_path / "big.pt"
    torch.save(sd, src)
    ckpt = open_checkpoint(src)
    last = max(ckpt.model_tensors, key=lambda t: t.storage.data_offset)
    with open(src, "r+b") as fh:
        fh.truncate(last.storage.data_offset + 100)
    out = tmp_path / "out"
    with pytest.raises(SaveError, match="truncated"):
        convert(ckpt, out, max_shard_size=8000)
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["big.pt"]


def test_interrupt_midway_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C while the third tensor is copied (shard 2 of 4): no shard, index or temp file stays."""
    import modelscope_tui.write.convert as conv

    torch.save(
        {f"w{i}": torch.zeros(1 << 16, dtype=torch.uint8) for i in range(4)}, tmp_path / "m.pt"
    )
    ckpt = open_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "out"
    out.mkdir()  # an existing, empty directory stays as it was
    calls = []
    real = conv.copy_range

    def copy_then_interrupt(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(conv, "copy_range", copy_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(ckpt, out, max_shard_size=1 << 16)
    assert len(calls) == 3
    assert list(out.iterdir()) == []


def test_gguf_float_tensors_convert(tmp_path):
    """F32 / F16 GGUF tensors (written by gguf-py's GGUFWriter) convert as stored, llama.cpp names kept."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {
        "token_embd.weight": rng.standard_normal((16, 8)).astype(np.float32),
        "blk.0.attn_q.weight": rng.standard_normal((8, 8)).astype(np.float16),
        "output_norm.weight": np.ones(8, dtype=np.float32),
    }
    writer = gguf.GGUFWriter(str(tmp_path / "f.gguf"), "llama")
    for name, a in arrays.items():
        writer.add_tensor(name, a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ckpt = open_checkpoint(tmp_path / "f.gguf")
    result = convert(ckpt, tmp_path / "g.safetensors")
    assert verify_convert(ckpt, result).ok
    got = load_file(result.opened)
    for name, a in arrays.items():
        assert got[name].numpy().tobytes() == a.tobytes() and tuple(got[name].shape) == a.shape
