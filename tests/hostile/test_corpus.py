"""Every file of the hostile corpus, through `mscope summary`, `mscope audit` and the explorer.

For each case: no marker file (nothing ran), exit code 2 with one line or a clean open that lists
the danger with the call it would have made, no traceback, a few seconds at most, and memory far
below what the file declares. The CLI runs in subprocesses under `ulimit -v` (several at a time, so
the corpus costs seconds); the explorer runs in-process with Textual's Pilot.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from hostile.generate import OPEN, REFUSE, SPECS, Case, generate

NAMES = list(SPECS)
COMMANDS = ("summary", "audit")
SECONDS = 10  # per command, on a loaded 2-core CI machine; most take 0.2-0.5 s
ADDRESS_SPACE = 2 << 30  # ulimit -v: an allocation the file asks for fails loudly
MAX_RSS = 300 << 20  # peak resident memory of one command (files declare up to 100 GB)


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    max_rss: int  # bytes

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


# `python -m modelscope_tui ARGS`, and at exit the process's own peak RSS (VmHWM) written to the
# file named by $MSCOPE_TEST_HWM. Not ru_maxrss from wait4: Linux carries the forking parent's peak
# (this pytest process, with torch loaded) across exec into the child's.
_WRAPPER = """
import atexit, os, runpy, sys
def report():
    with open("/proc/self/status") as fh:
        hwm = next(line.split()[1] for line in fh if line.startswith("VmHWM:"))
    with open(os.environ["MSCOPE_TEST_HWM"], "w") as fh:
        fh.write(hwm)
atexit.register(report)
sys.argv[0] = "mscope"
runpy.run_module("modelscope_tui", run_name="__main__", alter_sys=True)
"""


def measured_cli(*args: str | os.PathLike, timeout: float = 60, memory: int = ADDRESS_SPACE) -> Run:
    """`mscope ARGS` in a subprocess under `ulimit -v`, with its wall time and peak RSS."""
    env = {**os.environ, "COLUMNS": "250", "TERM": "dumb", "NO_COLOR": "1"}
    env.pop("PYTHONSTARTUP", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    argv = [
        "/bin/sh", "-c", f'ulimit -v {memory // 1024} && exec "$0" "$@"',
        sys.executable, "-c", _WRAPPER, *map(str, args),
    ]  # fmt: skip
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile() as hwm,
    ):
        env["MSCOPE_TEST_HWM"] = hwm.name
        start = time.monotonic()
        proc = subprocess.run(
            argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, timeout=timeout
        )
        seconds = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        peak = Path(hwm.name).read_text().strip()
        return Run(
            proc.returncode,
            out.read().decode("utf-8", "replace"),
            err.read().decode("utf-8", "replace"),
            seconds,
            int(peak) * 1024 if peak else -1,
        )


def audit_available() -> bool:
    try:
        result = subprocess.run(
            [sys.executable, "-m", "modelscope_tui", "audit", "--help"],
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Case]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate members we write
        cases = generate(tmp_path_factory.mktemp("hostile"))
    return {c.name: c for c in cases}


@pytest.fixture(scope="module")
def runs(corpus) -> Iterator[dict[tuple[str, str], Future[Run]]]:
    """Every case through every command, started at once in the background: the explorer tests
    (which come first and use one core) run while the subprocesses use the other."""
    commands = ["summary"] + (["audit"] if audit_available() else [])
    jobs = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for case in corpus.values():
            jobs[(case.name, "summary")] = pool.submit(measured_cli, "summary", case.path)
            if "audit" in commands:
                jobs[(case.name, "audit")] = pool.submit(measured_cli, "audit", "--json", case.path)
        yield jobs


def test_corpus_is_big_enough(corpus):
    assert len(corpus) >= 40
    assert sum(bool(c.danger) for c in corpus.values()) >= 20  # code-execution payloads
    kinds = {name.split("-")[0] for name in corpus}
    assert {"payload", "zip", "pickle", "safetensors", "sharded", "dcp", "legacy"} <= kinds


def render_text(renderable) -> str:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=300, color_system=None, highlight=False)
    console.print(renderable)
    return console.file.getvalue()


def assert_no_marker(case: Case) -> None:
    assert not case.marker.exists(), f"{case.name}: the payload ran"
    assert not any(case.marker.parent.iterdir()), list(case.marker.parent.iterdir())


def assert_one_line_error(run: Run, case: Case) -> str:
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("mscope: error:"), lines[0]
    assert case.says in lines[0], lines[0]
    return lines[0]


def assert_bounded(run: Run, case: Case, command: str) -> None:
    assert run.seconds < SECONDS, f"{command} took {run.seconds:.1f} s"
    assert 0 < run.max_rss < MAX_RSS, f"{command} peaked at {run.max_rss >> 20} MB"


@pytest.mark.parametrize("name", NAMES)
async def test_explorer(corpus, runs, name):
    """The explorer opens the case with the danger notified, or exits 2 with one line."""
    from modelscope_tui.tui.app import MscopeApp
    from modelscope_tui.tui.widgets.details import file_details

    case = corpus[name]
    app = MscopeApp(case.path, show_gpus=False)
    start = time.monotonic()
    async with app.run_test(size=(80, 24)) as pilot:
        while app.session is None and app.return_code is None:
            assert time.monotonic() - start < SECONDS, "the explorer hangs"
            await pilot.pause(0.01)
        opened = app.session is not None
        if opened:
            await pilot.pause()  # one full paint of the tree and the details pane
            notes = [n.message for n in app._notifications]
            assert not any(m.startswith("internal error") for m in notes), notes
            details = render_text(file_details(app.session))  # all of it, not just what fits
            tree = app.tree
            for line in tree._tree_lines:  # every visible row's label
                tree.render_label(line.path[-1], tree.rich_style, tree.rich_style)
            if case.danger:
                assert any("dangerous global" in m for m in notes), notes
                qualnames = {g.qualname for g in app.session.ckpt.dangerous_globals}
                assert qualnames & set(case.danger), qualnames
                calls = [line for line in details.splitlines() if "would call " in line]
                assert not case.call or any(case.call in c for c in calls), details[-3000:]
    assert time.monotonic() - start < SECONDS
    assert_no_marker(case)
    if opened:
        assert case.expect != REFUSE
        assert app.error_line is None
    else:
        assert case.expect != OPEN, app.error_line
        assert app.return_code == 2, (app.return_code, app.error_line)
        assert app.error_line and "\n" not in app.error_line and case.says in app.error_line


@pytest.mark.parametrize("name", NAMES)
def test_summary(corpus, runs, name):
    case = corpus[name]
    run = runs[(name, "summary")].result()
    assert_no_marker(case)
    assert "Traceback" not in run.output, run.output[-2000:]
    assert run.rc in (0, 2), run.output[-2000:]
    assert_bounded(run, case, "summary")
    if case.expect == OPEN:
        assert run.rc == 0, run.stderr
    elif case.expect == REFUSE:
        assert run.rc == 2, run.stdout[-2000:]
    if run.rc == 2:
        assert run.stdout == ""
        assert_one_line_error(run, case)
        return
    assert run.stderr == "", run.stderr
    if case.danger:
        assert "DANGEROUS" in run.stdout
        flagged = [d for d in case.danger if d in run.stdout]
        assert flagged, f"none of {case.danger} flagged"
        calls = [line.strip() for line in run.stdout.splitlines() if "would call " in line]
        assert not case.call or any(case.call in c for c in calls), calls


@pytest.mark.parametrize("name", NAMES)
def test_audit(corpus, runs, name):
    if (name, "audit") not in runs:
        pytest.skip("`mscope audit` is not available")
    case = corpus[name]
    run = runs[(name, "audit")].result()
    assert_no_marker(case)
    assert "Traceback" not in run.output, run.output[-2000:]
    assert run.rc in (0, 1, 2), run.output[-2000:]
    assert_bounded(run, case, "audit")
    if run.rc == 2:  # not a checkpoint at all
        assert run.stdout == ""
        assert case.expect != OPEN
        assert_one_line_error(run, case)
        return
    doc = json.loads(run.stdout)
    findings = doc["findings"]
    unreadable = [f for f in findings if f["code"] == "unreadable-file"]
    if case.expect == OPEN:
        assert not unreadable, unreadable
    if unreadable:
        assert all("\n" not in f["message"] for f in unreadable)
        assert case.says in unreadable[0]["message"] or case.says in doc.get("file", "")
        assert run.rc == 1
    elif case.danger:
        dangerous = [f for f in findings if f["code"] == "dangerous-global"]
        names = {f"{f['details']['module']}.{f['details']['name']}" for f in dangerous}
        assert names & set(case.danger), names
        calls = [c for f in dangerous for c in f["details"]["calls"]]
        assert not case.call or any(case.call in c for c in calls), calls
        assert run.rc == 1  # dangerous is in the default --fail-on
