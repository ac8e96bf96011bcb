"""GGUF files written by llama.cpp's own gguf-py (GGUFWriter, gguf.quants), read by mscope and
compared with gguf-py's GGUFReader: the same tensors (names, GGML types, shapes, bytes, offsets),
the same key/values, and the same values (gguf.quants.dequantize as the reference)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFReader, GGUFValueType  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from conftest import SAMPLES  # noqa: E402
from modelscope_tui.checkpoint import BLOCK_DTYPES, Format  # noqa: E402
from modelscope_tui.diff.stream import diff_checkpoints  # noqa: E402
from modelscope_tui.errors import TensorDataError  # noqa: E402
from modelscope_tui.readers import open_checkpoint, sniff  # noqa: E402
from modelscope_tui.readers.gguf import GGML_PLAIN_NAMES, fact_lines, ggml_type_name  # noqa: E402
from modelscope_tui.summary import summary_dict, summary_json  # noqa: E402
from modelscope_tui.values.chunks import TensorChunks  # noqa: E402
from modelscope_tui.values.data import TensorData  # noqa: E402
from modelscope_tui.values.kernels import as_float  # noqa: E402
from modelscope_tui.values.stream import tensor_stats  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "src"


def k_blocks(rng, n_blocks: int, block_bytes: int) -> np.ndarray:
    """Raw K-quant blocks (gguf-py quantizes none of them): random codes under small finite
    f16 scales in the first 4 bytes (d, dmin for Q4_K / Q5_K; Q6_K keeps its d last)."""
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    scales = np.array([0.01, 0.002], np.float16).view(np.uint8)
    if block_bytes == 210:  # Q6_K: ql, qh, scales, then d
        blocks[:, -2:] = scales[:2]
    else:
        blocks[:, :4] = scales
    return blocks


def write_gguf(path: Path, big_endian: bool = False, version_pad: int = 0) -> Path:
    rng = np.random.default_rng(0)
    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    w = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    w.add_name("test-model")
    w.add_context_length(4096)
    w.add_block_count(1)
    w.add_embedding_length(256)
    w.add_head_count(4)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_quantization_version(2)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"tok{i}" for i in range(3000)])
    w.add_token_scores([float(i) for i in range(3000)])
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -70000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 1 << 60)
    w.add_int64("t.i64", -(1 << 40))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "h\u00e9llo \x1b[31m")
    w.add_array("t.empty", [])
    x = rng.standard_normal((64, 256), dtype=np.float32)
    w.add_tensor("token_embd.weight", x.astype(np.float16))
    w.add_tensor("blk.0.attn_norm.weight", np.linspace(0.5, 1.5, 256, dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", quantize(x, Q.Q8_0), raw_dtype=Q.Q8_0)
    w.add_tensor("blk.0.attn_k.weight", quantize(x[:32], Q.Q4_0), raw_dtype=Q.Q4_0)
    w.add_tensor("blk.0.ffn_up.weight", quantize(x[:16], Q.BF16), raw_dtype=Q.BF16)
    if not big_endian:  # gguf-py byte-swaps quantized blocks as if they were one dtype
        w.add_tensor(
            "blk.0.ffn_gate.weight", k_blocks(rng, 8, 144).reshape(4, 288), raw_dtype=Q.Q4_K
        )
        w.add_tensor(
            "blk.0.ffn_down.weight", k_blocks(rng, 4, 210).reshape(2, 420), raw_dtype=Q.Q6_K
        )
        w.add_tensor("output.weight", k_blocks(rng, 4, 176).reshape(4, 176), raw_dtype=Q.Q5_K)
    w.add_tensor("blk.0.scale", np.arange(6, dtype=np.int32).reshape(2, 3))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "model.gguf")


def reference_values(t) -> np.ndarray:
    if t.tensor_type == Q.I32:  # gguf-py's reader already gives its values
        return np.asarray(t.data, dtype=np.float32).reshape(-1)
    return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1)


def test_tensors_match_gguf_reader(gguf_file):
    ckpt = open_checkpoint(gguf_file)
    ref = GGUFReader(gguf_file)
    assert ckpt.format == Format.GGUF
    assert [t.name for t in ckpt.tensors] == [t.name for t in ref.tensors]
    for r, t in zip(ckpt.tensors, ref.tensors):
        assert ggml_type_name(r.dtype) == t.tensor_type.name
        # gguf-py keeps GGUF's order (ne[0] first); torch's order is the reverse
        assert r.shape == tuple(reversed([int(d) for d in t.shape]))
        assert r.numel == t.n_elements
        assert r.nbytes == t.n_bytes
        assert r.storage.data_offset == t.data_offset
        assert r.kind == "parameter"
        if r.dtype in BLOCK_DTYPES:
            assert r.note.startswith(f"GGML {r.dtype}:")
            assert not r.trainable  # a block-quantized weight cannot require grad
    types = {ggml_type_name(t.dtype) for t in ckpt.tensors}
    assert {"F16", "F32", "Q8_0", "Q4_0", "BF16", "Q4_K", "Q6_K", "Q5_K", "I32"} <= types
    assert ckpt.totals().nbytes == sum(int(t.n_bytes) for t in ref.tensors)
    assert not ckpt.problems and not ckpt.refusals


def test_key_values_match_gguf_reader(gguf_file):
    ckpt = open_checkpoint(gguf_file)
    entries = {e.path: e for e in ckpt.entries}
    ref = {k: f for k, f in GGUFReader(gguf_file).fields.items() if not k.startswith("GGUF.")}
    assert list(entries) == list(ref)
    for key, field in ref.items():
        e = entries[key]
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            values = field.contents()
            item = field.types[-1].name.lower() if len(field.types) > 1 else None
            assert e.type == f"array[{item}]" if item else e.type.startswith("array")
            assert e.value.startswith(f"[{len(values):,} x ")
            continue
        value = field.contents()
        assert e.type == kind.name.lower().replace("string", "string")
        if kind == GGUFValueType.FLOAT32:
            assert np.float32(e.value) == np.float32(value)
        else:
            assert e.value == value, key
    assert entries["t.f32"].value == 0.1  # the shortest decimal of the float32, not 0.10000000149
    assert entries["tokenizer.ggml.tokens"].value.startswith("[3,000 x string: 'tok0', 'tok1'")
    assert len(entries["tokenizer.ggml.tokens"].value) < 200  # never 3,000 tokens


def test_facts_in_summary_json_and_text(gguf_file):
    ckpt = open_checkpoint(gguf_file)
    meta = json.loads(summary_json(ckpt))["metadata"]["gguf"]
    assert meta == summary_dict(ckpt)["metadata"]["gguf"]
    assert meta["architecture"] == "llama"
    assert meta["context_length"] == 4096
    assert meta["tokenizer_tokens"] == 3000
    assert meta["quantization_version"] == 2
    assert meta["file_type"] == "MOSTLY_Q4_K_M"
    assert meta["version"] == 3 and meta["alignment"] == 32
    rows = dict(fact_lines(ckpt))
    assert rows["tokenizer tokens"] == "3,000"
    assert rows["context length"] == "4,096"
    assert "Q4_K x1" in rows["tensor types"]


@pytest.mark.parametrize("chunk", [64, 1000, 4096, 1 << 20])
def test_values_equal_gguf_dequantize(gguf_file, chunk):
    ckpt = open_checkpoint(gguf_file)
    ref = {t.name: t for t in GGUFReader(gguf_file).tensors}
    with TensorData() as data:
        for r in ckpt.tensors:
            src = TensorChunks(data, r, chunk, ordered=True)
            pieces = [(n, as_float(c, src.chunk_kernel)) for n, c in src.chunks()]
            got = np.concatenate([np.asarray(c, dtype=np.float32) for _, c in pieces])
            want = reference_values(ref[r.name])
            assert got.shape == want.shape, r.name
            assert np.array_equal(got, want), r.name
            assert sum(n for n, _ in pieces) == r.nbytes  # progress counts every byte once


def test_stats_of_quantized_tensors(gguf_file):
    ckpt = open_checkpoint(gguf_file)
    ref = {t.name: t for t in GGUFReader(gguf_file).tensors}
    with TensorData() as data:
        for r in ckpt.tensors:
            st = tensor_stats(data, r)
            want = reference_values(ref[r.name]).astype(np.float64)
            assert st.numel == want.size
            assert st.min == want.min() and st.max == want.max(), r.name
            assert st.mean == pytest.approx(want.mean(), rel=1e-5, abs=1e-6), r.name


def test_big_endian_file(tmp_path):
    path = write_gguf(tmp_path / "be.gguf", big_endian=True)
    ckpt = open_checkpoint(path)
    ref = GGUFReader(path)
    assert ckpt.metadata["gguf"]["byte_order"] == "big"
    assert ckpt.metadata["gguf"]["tokenizer_tokens"] == 3000
    assert [r.shape for r in ckpt.tensors] == [
        tuple(reversed([int(d) for d in t.shape])) for t in ref.tensors
    ]
    with TensorData() as data:
        norm = ckpt.tensor("blk.0.attn_norm.weight")
        assert data.tensor(norm).tolist() == pytest.approx(np.linspace(0.5, 1.5, 256).tolist())
        with pytest.raises(TensorDataError, match="big-endian"):
            list(TensorChunks(data, ckpt.tensor("blk.0.attn_q.weight"), 1 << 16).chunks())


def test_sniffed_by_magic_even_with_a_brace_at_byte_8(tmp_path):
    """123 tensors put '{' at byte 8, where sniff looks for a safetensors header."""
    w = gguf.GGUFWriter(str(tmp_path / "m.bin"), "llama")
    for i in range(123):
        w.add_tensor(f"t{i}", np.full(4, i, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path = tmp_path / "m.bin"
    assert path.read_bytes()[8:9] == b"{"
    assert sniff(path) == Format.GGUF
    ckpt = open_checkpoint(path)
    assert len(ckpt.tensors) == 123
    with TensorData() as data:
        assert data.tensor(ckpt.tensor("t122")).tolist() == [122.0] * 4


def test_sample_matches_gguf_reader():
    path = SAMPLES / "llama_tiny.gguf"
    assert path.stat().st_size < 200 << 10
    ckpt = open_checkpoint(path)
    ref = GGUFReader(path)
    assert [(r.name, r.nbytes) for r in ckpt.tensors] == [
        (t.name, int(t.n_bytes)) for t in ref.tensors
    ]
    assert {ggml_type_name(r.dtype) for r in ckpt.tensors} >= {
        "Q8_0",
        "Q4_0",
        "Q5_1",
        "F32",
        "F16",
        "BF16",
    }


def test_diff_with_safetensors_pairs_through_llama_cpp_names():
    a = open_checkpoint(SAMPLES / "llama_tiny.safetensors")
    b = open_checkpoint(SAMPLES / "llama_tiny.gguf")
    report = diff_checkpoints(a, b)
    by_a = {d.a_name: d for d in report.tensors}
    assert not [d for d in report.tensors if d.status in ("added", "removed")]
    assert len(by_a) == len(a.tensors) == len(b.tensors)
    q = by_a["model.layers.0.self_attn.q_proj.weight"]
    assert q.b_name == "blk.0.attn_q.weight" and q.b_dtype == "Q8_0" and q.a_dtype == "bfloat16"
    assert by_a["lm_head.weight"].b_name == "output.weight"
    assert by_a["model.embed_tokens.weight"].b_name == "token_embd.weight"
    # llama.cpp permuted attn_q / attn_k rows: undone, they compare like the other Q8_0 weights
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
        d = by_a[f"model.layers.1.{name}.weight"]
        assert d.rel_l2 < 0.01 and d.cosine > 0.9999, (name, d.rel_l2)
    notes = " ".join(report.notes)
    assert "llama.cpp's naming map" in notes
    assert (
        "26 tensor(s) quantized: bfloat16 -> Q8_0 x17, bfloat16 -> Q4_0 x8, bfloat16 -> Q5_1 x1"
        in notes
    )
    assert "8 attn_q / attn_k" in notes
    # the other way round: the same pairs, dequantized
    back = diff_checkpoints(b, a)
    assert {(d.a_name, d.b_name) for d in back.tensors} == {
        (d.b_name, d.a_name) for d in report.tensors
    }
    assert "26 tensor(s) dequantized" in " ".join(back.notes)


def test_reading_needs_no_gguf_package_and_values_say_what_to_install(tmp_path):
    """gguf-py is optional: with it blocked, the file opens and summarises; a quantized tensor's
    values fail with one line naming the extra, plain ones still read."""
    code = f"""
import sys
sys.modules["gguf"] = None  # import gguf now raises ImportError
from modelscope_tui.readers import open_checkpoint
from modelscope_tui.summary import summary_json
from modelscope_tui.values.data import TensorData
from modelscope_tui.values.stream import tensor_stats
from modelscope_tui.errors import TensorDataError
ckpt = open_checkpoint({str(SAMPLES / "llama_tiny.gguf")!r})
summary_json(ckpt)
with TensorData() as data:
    print(tensor_stats(data, ckpt.tensor("output_norm.weight")).numel)
    try:
        tensor_stats(data, ckpt.tensor("blk.0.attn_q.weight"))
    except TensorDataError as exc:
        print(exc.message)
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC)},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "32"
    assert "pip install 'modelscope-tui[gguf]'" in lines[1] and "Q8_0" in lines[1]


def test_plain_names_cover_every_plain_type():
    from modelscope_tui.readers.gguf import GGML_PLAIN, GGML_QUANT

    assert set(GGML_PLAIN.values()) == set(GGML_PLAIN_NAMES)
    for type_id, name in {**GGML_PLAIN, **GGML_QUANT}.items():
        assert Q(type_id).name == ggml_type_name(name)
        block = gguf.GGML_QUANT_SIZES[Q(type_id)]
        if name in BLOCK_DTYPES:
            assert BLOCK_DTYPES[name] == block
    assert struct.calcsize("<f") == 4


def test_a_directory_holding_one_gguf_is_that_file(tmp_path):
    import shutil

    shutil.copy(SAMPLES / "llama_tiny.gguf", tmp_path / "model-Q8_0.gguf")
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.format == Format.GGUF and len(ckpt.tensors) == 39


def test_freezing_counts_quantized_weights_as_frozen_as_stored():
    """GGML blocks cannot require grad: a freeze leaves them and says they are quantized (not
    'integer/bool'); the plain F32 / F16 tensors freeze."""
    from modelscope_tui.training.session import Session

    session = Session(open_checkpoint(SAMPLES / "llama_tiny.gguf"))
    result = session.freeze_pattern("blk.0.*")
    assert result.changed == 3  # attn_norm, ffn_norm (F32), ffn_down (F16)
    assert "6 quantized weight(s) (Q4_0, Q8_0" in result.message and "integer" not in result.message
    assert not session.is_trainable("blk.0.ffn_down.weight")
