"""#12 section 6: dangerous means *called*, not *on a list*.

Each case is a pickle written opcode by opcode: a global the pickle calls with arguments it
chooses is dangerous, whatever its name, in every report (reader records, `summary --json`,
`audit --json`, `audit --fail-on dangerous` exit 1). Globals only named, or rebuilt the way
torch.save(model) rebuilds modules, stay "unsafe". Nothing here is ever unpickled for real.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import SAMPLES
from hostile.pickleops import (
    BUILD,
    DUP,
    EMPTY_DICT,
    EMPTY_TUPLE,
    MARK,
    MEMOIZE,
    NEWOBJ,
    NEWOBJ_EX,
    NONE,
    OBJ,
    POP,
    PROTO2,
    REDUCE,
    SETITEM,
    TUPLE,
    call,
    get,
    glob,
    i,
    in_dict,
    inst,
    long_get,
    put,
    s,
    sglob,
)
from modelscope_tui.cli import main as cli_main
from modelscope_tui.readers import open_checkpoint

CMD = "touch /tmp/mscope-never-runs"
# name -> (pickle value opcodes, dangerous global, text its rendered call must contain)
DANGEROUS: dict[str, tuple[bytes, str, str]] = {
    # dotted names through STACK_GLOBAL: protocol 4 resolves them attribute by attribute
    "stack-global-pathlib-os-system": (call(sglob("pathlib", "os.system"), s(CMD)), "pathlib.os.system", f"('{CMD}')"),
    "stack-global-torch-dotted-run": (
        call(sglob("torch", "utils.collect_env.run"), s(CMD)), "torch.utils.collect_env.run", f"run('{CMD}')"),
    "stack-global-builtins-getattr": (
        call(call(sglob("builtins", "getattr"), call(sglob("builtins", "__import__"), s("os")), s("system")), s(CMD)),
        "builtins.getattr", "builtins.getattr(builtins.__import__('os'), 'system')"),
    # resolve-by-name helpers
    "pkgutil-resolve-name": (
        call(call(glob("pkgutil", "resolve_name"), s("os:system")), s(CMD)), "pkgutil.resolve_name",
        "pkgutil.resolve_name('os:system')"),
    "importlib-import-module": (
        call(call(glob("builtins", "getattr"), call(glob("importlib", "import_module"), s("os")), s("system")), s(CMD)),
        "importlib.import_module", "importlib.import_module('os')"),
    "operator-attrgetter": (
        call(call(glob("operator", "attrgetter"), s("system")), call(glob("builtins", "__import__"), s("os"))),
        "operator.attrgetter", "operator.attrgetter('system')"),
    "operator-methodcaller": (
        call(call(glob("_operator", "methodcaller"), s("system"), s(CMD)), call(glob("builtins", "__import__"), s("os"))),
        "_operator.methodcaller", "methodcaller('system', "),
    "functools-partial-newobj": (
        glob("functools", "partial") + MARK + glob("posix", "system") + s(CMD) + TUPLE + NEWOBJ + EMPTY_TUPLE + REDUCE,
        "functools.partial", "posix.system"),
    # command-running stdlib and torch helpers nobody listed
    "uuid-get-command-stdout": (
        call(glob("uuid", "_get_command_stdout"), s("touch"), s("/tmp/x")), "uuid._get_command_stdout",
        "uuid._get_command_stdout('touch', '/tmp/x')"),
    "torch-collect-env-run": (call(glob("torch.utils.collect_env", "run"), s(CMD)), "torch.utils.collect_env.run", CMD),
    "interpreters-run-string": (
        call(glob("_interpreters", "run_string"), i(0), s("print(1)")), "_interpreters.run_string", "print(1)"),
    "logging-filehandler": (call(glob("logging", "FileHandler"), s("/tmp/x.log")), "logging.FileHandler", "/tmp/x.log"),
    "unknown-module-function": (call(glob("somepkg.tools", "launch"), s(CMD)), "somepkg.tools.launch", CMD),
    "no-argument-call": (call(glob("somepkg.tools", "launch")), "somepkg.tools.launch", "launch()"),
    # the other call opcodes
    "obj-opcode": (MARK + glob("uuid", "_get_command_stdout") + s("touch") + s("/tmp/x") + OBJ,
                   "uuid._get_command_stdout", "'/tmp/x'"),
    "inst-opcode": (MARK + s("touch") + s("/tmp/x") + inst("uuid", "_get_command_stdout"), "uuid._get_command_stdout", "'/tmp/x'"),
    "newobj-with-a-global": (
        glob("somepkg", "Runner") + MARK + glob("somepkg", "helper") + s(CMD) + TUPLE + NEWOBJ,
        "somepkg.Runner", "somepkg.Runner.__new__(somepkg.helper"),
    "newobj-ex-with-a-global": (
        glob("somepkg", "Runner") + EMPTY_TUPLE + EMPTY_DICT + s("target") + glob("somepkg", "helper") + SETITEM + NEWOBJ_EX,
        "somepkg.Runner", "target=somepkg.helper"),
    "calls-an-object-it-built": (
        glob("somepkg", "Runner") + EMPTY_TUPLE + NEWOBJ + MARK + s(CMD) + TUPLE + REDUCE, "somepkg.Runner", CMD),
    "reconstructor-base-init": (
        call(glob("copy_reg", "_reconstructor"), glob("somepkg", "Thing"), glob("logging", "FileHandler"), s("/tmp/x.log")),
        "logging.FileHandler", "/tmp/x.log"),
    # memo tricks that hide which global is called
    "memo-binput-binget": (
        glob("torch.utils.collect_env", "run") + put(1) + POP + get(1) + MARK + s(CMD) + TUPLE + REDUCE,
        "torch.utils.collect_env.run", CMD),
    "memo-memoize-long-binget": (
        sglob("uuid", "_get_command_stdout") + MEMOIZE + POP + long_get(0) + MARK + s("id") + TUPLE + REDUCE,
        "uuid._get_command_stdout", "('id')"),
    "memo-dup": (glob("pkgutil", "resolve_name") + DUP + POP + MARK + s("os:system") + TUPLE + REDUCE,
                 "pkgutil.resolve_name", "os:system"),
    "memo-named-harmlessly-first": (
        EMPTY_DICT + s("a") + glob("somepkg", "launch") + put(7) + SETITEM + POP + get(7) + MARK + s(CMD) + TUPLE + REDUCE,
        "somepkg.launch", CMD),
}  # fmt: skip

# name -> (pickle value opcodes, global that must stay "unsafe")
NOT_DANGEROUS: dict[str, tuple[bytes, str]] = {
    "only-named": (glob("torch.utils.collect_env", "run"), "torch.utils.collect_env.run"),
    "only-named-resolver": (sglob("pkgutil", "resolve_name"), "pkgutil.resolve_name"),
    "newobj-then-build": (glob("mymodels", "Net") + EMPTY_TUPLE + NEWOBJ + EMPTY_DICT + s("training") + NONE + SETITEM + BUILD,
                          "mymodels.Net"),
    "newobj-plain-data": (glob("mymodels", "Point") + MARK + i(1) + i(2) + TUPLE + NEWOBJ, "mymodels.Point"),
    "reconstructor-object": (
        call(glob("copy_reg", "_reconstructor"), glob("mymodels", "Net"), glob("__builtin__", "object"), NONE) + EMPTY_DICT + BUILD,
        "mymodels.Net"),
}  # fmt: skip


def write(tmp_path: Path, name: str, value: bytes) -> Path:
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(in_dict(value))
    return path


@pytest.mark.parametrize("name", list(DANGEROUS))
def test_called_global_is_dangerous(tmp_path, name):
    value, qualname, text = DANGEROUS[name]
    ckpt = open_checkpoint(write(tmp_path, name, value))
    flagged = {g.qualname: g for g in ckpt.globals if g.safety == "dangerous"}
    assert qualname in flagged, [(g.qualname, g.safety) for g in ckpt.globals]
    assert any(text in c for c in flagged[qualname].calls), flagged[qualname].calls


@pytest.mark.parametrize("name", ["pkgutil-resolve-name", "torch-collect-env-run", "memo-dup", "newobj-with-a-global"])
def test_every_report_says_dangerous(tmp_path, name, capsys):
    value, qualname, text = DANGEROUS[name]
    path = write(tmp_path, name, value)
    assert cli_main(["audit", "--fail-on", "dangerous", str(path)]) == 1
    assert "DANGEROUS global " + qualname in capsys.readouterr().out
    assert cli_main(["audit", "--json", "--fail-on", "dangerous", str(path)]) == 1
    doc = json.loads(capsys.readouterr().out)
    (hit,) = [f for f in doc["findings"] if f["code"] == "dangerous-global" and qualname.endswith(f["details"]["name"])]
    assert any(text in c for c in hit["details"]["calls"])
    assert qualname in doc["loadability"]["dangerous_globals"]
    assert cli_main(["summary", "--json", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {f"{g['module']}.{g['name']}": g["safety"] for g in doc["globals"]}[qualname] == "dangerous"


def test_known_bad_list_only_words_the_reason(tmp_path):
    """An unlisted function called is dangerous with a generic reason; a listed one says what
    it does."""
    ckpt = open_checkpoint(write(tmp_path, "u", DANGEROUS["unknown-module-function"][0]))
    (ref,) = [g for g in ckpt.globals if g.safety == "dangerous"]
    assert "called by the pickle" in ref.reason
    ckpt = open_checkpoint(write(tmp_path, "k", DANGEROUS["torch-collect-env-run"][0]))
    (ref,) = [g for g in ckpt.globals if g.safety == "dangerous"]
    assert "shell command" in ref.reason


@pytest.mark.parametrize("name", list(NOT_DANGEROUS))
def test_named_or_rebuilt_stays_unsafe(tmp_path, name, capsys):
    value, qualname = NOT_DANGEROUS[name]
    path = write(tmp_path, name, value)
    ckpt = open_checkpoint(path)
    assert not [g.qualname for g in ckpt.globals if g.safety == "dangerous"]
    assert {g.qualname: g.safety for g in ckpt.globals}[qualname] == "unsafe"
    assert cli_main(["audit", "--fail-on", "dangerous", str(path)]) == 0
    capsys.readouterr()


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.norm = nn.LayerNorm(3)
        self.act = nn.GELU(approximate="tanh")


class Model(nn.Module):
    """An ordinary model with the attributes people keep on them: none of it is dangerous."""

    def __init__(self):
        import numpy as np

        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.register_buffer("mask", torch.ones(3, dtype=torch.bool))
        self.frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
        self.counts = collections.defaultdict(list, {"a": [1]})
        self.table = np.arange(3.0)
        self.rng = np.random.get_state()
        self.point = collections.namedtuple("Point", "x y")(1, 2) if False else None


@pytest.mark.parametrize("protocol", [1, 2, 4, 5])
def test_full_module_pickle_is_not_dangerous(tmp_path, protocol, capsys):
    path = tmp_path / f"model_p{protocol}.pt"
    torch.save(Model(), path, pickle_protocol=protocol)
    ckpt = open_checkpoint(path)
    assert not [(g.qualname, g.reason) for g in ckpt.globals if g.safety == "dangerous"]
    assert cli_main(["audit", "--fail-on", "dangerous", str(path)]) == 0
    capsys.readouterr()


def test_optimizer_and_sample_full_pickles_are_not_dangerous(tmp_path, capsys):
    lin = nn.Linear(2, 2)
    opt = torch.optim.Adam(lin.parameters())
    lin(torch.ones(1, 2)).sum().backward()
    opt.step()
    path = tmp_path / "opt.pt"
    torch.save({"opt": opt, "sched": torch.optim.lr_scheduler.StepLR(opt, 1)}, path)
    for file in (path, SAMPLES / "notebook_full.pt", SAMPLES / "gone_module_full.pt", SAMPLES / "lightning.ckpt"):
        ckpt = open_checkpoint(file)
        assert not [g.qualname for g in ckpt.globals if g.safety == "dangerous"], file
        assert cli_main(["audit", "--fail-on", "dangerous", str(file)]) == 0, file
        capsys.readouterr()


def test_protocol2_spelling_is_the_same(tmp_path):
    """The rule is about what the pickle does, not how the bytes spell it (PROTO 2, GLOBAL)."""
    path = tmp_path / "p2.pkl"
    path.write_bytes(PROTO2 + EMPTY_DICT + s("x") + call(glob("uuid", "_get_command_stdout"), s("id")) + SETITEM + b".")
    ckpt = open_checkpoint(path)
    assert [g.qualname for g in ckpt.globals if g.safety == "dangerous"] == ["uuid._get_command_stdout"]
