"""Hostile GGUF files, spelled byte by byte: every count, length, type, dimension, alignment and
offset comes from the file. Each must give one clear line (exit 2 from the CLI, no traceback),
without allocating or looping in proportion to a number the file states (check_bad bounds the
peak allocation and the time)."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from test_bad_input import check_bad

from modelscope_tui.errors import CorruptCheckpointError, MscopeError, UnsupportedFormatError
from modelscope_tui.readers import open_checkpoint

U64 = (1 << 64) - 1

# GGUF key/value type ids
UINT8, INT32, UINT32, STRING, ARRAY, UINT64, FLOAT64 = 0, 5, 4, 8, 9, 10, 12
F32, Q8_0 = 0, 8


def s(text: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(text) if length is None else length) + text


def kv(key: bytes, type_id: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", type_id) + payload


def arch(name: bytes = b"llama") -> bytes:
    return kv(b"general.architecture", STRING, s(name))


def info(
    name: bytes, dims: list[int], type_id: int = F32, offset: int = 0, n_dims: int | None = None
) -> bytes:
    n = len(dims) if n_dims is None else n_dims
    return (
        s(name)
        + struct.pack("<I", n)
        + struct.pack(f"<{len(dims)}Q", *dims)
        + struct.pack("<IQ", type_id, offset)
    )


def gguf(
    kvs: list[bytes] = (),
    tensors: list[bytes] = (),
    data: bytes = b"",
    version: int = 3,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    alignment: int = 32,
) -> bytes:
    head = b"GGUF" + struct.pack(
        "<IQQ",
        version,
        len(tensors) if n_tensors is None else n_tensors,
        len(kvs) if n_kv is None else n_kv,
    )
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % alignment) + data


VALID = gguf([arch()], [info(b"w", [4])], struct.pack("<4f", 1, 2, 3, 4))

# one case a line reads as a table
# fmt: off
CASES: dict[str, tuple[bytes, type[MscopeError], str]] = {
    # counts
    "tensor count 2^64-1": (gguf([arch()], n_tensors=U64), CorruptCheckpointError, "tensors"),
    "tensor count 2^63": (gguf([arch()], n_tensors=1 << 63), CorruptCheckpointError, "tensors"),
    "tensor count 10^6 in 100 bytes": (gguf([arch()], n_tensors=10**6), CorruptCheckpointError, "tensors"),
    "kv count 2^64-1": (gguf([arch()], n_kv=U64), CorruptCheckpointError, "key/values"),
    "kv count one too many": (gguf([arch(), kv(b"other", STRING, s(b"x" * 8))], n_kv=3, alignment=1), CorruptCheckpointError, "offset"),
    # lengths
    "key length 2^64-1": (gguf([s(b"k", U64)]), CorruptCheckpointError, "key of key/value 0"),
    "key length past EOF by 1": (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s(b"abcde", 6), CorruptCheckpointError, "ends"),
    "string value past EOF": (gguf([kv(b"k", STRING, s(b"x", 1 << 40))]), CorruptCheckpointError, "value of 'k'"),
    "key of 1 MiB": (gguf([kv(b"k" * (1 << 20), UINT8, b"\0")]), CorruptCheckpointError, "1,048,576 bytes long"),
    "tensor name of 1 MiB": (gguf([arch()], [info(b"w" * (1 << 20), [4])], b"\0" * 16), CorruptCheckpointError, "name of tensor 0 is"),
    "tensor name past EOF": (gguf([arch()], [s(b"w", 1 << 50)]), CorruptCheckpointError, "name of tensor 0"),
    # arrays
    "nested arrays": (gguf([kv(b"a", ARRAY, struct.pack("<IQ", ARRAY, 1) + struct.pack("<IQ", UINT8, 1) + b"\0")]),
                      CorruptCheckpointError, "array of arrays"),
    "array of 2^60 uint8": (gguf([kv(b"a", ARRAY, struct.pack("<IQ", UINT8, 1 << 60) + b"\0" * 8)]),
                            CorruptCheckpointError, "1,152,921,504,606,846,976 uint8"),
    "array of 2^60 float64": (gguf([kv(b"a", ARRAY, struct.pack("<IQ", FLOAT64, 1 << 60))]), CorruptCheckpointError, "float64"),
    "array of 2^60 strings": (gguf([kv(b"a", ARRAY, struct.pack("<IQ", STRING, 1 << 60) + s(b"x") * 4)]),
                              CorruptCheckpointError, "strings"),
    "array of empty strings one short": (gguf([kv(b"a", ARRAY, struct.pack("<IQ", STRING, 12) + s(b"") * 11)], alignment=1),
                                         CorruptCheckpointError, "declares 12 strings"),
    "array string past EOF": (gguf([kv(b"a", ARRAY, struct.pack("<IQ", STRING, 10) + s(b"") * 9 + s(b"", 1 << 40))]),
                              CorruptCheckpointError, "item 9"),
    "array item type 13": (gguf([kv(b"a", ARRAY, struct.pack("<IQ", 13, 1) + b"\0" * 8)]), CorruptCheckpointError, "unknown item type 13"),
    # types
    "kv type 13": (gguf([kv(b"k", 13, b"\0" * 8)]), CorruptCheckpointError, "unknown value type 13"),
    "kv type 2^32-1": (gguf([kv(b"k", (1 << 32) - 1, b"\0" * 8)]), CorruptCheckpointError, "unknown value type"),
    "ggml type 4 (removed Q4_2)": (gguf([arch()], [info(b"w", [32], 4)], b"\0" * 32), CorruptCheckpointError, "unknown GGML type 4"),
    "ggml type 99": (gguf([arch()], [info(b"w", [4], 99)], b"\0" * 16), CorruptCheckpointError, "unknown GGML type 99"),
    "ggml type 2^32-1": (gguf([arch()], [info(b"w", [4], (1 << 32) - 1)], b"\0" * 16), CorruptCheckpointError, "unknown GGML type"),
    # alignment
    "alignment 0": (gguf([kv(b"general.alignment", UINT32, struct.pack("<I", 0))]), CorruptCheckpointError, "power of two"),
    "alignment 3": (gguf([kv(b"general.alignment", UINT32, struct.pack("<I", 3))]), CorruptCheckpointError, "power of two"),
    "alignment 48": (gguf([kv(b"general.alignment", UINT32, struct.pack("<I", 48))]), CorruptCheckpointError, "power of two"),
    "alignment as uint64": (gguf([kv(b"general.alignment", UINT64, struct.pack("<Q", 32))]), CorruptCheckpointError, "uint64"),
    "alignment as string": (gguf([kv(b"general.alignment", STRING, s(b"32"))]), CorruptCheckpointError, "string"),
    "alignment 2^31 pushes data past EOF": (
        gguf([kv(b"general.alignment", UINT32, struct.pack("<I", 1 << 31))], [info(b"w", [4])], struct.pack("<4f", 1, 2, 3, 4)),
        CorruptCheckpointError, "runs past the end"),
    # offsets
    "tensor offset past EOF": (gguf([arch()], [info(b"w", [4], offset=1 << 40)], b"\0" * 16), CorruptCheckpointError, "runs past the end"),
    "tensor offset 2^64-1": (gguf([arch()], [info(b"w", [4], offset=U64)], b"\0" * 16), CorruptCheckpointError, "runs past the end"),
    "tensor bytes past EOF by 1": (gguf([arch()], [info(b"w", [4])], b"\0" * 15), CorruptCheckpointError, "16 bytes at data offset 0"),
    "overlapping tensors": (gguf([arch()], [info(b"a", [4]), info(b"b", [4], offset=8)], b"\0" * 32), CorruptCheckpointError, "overlap"),
    # dimensions
    "dims product 2^64": (gguf([arch()], [info(b"w", [1 << 32, 1 << 32])]), CorruptCheckpointError, "2^63"),
    "dims product 2^63": (gguf([arch()], [info(b"w", [1 << 62, 2])]), CorruptCheckpointError, "2^63"),
    "dim 2^63 (negative as int64)": (gguf([arch()], [info(b"w", [1 << 63])]), CorruptCheckpointError, "negative"),
    "5 dimensions": (gguf([arch()], [info(b"w", [1, 1, 1, 1, 4])], b"\0" * 16), CorruptCheckpointError, "5 dimensions"),
    "2^32-1 dimensions": (gguf([arch()], [info(b"w", [], n_dims=(1 << 32) - 1)]), CorruptCheckpointError, "dimensions"),
    "rows not whole Q8_0 blocks": (gguf([arch()], [info(b"w", [33], Q8_0)], b"\0" * 64), CorruptCheckpointError, "blocks of 32"),
    # duplicates
    "duplicate key": (gguf([arch(), arch(b"gpt2")]), CorruptCheckpointError, "appears twice"),
    "duplicate tensor": (gguf([arch()], [info(b"w", [4]), info(b"w", [4], offset=32)], b"\0" * 48), CorruptCheckpointError, "appears twice"),
    # versions
    "version 0": (gguf([arch()], version=0), UnsupportedFormatError, "version 0"),
    "version 1": (gguf([arch()], version=1), UnsupportedFormatError, "version 1"),
    "version 4": (gguf([arch()], version=4), UnsupportedFormatError, "version 4 "),
    "version 0x04000000 (big-endian 4)": (gguf([arch()], version=4 << 24), UnsupportedFormatError, "67,108,864"),
    "version 2^32-1": (gguf([arch()], version=(1 << 32) - 1), UnsupportedFormatError, "4,294,967,295"),
    # too short
    "magic only": (b"GGUF", CorruptCheckpointError, "too short"),
    "header cut": (b"GGUF" + struct.pack("<IQ", 3, 0) + b"\0\0\0\0", CorruptCheckpointError, "too short"),
}
# fmt: on


@pytest.mark.parametrize("name", list(CASES))
def test_one_clear_line(tmp_path: Path, name: str):
    data, error, words = CASES[name]
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    line = check_bad(path, error, in_process=True)
    assert words in line, line


@pytest.mark.parametrize(
    "name", ["array of 2^60 strings", "tensor count 2^64-1", "dims product 2^64", "version 1"]
)
def test_cli_process_exit_2(tmp_path: Path, name: str):
    """The same, in a process of its own with its address space capped at 2 GiB."""
    data, error, words = CASES[name]
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    assert words in check_bad(path, error)


def test_valid_base_reads():
    """The cases above are that file with one thing wrong."""
    from tempfile import TemporaryDirectory

    with TemporaryDirectory() as d:
        path = Path(d) / "ok.gguf"
        path.write_bytes(VALID)
        ckpt = open_checkpoint(path)
        assert [(t.name, t.shape, t.dtype, t.nbytes) for t in ckpt.tensors] == [
            ("w", (4,), "float32", 16)
        ]
        assert ckpt.metadata["gguf"]["architecture"] == "llama"


def test_version_2_reads_like_version_3(tmp_path):
    """GGUF v2 has v3's layout (v3 only added big-endian files); llama.cpp and gguf-py read both."""
    path = tmp_path / "v2.gguf"
    path.write_bytes(gguf([arch()], [info(b"w", [4])], struct.pack("<4f", 1, 2, 3, 4), version=2))
    ckpt = open_checkpoint(path)
    assert ckpt.metadata["gguf"]["version"] == 2
    assert ckpt.tensor("w").nbytes == 16


def test_llama_cpp_refusals_are_warnings(tmp_path):
    """Readable, but llama.cpp's loader refuses it: a gap before the first tensor, and a name of
    64 bytes (GGML_MAX_NAME). The file opens; the summary and audit say so."""
    long = b"n" * 64
    path = tmp_path / "gap.gguf"
    path.write_bytes(gguf([arch()], [info(long, [4], offset=32)], b"\0" * 48))
    ckpt = open_checkpoint(path)
    assert len(ckpt.refusals) == 2
    assert "expected 0" in ckpt.refusals[0]
    assert "longer than 63 bytes" in ckpt.refusals[1]


def test_every_truncation_is_one_error(tmp_path):
    """Every prefix of a valid file with a key/value of each kind: a clear error, never another
    exception (the last prefixes only lose tensor bytes)."""
    kvs = [
        arch(),
        kv(b"u32", UINT32, struct.pack("<I", 7)),
        kv(b"i32", INT32, struct.pack("<i", -7)),
        kv(b"arr", ARRAY, struct.pack("<IQ", STRING, 3) + s(b"a") + s(b"bc") + s(b"")),
        kv(b"nums", ARRAY, struct.pack("<IQ", UINT32, 3) + struct.pack("<3I", 1, 2, 3)),
    ]
    full = gguf(
        kvs,
        [info(b"w", [4]), info(b"q", [32], Q8_0, offset=32)],
        struct.pack("<4f", 1, 2, 3, 4) + b"\0" * 16 + b"\0" * 34,
    )
    path = tmp_path / "cut.gguf"
    path.write_bytes(full)
    assert len(open_checkpoint(path).tensors) == 2
    for n in range(len(full)):
        path.write_bytes(full[:n])
        try:
            open_checkpoint(path)
        except MscopeError as exc:
            assert "\n" not in str(exc)
        else:
            raise AssertionError(f"a {n}-byte prefix opened")


def test_random_mutations_never_escape(tmp_path):
    """Random byte flips of a valid file: it opens, or one MscopeError; never another exception."""
    base = bytearray(gguf(
        [arch(), kv(b"arr", ARRAY, struct.pack("<IQ", STRING, 2) + s(b"ab") + s(b"c"))],
        [info(b"w", [4]), info(b"q", [32], Q8_0, offset=32)],
        struct.pack("<4f", 1, 2, 3, 4) + b"\0" * 16 + b"\0" * 34,
    ))  # fmt: skip
    rng = random.Random(16)
    path = tmp_path / "mut.gguf"
    for _ in range(300):
        data = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(data))
            data[i] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        path.write_bytes(bytes(data))
        try:
            open_checkpoint(path)
        except MscopeError as exc:
            assert "\n" not in str(exc)
