"""Files whose names, keys, metadata values and global names carry text that attacks a terminal
or an encoder, built at the byte level (safetensors headers by hand, pickles from raw opcodes in a
stored zip), for test_terminal_text.py."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

# Each spelling a terminal acts on (or an encoder chokes on).
SPELLINGS: dict[str, str] = {
    "esc_csi": "\x1b[2J\x1b[31mred",
    "osc0_bel": "\x1b]0;pwned\x07",
    "osc52_st": "\x1b]52;c;cm0gLXJmIH4K\x1b\\",
    "c1_csi": "\x9b2J\x9d0;t\x9c",
    "del": "a\x7fb",
    "rlo": "evil\u202egpj.exe",
    "isolate": "x\u2066y\u2069\u200e\u061c",
    "zwj": "a\u200db\u200b\ufeff\u2060",
    "surrogate": "s\ud800x\udcff",
    "newline_cr": "line\nfake: ok\rz",
    "markup": "[bold red]x[/] [link=http://e]y",
}


def is_safe_output(text: str) -> bool:
    """True when `text` holds nothing a terminal acts on: only printable characters, newlines
    and spaces (str.isprintable is False for C0/C1/DEL, bidi, zero-width and surrogates)."""
    return all(c.isprintable() or c == "\n" for c in text)


def bad_chars(text: str) -> list[str]:
    return sorted({repr(c) for c in text if not (c.isprintable() or c == "\n")})


def safetensors_file(path: Path, text: str) -> Path:
    """Tensor names, a metadata key and a metadata value carry `text` (JSON-escaped in the
    header, as a writer following the spec would store it)."""
    header = {
        "__metadata__": {f"k{text}": f"v{text}", "format": "pt"},
        f"layer{text}.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        f"{text}.bias": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
    }
    raw = json.dumps(header).encode("ascii")  # \\u escapes: lone surrogates survive as text
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    return path


def _unicode(s: str) -> bytes:
    data = s.encode("utf-8", "surrogatepass")  # raw UTF-8, as a hand-made pickle may hold it
    return b"X" + struct.pack("<I", len(data)) + data


def _rebuild_tensor(key: str, numel: int) -> bytes:
    """torch._utils._rebuild_tensor_v2((storage pid), 0, (numel,), (1,), False, OrderedDict())."""
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n"
        b"("  # MARK
        b"(" + _unicode("storage") + b"ctorch\nFloatStorage\n" + _unicode(key) + _unicode("cpu")
        + b"K" + bytes([numel]) + b"tQ"  # tuple, BINPERSID
        + b"K\x00" + b"K" + bytes([numel]) + b"\x85" + b"K\x01\x85" + b"\x89"
        + b"ccollections\nOrderedDict\n)R"
        + b"tR"
    )  # fmt: skip


def torch_zip_file(path: Path, text: str) -> Path:
    """A torch zip whose data.pkl (raw opcodes) has a tensor under a name with `text`, an entry
    key and a string value with `text`, and a called global whose module and name hold it."""
    pkl = (
        b"\x80\x04}("  # PROTO 4, EMPTY_DICT, MARK
        + _unicode(f"w{text}.weight") + _rebuild_tensor("0", 2)
        + _unicode(f"epoch{text}") + _unicode(f"note{text}")
        + _unicode("hook")
        + _unicode(f"evil{text}") + _unicode(f"fn{text}") + b"\x93"  # STACK_GLOBAL
        + b"(" + _unicode(f"arg{text}") + b"tR"
        + b"u."
    )  # fmt: skip
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/data/0", bytes(8))
        z.writestr("archive/version", "3\n")
    return path
