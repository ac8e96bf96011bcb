"""Hostile PEFT adapter directories: adapter_config.json is user data (huge, garbage, wrong
types, nested), key names are user data (`../`, terminal escapes), and adapter_model.bin is a
pickle. Each is one line and exit 2, or a summary that escapes what it shows; nothing runs."""

from __future__ import annotations

import json
import struct

import pytest

from modelscope_tui.cli import main

GOOD = {
    "peft_type": "LORA",
    "r": 2,
    "lora_alpha": 4,
    "target_modules": ["q"],
    "modules_to_save": None,
}


def safetensors_bytes(names: list[str]) -> bytes:
    header = {
        n: {"dtype": "F32", "shape": [2, 2], "data_offsets": [16 * i, 16 * (i + 1)]}
        for i, n in enumerate(names)
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(16 * len(names))


def adapter(tmp_path, config: bytes | dict, names=("base_model.model.q.lora_A.weight",)):
    d = tmp_path / "adapter"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_bytes(
        config if isinstance(config, bytes) else json.dumps(config).encode()
    )
    (d / "adapter_model.safetensors").write_bytes(safetensors_bytes(list(names)))
    return d


BAD_CONFIGS = {
    "garbage": (b"\xff\x00not json", "not UTF-8"),
    "array": (b"[1, 2, 3]", "a JSON list, not an object"),
    "nested": (b"[" * 100_000 + b"]" * 100_000, "adapter_config.json"),
    "huge": (b'{"r": 2, "pad": "' + b"x" * (2 << 20) + b'"}', "too large"),
    "r as text": ({**GOOD, "r": "8"}, "'r' must be an integer"),
    "r as bool": ({**GOOD, "r": True}, "'r' must be an integer"),
    "targets a number": ({**GOOD, "target_modules": 5}, "'target_modules' must be a list"),
    "saved numbers": ({**GOOD, "modules_to_save": [1]}, "'modules_to_save' must list module names"),
    "layers text": ({**GOOD, "layers_to_transform": ["a"]}, "'layers_to_transform' must be a list"),
    "dropout 7": ({**GOOD, "lora_dropout": 7}, "'lora_dropout' must be between"),
    "dora yes": ({**GOOD, "use_dora": "yes"}, "'use_dora' must be true or false"),
    "rank pattern": ({**GOOD, "rank_pattern": {"q": "big"}}, "'rank_pattern' must map"),
    "long name": (
        {**GOOD, "target_modules": "x" * 10_000},
        "'target_modules' must be a string of at most",
    ),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_is_one_line(tmp_path, capsys, case):
    config, says = BAD_CONFIGS[case]
    d = adapter(tmp_path, config)
    assert main(["summary", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert says in err and "adapter_config.json" in err


def test_missing_weights_is_one_line(tmp_path, capsys):
    d = adapter(tmp_path, GOOD)
    (d / "adapter_model.safetensors").unlink()
    assert main(["summary", str(d)]) == 2
    assert "without adapter_model.safetensors or adapter_model.bin" in capsys.readouterr().err


def test_names_that_escape_are_shown_escaped(tmp_path, capsys):
    names = [
        "base_model.model.../../etc/passwd.lora_A.weight",
        "base_model.model.\x1b[2J\x1b]0;owned\x07q.lora_B.weight",
        "base_model.model.lm_head.weight",  # no modules_to_save: a trained base tensor
    ]
    d = adapter(tmp_path, GOOD, names)
    assert main(["summary", str(d)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "passwd" in out and "lora_A" in out
    base = tmp_path / "base.safetensors"
    base.write_bytes(safetensors_bytes(["q.weight", "lm_head.weight"]))
    assert main(["summary", str(base), "--adapter", str(d), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    findings = doc["metadata"]["peft"]["findings"]
    assert any("../../etc/passwd" in f and "lacks" in f for f in findings)
    assert not any(p.name != "adapter" for p in tmp_path.iterdir() if p.is_dir())  # nothing written


def test_pickled_bin_adapter_never_runs(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(GOOD))
    torch.save(
        {"base_model.model.q.lora_A.weight": torch.zeros(2, 2), "x": Payload()},
        d / "adapter_model.bin",
    )
    main(["summary", str(d)])
    out = capsys.readouterr()
    assert not marker.exists()
    assert "system" in out.out + out.err
