"""Plan fingerprints: a plan records the names, shapes and dtypes of its model; a plan used on
another model is an error in strict mode and a loud warning listing what differs otherwise, in the
CLI, the Python API, the plain-PyTorch snippet and the explorer's plan check. Real torch files."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import run_cli, settle
from modelscope_tui.readers import open_checkpoint
from modelscope_tui.training.apply import (
    PlanMismatchWarning,
    PlanUncheckedWarning,
    apply_freeze_plan,
    apply_plan_to_session,
)
from modelscope_tui.training.plan import PlanError, save_plan
from modelscope_tui.training.session import Session


def net(width: int = 8, extra: bool = False, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(4, width), nn.LayerNorm(width), nn.Linear(width, 2)]
    if extra:
        layers.append(nn.Linear(2, 2))
    return nn.Sequential(*layers).to(dtype)


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fp")
    torch.save(net().state_dict(), root / "model.pt")
    torch.save(net(), root / "full.pt")
    torch.save(net(width=16).state_dict(), root / "wide.pt")
    torch.save(net(extra=True), root / "extra_full.pt")
    s = Session(open_checkpoint(root / "model.pt"))
    s.freeze_pattern("0.*")
    return save_plan(s, root / "plan.json")


def old_plan(plan: Path, tmp: Path, keep_hash: bool) -> Path:
    data = json.loads(plan.read_text())
    del data["checkpoint"]["shapes"]
    if not keep_hash:
        del data["checkpoint"]["fingerprint"]
    out = tmp / ("hash_only.json" if keep_hash else "old.json")
    out.write_text(json.dumps(data))
    return out


def test_plan_records_names_shapes_dtypes(plan):
    shapes = json.loads(plan.read_text())["checkpoint"]["shapes"]
    assert shapes["0.weight"] == [[8, 4], "float32"] and shapes["1.bias"] == [[8], "float32"]
    assert set(shapes) == set(net().state_dict())


# -- Python API ----------------------------------------------------------------------------------
def test_api_same_model_no_warning(plan):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = apply_freeze_plan(net(), plan, strict=True)
    assert report.fingerprint_match is True and report.ok


def test_api_shape_change_warns_and_strict_raises(plan):
    model = net(width=16)  # same names, other shapes
    with pytest.raises(PlanError, match="shape/dtype change") as err:
        apply_freeze_plan(model, plan, strict=True)
    assert "\n" not in str(err.value) and "plan.json" in str(err.value)
    assert all(p.requires_grad for p in model.parameters())  # nothing changed before raising
    with pytest.warns(PlanMismatchWarning) as rec:
        report = apply_freeze_plan(model, plan)
    text = str(rec[0].message)
    assert "changed: '0.weight' [8, 4] float32 -> [16, 4] float32" in text
    assert report.fingerprint_match is False and any("0.weight" in n for n in report.notes)


def test_api_dtype_and_extra_names(plan):
    with pytest.warns(PlanMismatchWarning, match=r"'2.weight' \[2, 8\] float32 -> \[2, 8\] float16"):
        apply_freeze_plan(net(dtype=torch.float16), plan)
    with pytest.warns(PlanMismatchWarning, match=r"not in the plan: '3.weight'"):
        apply_freeze_plan(net(extra=True), plan)


def test_api_old_plans_stay_readable(plan, tmp_path):
    old = old_plan(plan, tmp_path, keep_hash=False)
    with pytest.warns(PlanUncheckedWarning, match="no fingerprint") as rec:
        report = apply_freeze_plan(net(), old, strict=True)
    assert len(rec) == 1 and report.fingerprint_match is None
    hashed = old_plan(plan, tmp_path, keep_hash=True)  # the hash alone: names, not shapes
    with pytest.raises(PlanError, match="only a hash"):
        apply_freeze_plan(net(width=16), hashed, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert apply_freeze_plan(net(), hashed, strict=True).fingerprint_match is True


def test_session_apply_strict_and_lists(plan):
    other = Session(open_checkpoint(plan.parent / "wide.pt"))
    with pytest.raises(PlanError, match="different model"):
        apply_plan_to_session(other, plan, strict=True)
    assert not other.can_undo
    report = apply_plan_to_session(other, plan)
    assert ("0.weight", "[8, 4] float32", "[16, 4] float32") in report.fingerprint.changed
    assert any("changed: '0.weight'" in w for w in report.warnings)
    full = Session(open_checkpoint(plan.parent / "full.pt"))  # same weights, full-module pickle
    assert apply_plan_to_session(full, plan, strict=True).fingerprint_match is True
    extra = Session(open_checkpoint(plan.parent / "extra_full.pt"))
    report = apply_plan_to_session(extra, plan)
    assert report.fingerprint.extra == ["3.bias", "3.weight"]


# -- CLI -----------------------------------------------------------------------------------------
def test_cli_estimate_strict_and_warnings(plan, tmp_path):
    same = run_cli("estimate", plan.parent / "full.pt", "--plan", plan, "--strict", "--precision", "fp32")
    assert same.rc == 0 and "warning" not in same.stderr, same.stderr
    bad = run_cli("estimate", plan.parent / "wide.pt", "--plan", plan, "--strict")
    assert bad.rc == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.output
    assert bad.stderr.startswith("mscope: error: ") and "different model" in bad.stderr
    loose = run_cli("estimate", plan.parent / "wide.pt", "--plan", plan, "--precision", "fp32")
    assert loose.rc == 0
    assert "mscope: warning: plan.json was made for a different model" in loose.stderr
    assert "mscope: warning: changed: '0.weight' [8, 4] float32 -> [16, 4] float32" in loose.stderr
    assert "already matches" not in loose.stdout
    old = run_cli("estimate", plan.parent / "model.pt", "--plan", old_plan(plan, tmp_path, False), "--strict", "--precision", "fp32")
    assert old.rc == 0 and old.stderr.count("no fingerprint") == 1


def run_snippet(snippet: str, model_code: str, tmp: Path) -> subprocess.CompletedProcess:
    script = tmp / "train.py"
    script.write_text(
        "import torch\nfrom torch import nn\nimport warnings\nwarnings.simplefilter('always')\n"
        + model_code + "\n" + snippet + "\nprint('frozen', [n for n, p in model.named_parameters() if not p.requires_grad])\n"
    )
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)


SAME = "torch.manual_seed(0)\nmodel = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))"
WIDE = "model = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Linear(16, 2))"


def test_snippet_checks_the_model_at_runtime(plan, tmp_path):
    loose = run_cli("apply-plan", plan)
    strict = run_cli("apply-plan", plan, "--strict")
    assert loose.rc == 0 and strict.rc == 0 and "PLAN_SHAPES" in loose.stdout
    ok = run_snippet(loose.stdout, SAME, tmp_path)
    assert ok.returncode == 0 and "Warning" not in ok.stderr, ok.stderr
    assert "frozen ['0.weight', '0.bias']" in ok.stdout
    warned = run_snippet(loose.stdout, WIDE, tmp_path)
    assert warned.returncode == 0 and "UserWarning" in warned.stderr
    assert "changed: '0.weight' ((8, 4), 'float32') -> ((16, 4), 'float32')" in warned.stderr
    raised = run_snippet(strict.stdout, WIDE, tmp_path)
    assert raised.returncode == 1 and "RuntimeError: this model does not match" in raised.stderr
    assert "frozen" not in raised.stdout  # nothing applied
    assert run_snippet(strict.stdout, SAME, tmp_path).returncode == 0


def test_snippet_old_plans(plan, tmp_path):
    old = run_cli("apply-plan", old_plan(plan, tmp_path, False), "--strict")
    assert old.rc == 0 and old.stderr.count("no fingerprint") == 1
    assert "is not checked" in old.stdout and run_snippet(old.stdout, WIDE, tmp_path).returncode == 0
    hashed = run_cli("apply-plan", old_plan(plan, tmp_path, True), "--strict")
    assert "PLAN_FINGERPRINT" in hashed.stdout
    assert run_snippet(hashed.stdout, SAME, tmp_path).returncode == 0
    assert run_snippet(hashed.stdout, WIDE, tmp_path).returncode == 1


def test_cli_diff_plan_warns_for_another_model(plan):
    res = run_cli("diff", plan.parent / "wide.pt", plan.parent / "wide.pt", "--plan", plan, "--text")
    assert "mscope: warning: plan.json was made for a different model" in res.stderr
    assert "warning: changed: '0.weight'" in res.stdout
    same = run_cli("diff", plan.parent / "model.pt", plan.parent / "full.pt", "--plan", plan, "--json")
    assert same.rc == 0 and "warning" not in same.stderr
    assert json.loads(same.stdout)["plan"]["fingerprint"] == []


# -- explorer ------------------------------------------------------------------------------------
async def test_explorer_diff_plan_check_warns(plan):
    from rich.console import Console

    from modelscope_tui.tui.app import MscopeApp

    wide = plan.parent / "wide.pt"
    app = MscopeApp(wide, compare=wide, plan=plan, show_gpus=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        messages = [str(n.message) for n in app._notifications]
        assert any("was made for a different model" in m for m in messages), messages
        app.tree.move_cursor(app.tree.root)
        await pilot.pause()
        console = Console(width=160, record=True, file=open("/dev/null", "w"))
        console.print(app.query_one("#details").content)
        text = console.export_text()
        assert "warning: changed: '0.weight' [8, 4] float32 -> [16, 4] float32" in text
