"""#12 section 7: a payload counts even when the file is not a valid checkpoint.

pickle.load runs opcodes until it meets a bad one, and other loaders open pickles wherever they
sit in a zip. Every pickle mscope can reach is scanned: `audit --fail-on dangerous` exits 1, the
one-line error of `summary` says what would run, and tampering with module state is reported as
an attack. Files are built byte by byte; nothing here is ever unpickled for real.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from conftest import small_state_dict
from hostile.pickleops import (
    BUILD,
    EMPTY_DICT,
    MARK,
    NONE,
    POP,
    PROTO2,
    PROTO4,
    SETITEM,
    TUPLE,
    TUPLE2,
    call,
    glob,
    in_dict,
    s,
    sglob,
    write_zip,
)
from modelscope_tui.cli import main as cli_main
from modelscope_tui.readers.pickle.unpickler import TensorRef, _rebuild_parameter

CMD = "touch /tmp/mscope-never-runs"
PAYLOAD = call(glob("os", "system"), s(CMD))
CALL = f"os.system('{CMD}')"
RENAMED = call(glob("uuid", "_get_command_stdout"), s("id"))  # not on any list


def audit(path: Path, capsys) -> tuple[int, dict]:
    rc = cli_main(["audit", "--json", "--fail-on", "dangerous", str(path)])
    return rc, json.loads(capsys.readouterr().out)


def dangerous_calls(doc: dict) -> list[str]:
    return [c for f in doc["findings"] if f["code"] == "dangerous-global" for c in f["details"]["calls"]]


def patch(blob: bytes, old: bytes, new: bytes, count: int = -1) -> bytes:
    assert old in blob and len(old) == len(new)
    return blob.replace(old, new, count)


def set_flags(blob: bytes, flags: int) -> bytes:
    """General-purpose flag bits on every local and central header (encrypted, data descriptor)."""
    out = bytearray(blob)
    for sig, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = out.find(sig)
        while pos >= 0:
            struct.pack_into("<H", out, pos + at, flags)
            pos = out.find(sig, pos + 4)
    return bytes(out)


# name -> build(tmp_path) -> path; each carries PAYLOAD or RENAMED where a loader reaches it
def _nullifai_invalid_opcode(tmp: Path) -> Path:
    return _write(tmp / "n.pkl", PROTO2 + PAYLOAD + POP + b"\xff rest of a model")


def _nullifai_protocol0(tmp: Path) -> Path:  # no magic bytes: mscope calls it "unknown format"
    return _write(tmp / "n0.bin", PAYLOAD + POP + b"\xffjunk")


def _nullifai_truncated(tmp: Path) -> Path:
    return _write(tmp / "nt.pkl", PROTO4 + PAYLOAD + POP + b"X\xff\xff\x00\x00abc")


def _nullifai_unbalanced(tmp: Path) -> Path:  # valid opcodes, broken stack after the call
    return _write(tmp / "nu.pkl", PROTO2 + PAYLOAD + POP + POP + POP + b".")


def _nullifai_in_torch_zip(tmp: Path) -> Path:
    return write_zip(tmp / "nz.pt", {"archive/data.pkl": PROTO2 + RENAMED + POP + b"\xfe", "archive/version": b"3\n"})


def _zip_at_root(tmp: Path) -> Path:
    return write_zip(tmp / "root.pt", {"data.pkl": in_dict(PAYLOAD, PROTO2), "version": b"3\n"})


def _zip_other_name(tmp: Path) -> Path:
    return write_zip(tmp / "other.zip", {"weights/x.bin": in_dict(RENAMED, PROTO2), "README": b"model card"})


def _zip_data_pickle_ext(tmp: Path) -> Path:
    return write_zip(tmp / "ext.zip", {"model/data.pickle": in_dict(PAYLOAD)})


def _zip_flag_bits(tmp: Path) -> Path:
    path = write_zip(tmp / "flags.pt", {"archive/data.pkl": in_dict(PAYLOAD, PROTO2), "archive/version": b"3\n"})
    path.write_bytes(set_flags(path.read_bytes(), 0x0009))
    return path


def _zip_names_differ(tmp: Path) -> Path:
    path = write_zip(tmp / "names.pt", {"archive/data.pkl": in_dict(PAYLOAD, PROTO2), "archive/version": b"3\n"})
    blob = path.read_bytes()
    local = blob.index(b"archive/data.pkl")  # the first is the local header's copy
    path.write_bytes(blob[:local] + b"archive/xxxx.pkl" + blob[local + 16 :])
    return path


def _torch_zip_second_folder(tmp: Path) -> Path:
    import torch

    path = tmp / "two.pt"
    torch.save(small_state_dict(), path)
    with __import__("zipfile").ZipFile(path, "a") as zf:
        zf.writestr("other/data.pkl", in_dict(RENAMED, PROTO2))
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


REACHABLE = {
    "nullifai-invalid-opcode": (_nullifai_invalid_opcode, CALL),
    "nullifai-protocol0-unknown-format": (_nullifai_protocol0, CALL),
    "nullifai-truncated": (_nullifai_truncated, CALL),
    "nullifai-stack-underflow": (_nullifai_unbalanced, CALL),
    "nullifai-in-torch-zip": (_nullifai_in_torch_zip, "uuid._get_command_stdout('id')"),
    "zip-pickle-at-root": (_zip_at_root, CALL),
    "zip-other-name-bin": (_zip_other_name, "uuid._get_command_stdout('id')"),
    "zip-data-pickle-extension": (_zip_data_pickle_ext, CALL),
    "zip-flag-bits": (_zip_flag_bits, CALL),
    "zip-local-central-names-differ": (_zip_names_differ, CALL),
    "torch-zip-pickle-in-second-folder": (_torch_zip_second_folder, "uuid._get_command_stdout('id')"),
}


@pytest.mark.parametrize("name", list(REACHABLE))
def test_reachable_payload_fails_audit(tmp_path, name, capsys):
    build, text = REACHABLE[name]
    path = build(tmp_path)
    rc, doc = audit(path, capsys)
    assert rc == 1, doc["findings"]
    assert any(text in c for c in dangerous_calls(doc)), doc["findings"]
    assert cli_main(["audit", "--fail-on", "dangerous", str(path)]) == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err and "Inert" not in out.out + out.err


@pytest.mark.parametrize("name", ["nullifai-invalid-opcode", "nullifai-protocol0-unknown-format", "zip-pickle-at-root"])
def test_error_line_says_what_would_run(tmp_path, name, capsys):
    build, text = REACHABLE[name]
    assert cli_main(["summary", str(build(tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and text in err, err


def test_unknown_format_without_payload_is_still_exit_2(tmp_path, capsys):
    path = _write(tmp_path / "x.bin", b"cjunk\nline\n\xff not a pickle at all")
    assert cli_main(["audit", "--fail-on", "dangerous", str(path)]) == 2
    assert "unknown file format" in capsys.readouterr().err


def test_clean_torch_zip_stays_clean(tmp_path, capsys):
    import torch

    path = tmp_path / "clean.pt"
    torch.save({"model": small_state_dict(), "epoch": 3}, path)
    rc, doc = audit(path, capsys)
    assert rc == 0 and not dangerous_calls(doc)
    assert doc["loadability"]["weights_only"] is True


# tampering with module state: BUILD / SETITEM on a global itself
TAMPERING = {
    "build-dict-on-module": glob("torch", "_utils") + EMPTY_DICT + s("_rebuild_tensor_v2") + glob("posix", "system") + SETITEM + BUILD,
    "build-slotstate-on-module": (glob("torch", "_utils") + NONE + EMPTY_DICT + s("_rebuild_tensor_v2") + glob("posix", "system")
                                  + SETITEM + TUPLE2 + BUILD),
    "setitem-on-module-dict": sglob("torch", "_utils.__dict__") + s("_rebuild_tensor_v2") + glob("posix", "system") + SETITEM,
    "setitem-on-module-global": glob("torch.nn.modules.module", "_global_forward_hooks") + MARK + s("x") + TUPLE + s("h") + SETITEM,
}  # fmt: skip


@pytest.mark.parametrize("name", list(TAMPERING))
def test_tampering_is_an_attack(tmp_path, name, capsys):
    path = _write(tmp_path / f"{name}.pkl", in_dict(TAMPERING[name]))
    rc, doc = audit(path, capsys)
    assert rc == 1
    (hit, *_) = [f for f in doc["findings"] if f["code"] == "dangerous-global" and "tampering" in f["message"]]
    assert "malformed" not in json.dumps(doc) and "Inert" not in json.dumps(doc)
    if "rebuild_tensor_v2" in TAMPERING[name].decode("latin-1"):
        assert any("_rebuild_tensor_v2" in c and "posix.system" in c for c in hit["details"]["calls"]), hit


@pytest.mark.parametrize(
    "target", [("torch._utils", "_rebuild_parameter", "__defaults__"), ("torch._utils", "_rebuild_tensor_v2", "__repr__")]
)
def test_tampering_with_an_allowlisted_stand_in_is_refused_and_undone(tmp_path, target, capsys):
    module, name, attr = target
    before = (_rebuild_parameter.__defaults__, TensorRef.__repr__)
    state = NONE + EMPTY_DICT + s(attr) + MARK + NONE + TUPLE + SETITEM + TUPLE2
    path = _write(tmp_path / "t.pkl", in_dict(glob(module, name) + state + BUILD))
    rc, doc = audit(path, capsys)
    assert rc == 1 and any("tampering" in f["message"] for f in doc["findings"]), doc["findings"]
    assert (_rebuild_parameter.__defaults__, TensorRef.__repr__) == before


def test_second_folder_is_both_refused_and_searched(tmp_path, capsys):
    """torch.load refuses a zip with two record folders (a reference-loader error), and what hides
    in the other folder is still a payload another loader would run: both findings, side by side."""
    path = _torch_zip_second_folder(tmp_path)
    rc, doc = audit(path, capsys)
    codes = {f["code"] for f in doc["findings"]}
    assert rc == 1 and {"reference-loader-refuses", "dangerous-global"} <= codes, doc["findings"]
    assert any("other/data.pkl" in f["message"] for f in doc["findings"] if f["code"] == "reference-loader-refuses")
