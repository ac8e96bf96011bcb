"""Real code-execution payloads: mscope must list them and never run them.

Every payload here, if unpickled for real, creates a marker file (the `live` tests prove that by
loading them with plain `pickle` in a subprocess). The reader must open the file, list the model,
name the dangerous global with the argument it would have been called with, leave no marker and
import nothing the file names.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import importlib
import json
import operator
import os
import pickle
import posix
import runpy
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import run_cli, small_state_dict
from modelscope_tui.cli import main as cli_main
from modelscope_tui.readers import open_checkpoint

CANARY = "mscope_canary_mod"


class Reduce:
    """Pickles as `func(*args)`: exactly what a malicious `__reduce__` returns."""

    def __init__(self, func: Callable, *args: object):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *args):  # pickle insists the callable it writes is callable
        raise AssertionError("never called")


@contextlib.contextmanager
def named_global(module: str, name: str) -> Iterator[Callable]:
    """A stand-in that pickles as `module.name` (what a real load would then call).

    pickle writes a function under its own `__module__` (`os.system` is `posix.system`), so to get
    the names attackers write we put the stand-in there while saving, and restore the real one.
    """

    def stand_in(*args, **kwargs):  # pragma: no cover - the test fails if anything calls it
        raise AssertionError(f"{module}.{name} stand-in called")

    stand_in.__module__, stand_in.__qualname__, stand_in.__name__ = module, name, name
    created = module not in sys.modules
    mod = sys.modules.setdefault(module, types.ModuleType(module))
    missing = object()
    old = getattr(mod, name, missing)
    setattr(mod, name, stand_in)
    try:
        yield stand_in
    finally:
        if created:
            del sys.modules[module]
        elif old is missing:
            delattr(mod, name)
        else:
            setattr(mod, name, old)


@dataclass
class Env:
    tmp: Path
    marker: Path
    stack: contextlib.ExitStack


@dataclass(frozen=True)
class Payload:
    name: str
    build: Callable[[Env], object]
    dangerous: str  # a global the reader must flag as dangerous ("a|b": either)
    call: str  # text that must appear in the rendered calls of the dangerous globals


def _os_system(env: Env):
    fake = env.stack.enter_context(named_global("os", "system"))
    return Reduce(fake, f"touch {env.marker}")


def _exec(env: Env):
    return Reduce(builtins.exec, f"open({str(env.marker)!r}, 'w').close()")


def _runpy(env: Env):
    script = env.tmp / "evil_script.py"
    script.write_text(f"open({str(env.marker)!r}, 'w').close()\n")
    return Reduce(runpy.run_path, str(script))


def _getattr_chain(env: Env):
    os_module = Reduce(builtins.__import__, "os")
    return Reduce(Reduce(builtins.getattr, os_module, "system"), f"touch {env.marker}")


def _methodcaller(env: Env):
    return Reduce(
        operator.methodcaller("system", f"touch {env.marker}"), Reduce(builtins.__import__, "os")
    )


def _nested_pickle(env: Env):
    inner = pickle.dumps(Reduce(posix.system, f"touch {env.marker}"), protocol=2)
    return Reduce(pickle.loads, inner)


def _torch_load(env: Env):
    inner = env.tmp / "inner_payload.pt"
    inner.write_bytes(pickle.dumps(Reduce(posix.system, f"touch {env.marker}"), protocol=2))
    return Reduce(functools.partial(torch.load, weights_only=False), str(inner))


PAYLOADS = [
    Payload("os.system", _os_system, "os.system", "os.system('touch "),
    Payload("posix.system", lambda e: Reduce(posix.system, f"touch {e.marker}"), "posix.system", "posix.system('touch "),
    Payload("exec", _exec, "builtins.exec", "builtins.exec(\"open("),
    Payload("Popen", lambda e: Reduce(subprocess.Popen, ["touch", str(e.marker)]), "subprocess.Popen", "subprocess.Popen(['touch', "),
    Payload("run_path", _runpy, "runpy.run_path", "runpy.run_path('"),
    Payload("import_module", lambda e: Reduce(importlib.import_module, CANARY), "importlib.import_module", f"importlib.import_module('{CANARY}')"),
    Payload("methodcaller", _methodcaller, "operator.methodcaller", "operator.methodcaller('system', 'touch "),
    Payload("partial", lambda e: Reduce(functools.partial(posix.system, f"touch {e.marker}")), "functools.partial", "('touch "),
    Payload("getattr", _getattr_chain, "builtins.getattr", "builtins.getattr(builtins.__import__('os'), 'system')('touch "),
    Payload("pickle.loads", _nested_pickle, "pickle.loads|_pickle.loads", "pickle.loads(b'\\x80\\x02"),
    Payload("torch.load", _torch_load, "torch.serialization.load", "(torch.serialization.load, (), {'weights_only': False}, None))('/"),
]  # fmt: skip
PAYLOAD_IDS = [p.name for p in PAYLOADS]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)
        self.helper = None  # the payload goes here in the full-module case


def training_checkpoint(extra: object) -> dict:
    sd = small_state_dict()
    return {
        "model": sd,
        "optimizer": {
            "state": {
                0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(4, 3, 3, 3), "extra": extra}
            },
            "param_groups": [{"lr": 0.1, "params": [0]}],
        },
        "epoch": 3,
    }


def _save_full_module(obj, path):
    net = Net()
    net.helper = obj
    torch.save(net, path)


# name -> write(payload, path); writing None gives the marker-free equivalent
FORMATS: dict[str, Callable[[object, Path], None]] = {
    "top": lambda obj, path: torch.save(obj, path),
    "deep_zip": lambda obj, path: torch.save(training_checkpoint(obj), path),
    "deep_legacy": lambda obj, path: torch.save(training_checkpoint(obj), path, _use_new_zipfile_serialization=False),
    "plain_pickle": lambda obj, path: path.write_bytes(pickle.dumps({"epoch": 3, "cfg": {"hooks": [obj]}})),
    # protocol 0 has no magic bytes: sniffed by parsing, or a payload would pass as "unknown format"
    "pickle_protocol0": lambda obj, path: path.write_bytes(pickle.dumps({"epoch": 3, "cfg": [obj]}, protocol=0)),
    "full_module": _save_full_module,
}  # fmt: skip
FORMAT_IDS = list(FORMATS)


@pytest.fixture
def make_payload_file(tmp_path):
    def make(payload: Payload, fmt: str) -> tuple[Path, Path]:
        marker = tmp_path / "MARKER"
        path = tmp_path / f"{fmt}.pt"
        with contextlib.ExitStack() as stack:
            obj = payload.build(Env(tmp_path, marker, stack))
            FORMATS[fmt](obj, path)
        assert not marker.exists()
        return path, marker

    return make


def torch_model_tensor_count(fmt: str, tmp_path: Path) -> int:
    """Save the marker-free equivalent and count the model's tensors as torch loads them."""
    clean = tmp_path / f"clean_{fmt}.pt"
    FORMATS[fmt](None, clean)
    if fmt == "full_module":
        return len(torch.load(clean, weights_only=False).state_dict())
    if fmt in ("top", "plain_pickle", "pickle_protocol0"):
        return 0
    return len(torch.load(clean, weights_only=True)["model"])


@pytest.fixture(scope="module", autouse=True)
def _readers_imported():
    """Import every reader module up front so the sys.modules check below sees only the file's doing
    (a zip sample too: its members' payload search and the compiled scan load their modules)."""
    samples = Path(__file__).resolve().parents[2] / "sample_models"
    open_checkpoint(samples / "legacy_cnn.pt")
    open_checkpoint(samples / "cnn_state_dict.pt")


def _check_opened(ckpt, payload: Payload, marker: Path) -> None:
    assert not marker.exists(), "payload ran"
    dangerous = {g.qualname: g for g in ckpt.dangerous_globals}
    assert set(payload.dangerous.split("|")) & set(dangerous), sorted(dangerous)
    calls = [c for g in ckpt.dangerous_globals for c in g.calls]
    assert any(payload.call in c for c in calls), calls


@pytest.mark.parametrize("fmt", FORMAT_IDS)
@pytest.mark.parametrize("payload", PAYLOADS, ids=PAYLOAD_IDS)
def test_payload_is_listed_not_run(make_payload_file, payload, fmt, tmp_path):
    path, marker = make_payload_file(payload, fmt)
    before = set(sys.modules)
    ckpt = open_checkpoint(path)
    assert set(sys.modules) - before == set()
    _check_opened(ckpt, payload, marker)
    assert len(ckpt.model_tensors) == torch_model_tensor_count(fmt, tmp_path)
    if fmt.startswith("deep"):
        assert ckpt.kind == "training_checkpoint" and ckpt.model_path == "model"
        assert {t.name for t in ckpt.model_tensors} == set(small_state_dict())
        assert ckpt.entries and any(e.path == "epoch" and e.value == 3 for e in ckpt.entries)
    if fmt == "full_module":
        assert ckpt.has_real_hierarchy and set(ckpt.tree.children) == {"conv", "bn", "head"}
    # the CLI, in-process (the subprocess case is below): exit 0, DANGEROUS, the call it would make
    assert not marker.exists()


@pytest.mark.parametrize("payload", PAYLOADS, ids=PAYLOAD_IDS)
def test_summary_flags_payload(make_payload_file, payload, capsys):
    path, marker = make_payload_file(payload, "deep_zip")
    assert cli_main(["summary", str(path)]) == 0
    out = capsys.readouterr().out
    assert cli_main(["summary", "--json", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    flagged = {
        f"{g['module']}.{g['name']}": g for g in doc["globals"] if g["safety"] == "dangerous"
    }
    assert set(payload.dangerous.split("|")) & set(flagged)
    (call, *_) = [c for g in flagged.values() for c in g["calls"] if payload.call in c]
    assert "DANGEROUS" in out and f"would call {call[:25]}" in out
    assert doc["totals"]["tensors"] == len(small_state_dict())
    assert not marker.exists()


@pytest.mark.parametrize("fmt", FORMAT_IDS)
def test_cli_subprocess_os_system(make_payload_file, fmt):
    path, marker = make_payload_file(PAYLOADS[0], fmt)
    result = run_cli("summary", path, columns=200)
    assert result.rc == 0, result.stderr
    assert "DANGEROUS" in result.stdout and "would call os.system(" in result.stdout
    assert "Traceback" not in result.output
    result = run_cli("summary", "--json", path)
    assert result.rc == 0, result.stderr
    doc = json.loads(result.stdout)
    (g,) = [g for g in doc["globals"] if (g["module"], g["name"]) == ("os", "system")]
    assert g["safety"] == "dangerous" and any("os.system('touch " in c for c in g["calls"])
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# Protocol 4 resolves dotted names attribute by attribute: ('pathlib', 'os.system') is os.system
# ----------------------------------------------------------------------------------------------
ATTRIBUTE_PATHS = [
    ("pathlib", "os.system"),
    ("torch", "serialization.os.system"),
    ("torch", "serialization.load"),
]


@contextlib.contextmanager
def attribute_path_global(module: str, path: str) -> Iterator[Callable]:
    """A stand-in that pickles (protocol 4) as `module` + dotted `path`."""
    *parents, name = path.split(".")
    owner = importlib.import_module(module)
    for part in parents:
        owner = getattr(owner, part)
    real = getattr(owner, name)

    def stand_in(*args):  # pragma: no cover
        raise AssertionError("stand-in called")

    stand_in.__module__, stand_in.__qualname__ = module, path
    setattr(owner, name, stand_in)
    try:
        yield stand_in
    finally:
        setattr(owner, name, real)


@pytest.mark.parametrize("container", ["zip", "pickle"])
@pytest.mark.parametrize(
    ("module", "path"), ATTRIBUTE_PATHS, ids=[f"{m}.{p}" for m, p in ATTRIBUTE_PATHS]
)
def test_attribute_path_payload_is_dangerous(tmp_path, module, path, container):
    marker = tmp_path / "MARKER"
    file = tmp_path / f"dotted.{container}"
    with attribute_path_global(module, path) as fake:
        obj = {"model": small_state_dict(), "hook": Reduce(fake, f"touch {marker}")}
        if container == "zip":
            torch.save(obj, file, pickle_protocol=4)
        else:
            file.write_bytes(pickle.dumps(obj["hook"], protocol=4))
    ckpt = open_checkpoint(file)
    (ref,) = [g for g in ckpt.globals if g.qualname == f"{module}.{path}"]
    assert ref.safety == "dangerous", ref
    assert ref.calls == [f"{module}.{path}('touch {marker}')"]
    assert not marker.exists()
    if (module, path, container) == ("pathlib", "os.system", "pickle"):  # live: pickle follows it
        code = f"import pickle; pickle.loads(open({str(file)!r}, 'rb').read())"
        subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
        assert marker.exists()


def test_dunder_attribute_path_is_dangerous(tmp_path):
    """('collections', 'OrderedDict.__init__.__globals__') walks into interpreter internals."""
    name = b"OrderedDict.__init__.__globals__"
    data = b"\x80\x04\x8c\x0bcollections\x8c" + bytes([len(name)]) + name + b"\x93."
    file = tmp_path / "dunder.pkl"
    file.write_bytes(data)
    (ref,) = open_checkpoint(file).globals
    assert ref.safety == "dangerous" and "internals" in ref.reason


# ----------------------------------------------------------------------------------------------
# The payloads are real: plain pickle runs them (proves the tests above test something)
# ----------------------------------------------------------------------------------------------
def write_canary(directory: Path, marker: Path) -> None:
    (directory / f"{CANARY}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n\ndef run(*args):\n    return None\n"
    )


# torch.load's payload is the posix.system one in a nested file (live above); skip the torch import
@pytest.mark.parametrize(
    "payload", [p for p in PAYLOADS if p.name != "torch.load"], ids=lambda p: p.name
)
def test_payload_is_live(make_payload_file, payload, tmp_path):
    path, marker = make_payload_file(payload, "plain_pickle")
    canary_dir = tmp_path / "canary"
    canary_dir.mkdir()
    write_canary(canary_dir, marker)
    code = textwrap.dedent(
        f"""
        import pickle, time
        try:
            pickle.loads(open({str(path)!r}, 'rb').read())
        except Exception:
            pass
        for _ in range(100):  # Popen returns before touch has run
            if __import__('os').path.exists({str(marker)!r}):
                break
            time.sleep(0.05)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(canary_dir)}
    subprocess.run(
        [sys.executable, "-c", code], env=env, timeout=60, capture_output=True, cwd=tmp_path
    )
    assert marker.exists(), f"{payload.name} is not a live payload"


# ----------------------------------------------------------------------------------------------
# Modules the file names are never imported
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def canary_payload(tmp_path):
    """A pickle calling `mscope_canary_mod.run()`; importing that module creates a marker."""
    marker = tmp_path / "CANARY_IMPORTED"
    path = tmp_path / "canary.pt"
    with named_global(CANARY, "run") as run:
        torch.save({"model": small_state_dict(), "hook": Reduce(run, "go")}, path)
        (tmp_path / "canary.pkl").write_bytes(pickle.dumps(Reduce(run, "go"), protocol=2))
    canary_dir = tmp_path / "canary"
    canary_dir.mkdir()
    write_canary(canary_dir, marker)
    return path, marker, canary_dir


def test_named_module_is_never_imported(canary_payload, monkeypatch):
    path, marker, canary_dir = canary_payload
    monkeypatch.syspath_prepend(str(canary_dir))
    assert CANARY not in sys.modules
    ckpt = open_checkpoint(path)
    assert not marker.exists() and CANARY not in sys.modules
    (ref,) = [g for g in ckpt.globals if g.module == CANARY]
    # an unknown function the pickle calls is dangerous (#12): not on a list, but called
    assert ref.safety == "dangerous" and ref.calls == [f"{CANARY}.run('go')"]
    assert len(ckpt.model_tensors) == len(small_state_dict())


def test_named_module_is_never_imported_fresh_process(canary_payload):
    path, marker, canary_dir = canary_payload
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(canary_dir)!r})
        import modelscope_tui
        ckpt = modelscope_tui.open_checkpoint({str(path)!r})
        assert {CANARY!r} not in sys.modules
        assert 'torch' not in sys.modules
        print(len(ckpt.model_tensors))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == len(small_state_dict())
    assert not marker.exists()
    # the same payload loaded by plain pickle imports it: the canary works
    plain = path.with_suffix(".pkl")
    probe = f"import sys, pickle; sys.path.insert(0, {str(canary_dir)!r}); pickle.loads(open({str(plain)!r}, 'rb').read())"
    subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60)
    assert marker.exists()


# ----------------------------------------------------------------------------------------------
# TorchScript: scripted __setstate__ runs on torch.jit.load; we never call it
# ----------------------------------------------------------------------------------------------
class Stateful(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2, 2))
        self.calls = 0

    def forward(self, x):
        return x @ self.weight

    @torch.jit.export
    def __getstate__(self):
        return (self.weight, self.calls, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, int, bool]):
        self.weight = state[0]
        self.calls = state[1] + 1
        self.training = state[2]


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Stateful()
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        return self.head(self.inner(x))


def test_torchscript_setstate_is_listed_not_run(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(Outer()), path)
    code = textwrap.dedent(
        f"""
        import json, sys
        from modelscope_tui.readers import open_checkpoint
        ckpt = open_checkpoint({str(path)!r})
        assert 'torch' not in sys.modules
        print(json.dumps([[g.qualname, g.safety, g.reason] for g in ckpt.globals]))
        print(json.dumps(sorted(t.name for t in ckpt.tensors)))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    globals_, names = map(json.loads, out.stdout.splitlines())
    flagged = [g for g in globals_ if g[0].endswith(".Stateful")]
    assert flagged and flagged[0][1] == "unsafe" and "__setstate__" in flagged[0][2]
    # its tensors are in the getstate tuple, unnamed: listed by position, none lost
    assert names == ["head.bias", "head.weight", "inner.__getstate__[0]"]
    assert len(names) == len(torch.jit.load(path).state_dict())
    result = run_cli("summary", path)
    assert result.rc == 0 and "Stateful" in result.stdout, result.output
