"""Issue #12 §3: text from a file never reaches the terminal raw, nor crashes the encoder.

Files are built byte by byte (tests/hostile/textattack.py); every command runs in a subprocess
and its raw stdout/stderr bytes are checked: no C0/C1 control, DEL, bidi or zero-width
character and no lone surrogate may come out, and the exit code must be 0/1/2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .textattack import SPELLINGS, bad_chars, safetensors_file, torch_zip_file

ALL = "".join(SPELLINGS.values())
ARGV_ALL = "".join(v for k, v in SPELLINGS.items() if k != "surrogate")  # argv cannot carry one


def run(*args: str | os.PathLike, cwd: Path) -> tuple[int, str, str]:
    env = {**os.environ, "COLUMNS": "100", "TERM": "dumb", "NO_COLOR": "1"}
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "modelscope_tui", *map(str, args)],
        capture_output=True, timeout=60, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    # Bytes, decoded so that invalid UTF-8 shows up as surrogates (and fails the check).
    out = proc.stdout.decode("utf-8", "surrogateescape")
    err = proc.stderr.decode("utf-8", "surrogateescape")
    return proc.returncode, out, err


def assert_clean(rc: int, out: str, err: str) -> None:
    assert rc in (0, 1, 2), err[-2000:]
    assert "Traceback" not in err
    assert not bad_chars(out), bad_chars(out)
    assert not bad_chars(err), bad_chars(err)


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
@pytest.mark.parametrize("fmt", ["safetensors", "torchzip"])
def test_summary_escapes_each_spelling(tmp_path: Path, spelling: str, fmt: str) -> None:
    text = SPELLINGS[spelling]
    if fmt == "safetensors":
        path = safetensors_file(tmp_path / "m.safetensors", text)
    else:
        path = torch_zip_file(tmp_path / "m.pt", text)
    rc, out, err = run("summary", path, cwd=tmp_path)
    assert_clean(rc, out, err)
    assert rc == 0
    # Shown, escaped: the name is there, its unsafe characters spelled out.
    visible = text.encode("unicode_escape").decode("ascii")
    if spelling == "markup":  # literal brackets, not interpreted (no "[bold red]" swallowed)
        assert "[bold red]x[/]" in out
    elif spelling != "newline_cr":
        assert visible.split("\\")[1][:3] in out or visible in out
    # JSON keeps the exact string, escaped by JSON.
    rc, out, err = run("summary", "--json", path, cwd=tmp_path)
    assert_clean(rc, out, err)
    data = json.loads(out)
    names = [t["name"] for t in data["tensors"]]
    assert any(text in n for n in names)


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("text")
    safetensors_file(d / "all.safetensors", ALL)
    safetensors_file(d / "all2.safetensors", ALL + "2")
    torch_zip_file(d / "all.pt", ALL)
    return d


@pytest.mark.parametrize(
    "args",
    [
        ("summary", "all.pt"),
        ("summary", "all.pt", "--filter", "*"),
        ("summary", "all.safetensors", "--depth", "1"),
        ("audit", "all.pt"),
        ("audit", "--stats", "all.safetensors"),
        ("diff", "--text", "all.pt", "all.safetensors"),
        ("diff", "--text", "all2.safetensors", "all.safetensors"),
        ("estimate", "all.pt"),
        ("all.pt",),  # `mscope FILE` without a terminal prints the summary
        ("summary", f"missing{ARGV_ALL}.pt"),  # error line names a file whose name attacks
        ("summary", "--filter", ARGV_ALL, "all.pt"),
    ],
    ids=lambda a: "-".join(x[:12] for x in a if x.isascii() and x.isprintable()),
)
def test_commands_escape_all_spellings(hostile_dir: Path, args: tuple[str, ...]) -> None:
    assert_clean(*run(*args, cwd=hostile_dir))


def test_plan_round_trip_with_hostile_names(hostile_dir: Path) -> None:
    """plan writes a file (a lone surrogate must not crash its encoder), apply-plan prints
    comments and code from it, estimate --plan reads it back."""
    rc, out, err = run("plan", "all.pt", "--freeze", "*", "-o", "p.json", "--overwrite", cwd=hostile_dir)
    assert_clean(rc, out, err)
    assert rc == 0
    plan = json.loads((hostile_dir / "p.json").read_text())
    assert any(ALL in n for n in plan["frozen"])  # exact, escaped by JSON only
    rc, out, err = run("apply-plan", "p.json", cwd=hostile_dir)
    assert_clean(rc, out, err)
    compile(out, "snippet", "exec")  # still valid Python: names are repr() literals
    assert_clean(*run("estimate", "all.pt", "--plan", "p.json", cwd=hostile_dir))


def test_json_outputs_do_not_crash_on_surrogates(hostile_dir: Path) -> None:
    for args in (("audit", "--json", "all.pt"), ("diff", "--json", "all.pt", "all.safetensors")):
        rc, out, err = run(*args, cwd=hostile_dir)
        assert_clean(rc, out, err)
        json.loads(out)  # ASCII JSON: \u001b, \ud800 escapes


def test_safe_text_rule() -> None:
    from modelscope_tui.units import safe_text

    for text in SPELLINGS.values():
        shown = safe_text(text)
        assert shown.isprintable() and shown.isascii() or all(c.isprintable() for c in shown)
        shown.encode("utf-8")  # never a lone surrogate left
    assert safe_text("\x1b]52;c;x\x07") == "\\x1b]52;c;x\\x07"
    assert safe_text("\u202e") == "\\u202e"
    assert safe_text("\ud800") == "\\ud800"
    assert safe_text("a\nb", multiline=True) == "a\nb"
    assert safe_text("日本語.weight") == "日本語.weight"
