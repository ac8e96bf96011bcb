"""Issue #12 §2 (plan regexes): a regex from a user or a plan file cannot backtrack for ages.
Refused by shape (patterns.py) in `mscope plan --regex`, the explorer's session, and the rule
replay behind `apply-plan`; ordinary freeze regexes still work."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from modelscope_tui.patterns import PatternError, compile_safe_regex
from modelscope_tui.training.snippet import plan_snippet

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"
EVIL = ["(a+)+$", "(a|aa)+$", "(a*)*b", "(x?)+y", "(\\w+\\s?)+$", "(.*a){12}", "(a)\\1+$", "a*a*a*b"]


@pytest.mark.parametrize("pattern", EVIL)
def test_catastrophic_shapes_are_refused(pattern: str) -> None:
    with pytest.raises(PatternError):
        compile_safe_regex(pattern)


@pytest.mark.parametrize("pattern", ["blocks\\.(1[0-9]|2[0-3])\\.", ".*norm.*", "^encoder\\.layers\\.\\d+\\.", "(?:weight|bias)$"])
def test_ordinary_freeze_regexes_pass(pattern: str) -> None:
    compile_safe_regex(pattern)


def test_plan_command_refuses_with_one_line(cli, tmp_path: Path) -> None:
    start = time.monotonic()
    result = cli("plan", SAMPLES / "cnn_state_dict.pt", "--regex", "--freeze", "(a+)+$", "-o", tmp_path / "p.json")
    assert result.rc == 2 and result.stderr.count("\n") == 1 and "refused" in result.stderr
    assert time.monotonic() - start < 20
    assert not (tmp_path / "p.json").exists()


def test_apply_plan_with_a_hostile_rule_spells_out_names_fast(tmp_path: Path) -> None:
    names = ["a" * 40 + "!", "a" * 30 + "b.weight"]
    plan = {
        "format": "mscope.freeze-plan", "version": 1,
        "rules": [{"action": "freeze", "selector": "regex", "value": "(a+)+$", "count": 1}],
        "trainable": names[1:], "frozen": names[:1],
    }  # fmt: skip
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    start = time.monotonic()
    snippet = plan_snippet(path)
    assert time.monotonic() - start < 2
    assert "(a+)+$" not in snippet.split("def freeze_from_plan", 1)[1]  # the regex is never run
    assert repr(names[0]) in snippet


def test_session_refuses_in_the_explorer_path() -> None:
    from modelscope_tui.readers import open_checkpoint
    from modelscope_tui.training.session import Session, SessionError

    session = Session(open_checkpoint(SAMPLES / "cnn_state_dict.pt"))
    with pytest.raises(SessionError, match="refused"):
        session.freeze_pattern("(a+)+$", "regex")
    assert session.freeze_pattern("weight$", "regex").matched


def test_one_glob_rule_in_code_and_in_the_generated_snippet():
    """summary filters, Session.match and the freeze snippet share patterns.glob_matches; the
    snippet's source form (glob_condition) says the same thing."""
    import fnmatch

    from modelscope_tui.patterns import glob_condition, glob_matches

    names = ["encoder.layers.0.weight", "encoder.layers.10.bias", "head.weight", "Head.weight", "x"]
    patterns = ["encoder.layers.[0-9]", "encoder", "head.weight", "*.bias", "encoder.layers.1?", "x", "[!e]*"]
    for pattern in patterns:
        code = compile(glob_condition(pattern), "<cond>", "eval")
        for name in names:
            want = fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")
            assert glob_matches(name, pattern) == want
            assert eval(code, {"fnmatch": fnmatch, "name": name}) == want
    assert glob_matches("encoder.layers.3.weight", "encoder.layers.[0-9]")
    assert not glob_matches("head.weight", "Head")
