"""Freeze plans end to end: Session -> plan file -> a real nn.Module in a fresh process.

Also the `mscope plan` / `mscope apply-plan` commands, plan validation, restoring a plan into a
Session, and the metadata fingerprint (.pt vs .safetensors of the same weights).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from modelscope_tui import open_checkpoint
from modelscope_tui.training.apply import apply_freeze_plan, apply_plan_to_session
from modelscope_tui.training.fingerprint import checkpoint_fingerprint, model_fingerprint
from modelscope_tui.training.plan import PlanError, load_plan, plan_from_session, save_plan
from modelscope_tui.training.session import Session
from modelscope_tui.training.snippet import plan_snippet

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"

# A small transformer-like model: tied embedding/head, LayerNorms, BatchNorm in blocks 1 and 3.
MODEL_SRC = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d, bn):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.norm = nn.BatchNorm1d(d) if bn else nn.LayerNorm(d)


class TinyLM(nn.Module):
    def __init__(self, extra=False, no_final_norm=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(40, 16)
        self.blocks = nn.ModuleList(Block(16, bn=i in (1, 3)) for i in range(4))
        self.ln_f = nn.Identity() if no_final_norm else nn.LayerNorm(16)
        self.head = nn.Linear(16, 40, bias=False)
        self.head.weight = self.embed.weight
        if extra:
            self.blocks[0].adapter = nn.Linear(16, 16)
"""

FROZEN_HALF = "blocks.[0-1].*"


def model_ns() -> dict:
    ns: dict = {}
    exec(compile(MODEL_SRC, "tinymodel.py", "exec"), ns)
    return ns


def run_py(code: str, cwd: Path, timeout: float = 60) -> dict:
    """Run `code` in a fresh interpreter in `cwd`; it prints one JSON object last."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mscope(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "100", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "modelscope_tui", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """tinymodel.py, its state_dict as model.pt, and plan.json freezing the first half."""
    import torch

    root = tmp_path_factory.mktemp("freeze")
    (root / "tinymodel.py").write_text(MODEL_SRC)
    model = model_ns()["TinyLM"]()
    torch.save(model.state_dict(), root / "model.pt")
    ckpt = open_checkpoint(root / "model.pt")
    session = Session(ckpt)
    result = session.freeze_pattern(FROZEN_HALF)
    assert result.changed > 0
    norms = session.frozen_norm_layers()
    assert norms == ["blocks.1.norm"]
    session.set_eval_mode(norms)
    path = save_plan(session, root / "plan.json")
    return root, session, path


def expected_frozen(names) -> set[str]:
    return {n for n in names if n.startswith(("blocks.0.", "blocks.1."))}


# -- the plan file -----------------------------------------------------------------------------
def test_plan_file_contents(planned):
    root, session, path = planned
    plan = json.loads(path.read_text())
    assert plan["format"] == "mscope.freeze-plan" and plan["version"] == 1
    assert plan["created"].endswith("Z")
    assert plan["checkpoint"]["format"] == "torch-zip"
    assert plan["checkpoint"]["fingerprint"].startswith("sha256:")
    assert plan["checkpoint"]["fingerprint"] == checkpoint_fingerprint(session.ckpt)
    assert plan["checkpoint"]["parameters"] == session.totals()[1]
    assert plan["rules"] == [
        {"action": "freeze", "selector": "glob", "value": FROZEN_HALF, "count": len(plan["frozen"])}
    ]
    assert plan["frozen"] == sorted(plan["frozen"]) and plan["trainable"] == sorted(
        plan["trainable"]
    )
    assert set(plan["frozen"]) == expected_frozen(plan["frozen"] + plan["trainable"])
    # Tied head/embed: both names listed (trainable), the alias recorded; buffers never listed.
    assert {"embed.weight", "head.weight"} <= set(plan["trainable"])
    assert plan["tied"] == {"head.weight": "embed.weight"}
    assert not [n for n in plan["frozen"] + plan["trainable"] if "running" in n or "batches" in n]
    assert plan["eval_modules"] == ["blocks.1.norm"]
    assert load_plan(path)["frozen"] == plan["frozen"]


@pytest.fixture(scope="module")
def fresh(planned):
    """One fresh interpreter (torch imports are slow): first exec the two `mscope apply-plan`
    snippets (compact: the plan's glob; explicit: a frozen-names set) on their own models, then
    `apply_freeze_plan` on another; every model is put back in train mode before reading flags."""
    root, session, path = planned
    explicit = Session(session.ckpt)
    explicit.freeze(
        [n for n in session.canonical if not session.is_trainable(n)]
    )  # names: no replay
    explicit.set_eval_mode(explicit.frozen_norm_layers())
    save_plan(explicit, root / "explicit-plan.json")
    snippets = {}
    for form, plan_file in (("compact", path), ("explicit", root / "explicit-plan.json")):
        proc = mscope("apply-plan", plan_file, "--var", "net")
        assert proc.returncode == 0, proc.stderr
        snippets[form] = proc.stdout
        (root / f"snippet_{form}.py").write_text(proc.stdout)
    out = run_py(
        """
        import json, sys
        from tinymodel import TinyLM

        def flags(m):
            return {n: p.requires_grad for n, p in m.named_parameters(remove_duplicate=False)}

        def modes(m):
            return {n: sub.training for n, sub in m.named_modules()}

        result = {}
        for form in ("compact", "explicit"):
            net = TinyLM()
            exec(open(f"snippet_{form}.py").read(), {"net": net})
            net.train()
            result[form] = {"grad": flags(net), "training": modes(net)}
        result["used_mscope"] = any(m.startswith("modelscope_tui") for m in sys.modules)

        from modelscope_tui import apply_freeze_plan

        model = TinyLM()
        report = apply_freeze_plan(model, "plan.json")
        model.train()
        result["api"] = {
            "grad": flags(model),
            "training": modes(model),
            "missing": report.missing_in_model,
            "not_in_plan": report.not_in_plan,
            "conflicts": report.conflicts,
            "eval": report.eval_modules,
            "frozen": report.frozen,
            "fingerprint_match": report.fingerprint_match,
        }
        print(json.dumps(result))
        """,
        root,
    )
    return out, snippets


def test_apply_in_fresh_process(fresh):
    out = fresh[0]["api"]
    frozen = {n for n, g in out["grad"].items() if not g}
    assert frozen == expected_frozen(out["grad"]) and frozen
    assert set(out["frozen"]) == frozen
    assert out["training"]["blocks.1.norm"] is False  # stays in eval after model.train()
    assert out["training"]["blocks.3.norm"] is True
    assert out["training"][""] is True and out["training"]["blocks.1"] is True
    assert out["missing"] == [] and out["not_in_plan"] == [] and out["conflicts"] == []
    assert out["eval"] == ["blocks.1.norm"]
    assert out["fingerprint_match"] is True


# -- strict mode, ties, keep_eval (in this process) ---------------------------------------------
def test_strict_raises_on_extra_or_missing_parameter(planned):
    root, _, path = planned
    TinyLM = model_ns()["TinyLM"]

    extra = TinyLM(extra=True)
    with pytest.raises(PlanError) as err:
        apply_freeze_plan(extra, path, strict=True)
    assert "not in the plan" in str(err.value) and "plan.json" in str(err.value)
    assert "\n" not in str(err.value)
    assert all(p.requires_grad for p in extra.parameters())  # nothing changed before raising

    missing = TinyLM(no_final_norm=True)
    with pytest.raises(PlanError, match="missing in the model"):
        apply_freeze_plan(missing, path, strict=True)

    report = apply_freeze_plan(extra, path)  # non-strict: applies what matches, reports the rest
    assert report.not_in_plan == ["blocks.0.adapter.weight", "blocks.0.adapter.bias"]
    assert report.missing_in_model == []
    assert report.fingerprint_match is False
    report = apply_freeze_plan(missing, path)
    assert report.missing_in_model == ["ln_f.bias", "ln_f.weight"]
    assert not missing.blocks[0].fc1.weight.requires_grad

    report = apply_freeze_plan(TinyLM(), path, strict=True)
    assert report.ok and report.fingerprint_match is True


def test_tied_parameter_frozen_if_either_name_is():
    TinyLM = model_ns()["TinyLM"]
    model = TinyLM()
    plan = {
        "format": "mscope.freeze-plan",
        "version": 1,
        "trainable": ["embed.weight"],
        "frozen": ["head.weight"],
    }
    report = apply_freeze_plan(model, plan)
    assert model.embed.weight.requires_grad is False
    assert len(report.conflicts) == 1 and "head.weight" in report.conflicts[0]
    assert set(report.frozen) == {"embed.weight", "head.weight"}
    assert report.fingerprint_match is None


def test_keep_eval_false_lets_train_switch_back(planned):
    _, _, path = planned
    model = model_ns()["TinyLM"]()
    apply_freeze_plan(model, path, keep_eval=False)
    assert model.blocks[1].norm.training is False
    model.train()
    assert model.blocks[1].norm.training is True

    locked = model_ns()["TinyLM"]()
    apply_freeze_plan(locked, path)
    locked.train()
    assert locked.blocks[1].norm.training is False
    del locked.blocks[1].norm.train  # the documented way to release it
    locked.train()
    assert locked.blocks[1].norm.training is True


# -- the plain-PyTorch snippet -------------------------------------------------------------------
@pytest.mark.parametrize("form", ["compact", "explicit"])
def test_snippet_matches_apply_freeze_plan(fresh, form):
    out, snippets = fresh
    snippet = snippets[form]
    assert "modelscope_tui" not in snippet and "mscope import" not in snippet
    if form == "compact":
        assert repr(FROZEN_HALF) in snippet and "frozen_names" not in snippet
    else:
        assert "frozen_names = {" in snippet and "'blocks.0.fc1.weight'," in snippet
    assert out["used_mscope"] is False
    assert out[form]["grad"] == out["api"]["grad"]
    assert {n for n, g in out[form]["grad"].items() if not g} == expected_frozen(out[form]["grad"])
    assert out[form]["training"] == out["api"]["training"]
    assert out[form]["training"]["blocks.1.norm"] is False


def test_snippet_compact_with_ties_and_unfreeze(planned):
    _, session, _ = planned
    s = Session(session.ckpt)
    s.freeze_pattern("blocks.*")
    s.freeze_pattern("embed")  # freezes the tied head too
    s.freeze_pattern(r"^blocks\.3\.", "regex", value=True)
    s.train_last_n_blocks(1)
    snippet = plan_snippet(plan_from_session(s), var="self.model")
    assert "frozen_names" not in snippet and "re.search" in snippet
    assert snippet.rstrip().endswith("freeze_from_plan(self.model)")
    compile(snippet, "snippet", "exec")
    # Rules that disagree with a tied pair (unfreeze only the alias) are not replayable.
    s.freeze_pattern("head", value=True)
    plan = plan_from_session(s)
    assert "head.weight" in plan["trainable"] and "embed.weight" in plan["trainable"]
    assert "frozen_names = {" in plan_snippet(plan)  # replay would freeze embed via its name
    s.freeze_pattern("head")  # alias frozen: group frozen; replay says "any name frozen" too
    assert "frozen_names" not in plan_snippet(plan_from_session(s))
    s.unfreeze(["embed.weight"])  # a bare name list cannot be replayed
    assert "frozen_names = {" in plan_snippet(plan_from_session(s))


# -- mscope plan / apply-plan --------------------------------------------------------------------
def test_cli_plan_end_to_end(planned, tmp_path):
    root, session, _ = planned
    out = tmp_path / "cli-plan.json"
    proc = mscope(
        "plan", root / "model.pt", "--freeze", "blocks.*", "--unfreeze", "blocks.3.*",
        "--eval-norms", "-o", out,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("trainable ") and "%" in line for line in lines)
    assert str(out) in lines[-1]
    plan = load_plan(out)
    assert [(r["action"], r["value"]) for r in plan["rules"]] == [
        ("freeze", "blocks.*"),
        ("unfreeze", "blocks.3.*"),
    ]
    names = plan["frozen"] + plan["trainable"]
    assert set(plan["frozen"]) == {
        n for n in names if n.startswith(("blocks.0.", "blocks.1.", "blocks.2."))
    }
    assert plan["eval_modules"] == ["blocks.1.norm"]

    again = mscope("plan", root / "model.pt", "--freeze", "blocks.*", "-o", out)
    assert again.returncode == 2
    assert (
        again.stderr.count("\n") == 1 and "exists" in again.stderr and "--overwrite" in again.stderr
    )
    assert load_plan(out)["rules"] == plan["rules"]  # untouched

    over = mscope("plan", root / "model.pt", "--freeze", "embed", "-o", out, "--overwrite")
    assert over.returncode == 0, over.stderr
    assert load_plan(out)["frozen"] == ["embed.weight", "head.weight"]

    bad = mscope(
        "plan", root / "model.pt", "--regex", "--freeze", "blocks.[0", "-o", tmp_path / "x.json"
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("mscope: error: ") and "regular expression" in bad.stderr
    assert not (tmp_path / "x.json").exists()

    nomatch = mscope("plan", root / "model.pt", "--freeze", "decoder.*", "-o", tmp_path / "x.json")
    assert nomatch.returncode == 2 and "matches no tensor" in nomatch.stderr

    noclass = mscope(
        "plan", root / "model.pt", "--freeze-class", "BatchNorm1d", "-o", tmp_path / "x.json"
    )
    assert noclass.returncode == 2 and noclass.stderr.count("\n") == 1 and "class" in noclass.stderr


def test_cli_plan_classes_and_train_last(tmp_path):
    out = tmp_path / "nb.json"
    proc = mscope("plan", SAMPLES / "notebook_full.pt", "--freeze-class", "BatchNorm2d", "-o", out)
    assert proc.returncode == 0, proc.stderr
    plan = load_plan(out)
    assert [r["selector"] for r in plan["rules"]] == ["class"]
    assert plan["rules"][0]["modules"] == ["body.1", "stem.1"]
    assert "stem.1.weight" in plan["frozen"]
    # notebook_full's Sequentials mix conv, norm, activation and pooling: not repeated blocks.
    bad = mscope("plan", SAMPLES / "notebook_full.pt", "--train-last", "1", "-o", tmp_path / "x.json")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "no repeated blocks" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x.json").exists()


def test_cli_apply_plan_errors(tmp_path):
    proc = mscope("apply-plan", tmp_path / "none.json")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "none.json" in proc.stderr
    good = tmp_path / "p.json"
    good.write_text(
        json.dumps({"format": "mscope.freeze-plan", "version": 1, "trainable": [], "frozen": []})
    )
    proc = mscope("apply-plan", good, "--var", "not a name")
    assert proc.returncode == 2 and "--var" in proc.stderr


# -- validation ----------------------------------------------------------------------------------
BASE = {
    "format": "mscope.freeze-plan",
    "version": 1,
    "trainable": ["a.weight"],
    "frozen": ["b.weight"],
}


@pytest.mark.parametrize(
    "text, expect",
    [
        ("{not json", "not valid JSON"),
        ("[]", "expected a JSON object"),
        (json.dumps({**BASE, "format": "other"}), "not a freeze plan"),
        (json.dumps({**BASE, "version": 2}), "newer than this mscope"),
        (json.dumps({**BASE, "version": "1"}), "positive integer"),
        (json.dumps({**BASE, "frozen": "b.weight"}), "must be a list"),
        (json.dumps({**BASE, "frozen": ["b.weight", 3]}), "frozen[1] must be a string"),
        (json.dumps({k: v for k, v in BASE.items() if k != "trainable"}), "no 'trainable'"),
        (json.dumps({**BASE, "frozen": ["a.weight"]}), "both trainable and frozen"),
        (json.dumps({**BASE, "eval_modules": [None]}), "eval_modules[0]"),
        (
            json.dumps({**BASE, "rules": [{"action": "melt", "selector": "glob", "value": "x"}]}),
            "action",
        ),
        (json.dumps({**BASE, "checkpoint": []}), "'checkpoint' must be an object"),
    ],
)
def test_load_plan_rejects(tmp_path, text, expect):
    path = tmp_path / "bad-plan.json"
    path.write_text(text)
    with pytest.raises(PlanError) as err:
        load_plan(path)
    line = str(err.value)
    assert expect in line and "bad-plan.json" in line and "\n" not in line


def test_load_plan_accepts_minimal_dict():
    plan = load_plan(BASE)
    assert plan["eval_modules"] == [] and plan["rules"] == [] and plan["tied"] == {}


# -- restoring a plan into a Session -------------------------------------------------------------
def test_plan_round_trip_through_session(planned):
    root, session, path = planned
    fresh = Session(open_checkpoint(root / "model.pt"))
    report = apply_plan_to_session(fresh, path)
    assert report.changed > 0 and report.fingerprint_match is True
    assert report.unknown == [] and report.not_in_plan == [] and report.warnings == []
    assert fresh.trainable == session.trainable
    assert fresh.eval_modules == {"blocks.1.norm"}
    assert fresh.totals_line() == session.totals_line()
    again = plan_from_session(fresh)
    original = load_plan(path)
    for key in ("trainable", "frozen", "eval_modules", "tied"):
        assert again[key] == original[key]
    assert [r["action"] for r in again["rules"]] == ["restore"]

    # One undoable change; applying again changes nothing.
    assert apply_plan_to_session(fresh, path).changed == 0
    fresh.undo()
    assert fresh.trainable == fresh.initial and fresh.eval_modules == set()
    assert not fresh.can_undo
    fresh.redo()
    assert fresh.trainable == session.trainable and fresh.eval_modules == {"blocks.1.norm"}


def test_session_apply_reports_unknown_names_and_other_checkpoint(planned):
    root, _, path = planned
    plan = load_plan(path)
    plan["frozen"] = [*plan["frozen"], "decoder.weight", "blocks.1.norm.running_mean"]
    plan["eval_modules"] = ["blocks.1.norm", "nowhere"]
    fresh = Session(open_checkpoint(root / "model.pt"))
    report = apply_plan_to_session(fresh, plan)
    assert report.unknown == ["decoder.weight"]
    assert report.untrainable == ["blocks.1.norm.running_mean"]
    assert report.unknown_eval_modules == ["nowhere"] and report.eval_modules == ["blocks.1.norm"]
    assert report.fingerprint_match is True

    other = Session(open_checkpoint(SAMPLES / "cnn_state_dict.pt"))
    report = apply_plan_to_session(other, path)
    assert report.fingerprint_match is False
    assert any("different model" in w for w in report.warnings)
    assert len(report.unknown) == len(load_plan(path)["frozen"]) + len(load_plan(path)["trainable"])
    assert report.changed == 0 and not other.can_undo


# -- fingerprint ---------------------------------------------------------------------------------
def test_fingerprint_same_for_pt_and_safetensors(tmp_path):
    import torch
    from safetensors.torch import save_file

    sd = torch.load(SAMPLES / "transformer_tied.pt", weights_only=True)
    assert sd["lm_head.weight"].data_ptr() == sd["embed.weight"].data_ptr()
    torch.save(sd, tmp_path / "copy.pt")
    save_file({k: v.clone().contiguous() for k, v in sd.items()}, tmp_path / "copy.safetensors")
    pt = open_checkpoint(tmp_path / "copy.pt")
    st = open_checkpoint(tmp_path / "copy.safetensors")
    assert st.format == "safetensors"
    fp = checkpoint_fingerprint(pt)
    assert (
        fp
        == checkpoint_fingerprint(st)
        == checkpoint_fingerprint(open_checkpoint(SAMPLES / "transformer_tied.pt"))
    )
    assert fp != checkpoint_fingerprint(open_checkpoint(SAMPLES / "cnn_state_dict.pt"))

    # A plan made on the .pt applies to the .safetensors without a mismatch warning.
    s = Session(pt)
    s.freeze_pattern("blocks.0.*")
    s.freeze_pattern("embed")
    report = apply_plan_to_session(Session(st), plan_from_session(s))
    assert report.fingerprint_match is True and report.warnings == [] and report.unknown == []

    # And the model fingerprint (no state_dict call) agrees with the file's.
    TinyLM = model_ns()["TinyLM"]
    model = TinyLM()
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    assert model_fingerprint(model) == checkpoint_fingerprint(
        open_checkpoint(tmp_path / "tiny.pt")
    )


def test_freeze_module_import_is_light():
    code = (
        "import modelscope_tui.training.plan, modelscope_tui.training.apply, modelscope_tui.training.snippet,"
        " modelscope_tui, sys; print(int('torch' in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "0", proc.stderr
