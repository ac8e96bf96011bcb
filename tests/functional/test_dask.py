"""`--dask`: audit --stats and diff on a real cluster (a `dask scheduler` and two `dask worker`
processes started here) give the local run's output, field by field and line by line.

The generated sets make the split do everything it can: a tensor cut into several tasks
(MSCOPE_DASK_TASK_MB=1 and small chunks), two shards, fp16 / bf16 (the compiled kernel),
float64 and int (numpy), NaN / Inf, a strided torch view (slabs), a tensor in every status of
the diff. Only timings differ between runs: "seconds" in JSON, "in N s" in text.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SAMPLES, run_cli

dask_bin = Path(sys.executable).with_name("dask")
pytest.importorskip("distributed")
SRC = Path(__file__).resolve().parents[2] / "src"
TASK_MB = "1"  # bytes per task: the big tensors below are cut into several tasks
CHUNK_MB = "0.25"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{path}" if path else str(SRC)}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The address of a scheduler with two single-thread workers; every process is stopped at
    the end (their own process groups, so nothing outlives the test)."""
    from distributed import Client

    logs = tmp_path_factory.mktemp("dask-logs")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = [str(dask_bin)] if dask_bin.exists() else [sys.executable, "-m", "dask"]
    procs = []

    def start(name: str, *argv: str) -> None:
        log = open(logs / f"{name}.log", "wb")
        procs.append(
            subprocess.Popen(
                [*dask, *argv], stdout=log, stderr=subprocess.STDOUT, env=_env(),
                start_new_session=True, cwd=logs,
            )
        )  # fmt: skip

    try:
        start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard")
        for i in range(2):
            start(f"worker{i}", "worker", address, "--nthreads", "1", "--no-dashboard",
                  "--name", f"w{i}", "--local-directory", str(logs / f"w{i}"))  # fmt: skip
        with Client(address, timeout=30, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for p in procs[::-1]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs[::-1]:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _values(n: int, seed: float):
    import torch

    return torch.sin(torch.arange(n, dtype=torch.float64) * 0.37 + seed) * (1 + seed)


def _state_dict(after: bool) -> dict:
    """About 8 MB: one float32 tensor of 6 MB (24 chunks of 0.25 MB, several 1 MB tasks)."""
    import torch

    sd = {
        "big.weight": _values(1536 * 1024, 0.1).float().reshape(1536, 1024),
        "half.weight": _values(300 * 1024, 0.2).half().reshape(300, 1024),
        "brain.weight": _values(200 * 1024, 0.3).bfloat16().reshape(200, 1024),
        "double.weight": _values(40 * 1024, 0.4).reshape(40, 1024),
        "ids": torch.arange(5000, dtype=torch.int64) % 97,
        "flags": torch.arange(300) % 3 == 0,
        "bad": torch.tensor([1.0, float("nan"), float("inf"), -2.0] * 64),
        "zero.bias": torch.zeros(64),
        "norm.weight": torch.ones(64),
    }
    for i in range(12):
        sd[f"layers.{i}.weight"] = _values(96 * 64, 1 + i).float().reshape(96, 64)
    sd["copy.weight"] = sd["layers.1.weight"].clone()  # a duplicate (hashed on the cluster)
    if after:
        sd["big.weight"] = sd["big.weight"] + 1e-3 * _values(1536 * 1024, 9).float().reshape(1536, 1024)
        sd["layers.3.weight"] = sd["layers.3.weight"] * (1 + 1e-7)  # close
        sd["half.weight"] = sd["half.weight"].float()  # dtype changed
        sd["renamed.weight"] = sd.pop("layers.11.weight")
        del sd["layers.10.weight"]
        sd["extra.weight"] = torch.ones(8, 8)
    return sd


def _write_shards(directory: Path, sd: dict) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    names = list(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: sd[k].contiguous() for k in keys}, directory / file)
        weight_map.update({k: file for k in keys})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return directory


def _write_pt(path: Path, sd: dict) -> Path:
    """A torch zip whose big tensor is a strided view (every other column of a wider storage):
    its chunks are slabs, not byte ranges."""
    import torch

    sd = dict(sd)
    wide = torch.cat([sd["big.weight"], -sd["big.weight"]], dim=1)  # 1536 x 2048
    sd["big.weight"] = wide[:, ::2]
    sd["big.t"] = sd["layers.0.weight"].t()
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from diffpair import write_pair

    root = tmp_path_factory.mktemp("dask-files")
    before, after = _state_dict(False), _state_dict(True)
    pair = write_pair(root / "pair")
    return {
        "shards_a": _write_shards(root / "a", before),
        "shards_b": _write_shards(root / "b", after),
        "pt_a": _write_pt(root / "a.pt", before),
        "pt_b": _write_pt(root / "b.pt", after),
        "pair_a": pair[0],
        "pair_b": pair[1],
    }


def _without_seconds(doc):
    if isinstance(doc, dict):
        return {k: _without_seconds(v) for k, v in doc.items() if k != "seconds"}
    if isinstance(doc, list):
        return [_without_seconds(v) for v in doc]
    return doc


def _assert_same_json(local: str, remote: str) -> None:
    a, b = _without_seconds(json.loads(local)), _without_seconds(json.loads(remote))
    assert a.keys() == b.keys()
    for key in a:  # field by field: a failure names the field
        if isinstance(a[key], list) and isinstance(b[key], list) and len(a[key]) == len(b[key]):
            for i, (x, y) in enumerate(zip(a[key], b[key])):
                assert x == y, f"{key}[{i}]"
        assert a[key] == b[key], key


def _mask_time(text: str) -> str:
    return re.sub(r"in [0-9.]+ s\b", "in T s", text)


def _dask_env(address: str) -> dict:
    return {"MSCOPE_DASK_TASK_MB": TASK_MB, "MSCOPE_DASK": address}


def _run(*args, env: dict | None = None):
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        return run_cli(*args, timeout=90)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.parametrize("which", ["sharded_hf", "shards_a", "pt_b"])
def test_audit_stats_on_the_cluster_equals_local(cluster, files, which):
    path = SAMPLES / "sharded_hf" if which == "sharded_hf" else files[which]
    # Two local threads, as the cluster has: the report's "threads" matches too.
    common = ["audit", path, "--stats", "--chunk-mb", CHUNK_MB, "--fail-on", "none"]
    for fmt in (["--json"], ["--all-stats"]):
        local = _run(*common, *fmt, "--threads", "2")
        remote = _run(*common, *fmt, "--dask", cluster, env={"MSCOPE_DASK_TASK_MB": TASK_MB})
        assert local.rc == remote.rc == 0, remote.stderr
        assert remote.stderr == ""
        if fmt == ["--json"]:
            _assert_same_json(local.stdout, remote.stdout)
            doc = json.loads(remote.stdout)
            assert doc["stats"]["tensors"]  # something was computed
            if which != "sharded_hf":
                assert sorted(doc["waste"]["duplicates"][0]["tensors"]) == ["copy.weight", "layers.1.weight"]
        else:
            assert _mask_time(remote.stdout) == _mask_time(local.stdout)


def test_the_big_tensors_are_split_inside(files):
    """The plans the tests above run: a tensor in several tasks, slabs too (metadata only)."""
    from modelscope_tui.readers import open_checkpoint
    from modelscope_tui.values.chunks import chunk_count
    from modelscope_tui.values.cluster import plan_jobs

    chunk = int(float(CHUNK_MB) * (1 << 20))
    for key in ("shards_a", "pt_b"):
        ckpt = open_checkpoint(files[key])
        items = [(chunk_count(t, chunk), chunk, t.storage.file, t.nbytes) for t in ckpt.tensors]
        jobs = plan_jobs(items, 1 << 20)
        big = next(i for i, t in enumerate(ckpt.tensors) if t.name == "big.weight")
        ranges = [(f, s) for job in jobs for i, f, s in job.pieces if i == big]
        assert items[big][0] == 24 and len(ranges) >= 6  # 1 MB tasks of 0.25 MB chunks
        assert ranges[0][0] == 0 and ranges[-1][1] == 24
        assert all(s == f2 for (_, s), (f2, _) in zip(ranges, ranges[1:]))
        assert len({t.storage.file for t in ckpt.tensors}) == (2 if key == "shards_a" else 1)
        if key == "pt_b":
            assert not ckpt.tensors[big].is_contiguous  # the strided (slabs) path


@pytest.mark.parametrize("pair", ["shards", "pt", "pair"])
def test_diff_on_the_cluster_equals_local(cluster, files, pair):
    a, b = files[f"{pair}_a"], files[f"{pair}_b"]
    for fmt in ("--json", "--text"):
        local = _run("diff", a, b, fmt)
        remote = _run("diff", a, b, fmt, env=_dask_env(cluster))  # the address from MSCOPE_DASK
        assert local.rc == remote.rc, remote.stderr
        assert remote.stderr == ""
        if fmt == "--json":
            _assert_same_json(local.stdout, remote.stdout)
            statuses = {t["status"] for t in json.loads(remote.stdout)["tensors"]}
            assert {"identical", "changed", "renamed"} <= statuses  # renames hashed on the cluster
        else:
            assert _mask_time(remote.stdout) == _mask_time(local.stdout)


def test_without_dask_nothing_imports_it(files):
    code = (
        "import sys\n"
        "from modelscope_tui.cli import main\n"
        f"main(['audit', {str(files['shards_a'])!r}, '--stats', '--json'])\n"
        f"main(['diff', {str(files['pair_a'])!r}, {str(files['pair_b'])!r}, '--json'])\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed'))\n"
        "print('LOADED', loaded, file=sys.stderr)\n"
    )
    env = {k: v for k, v in _env().items() if k != "MSCOPE_DASK"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert "LOADED []" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "address, says",
    [
        ("tcp://127.0.0.1:{port}", "cannot reach the Dask scheduler"),
        ("not an address::", "cannot reach the Dask scheduler"),
        ("", "needs a scheduler address"),
    ],
)
def test_a_bad_address_is_one_line(files, address, says):
    address = address.format(port=_free_port())
    for args in (
        ["audit", files["pair_a"], "--stats", "--dask", address],
        ["diff", files["pair_a"], files["pair_b"], "--json", "--dask", address],
    ):
        r = _run(*args, env={"MSCOPE_DASK_TIMEOUT": "1"})
        assert r.rc == 2, r.output
        assert r.stdout == ""
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and says in lines[0], r.stderr


def test_dask_without_stats_is_refused(files):
    r = _run("audit", files["pair_a"], "--dask", "tcp://127.0.0.1:1")
    assert r.rc == 2 and r.stderr.splitlines() == [
        "mscope: error: --dask needs --stats (the statistics are what a cluster reads)"
    ]


def test_a_file_that_changed_under_the_workers_fails_in_one_line(cluster, tmp_path):
    """Workers open the file themselves: when it is not what the client opened (rewritten in
    between, or another file at that path on their machines), the run stops with one line."""
    from modelscope_tui.audit.runner import run_audit
    from modelscope_tui.errors import MscopeError
    from modelscope_tui.readers import open_checkpoint

    path = tmp_path / "m.safetensors"
    from safetensors.torch import save_file

    sd = _state_dict(False)
    save_file({k: v for k, v in list(sd.items())[3:]}, path)
    ckpt = open_checkpoint(path, strict=False)
    time.sleep(0.01)
    save_file({k: v for k, v in list(sd.items())[4:]}, path)
    with pytest.raises(MscopeError) as err:
        run_audit(ckpt, stats=True, dask=cluster)
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith("on a Dask worker: ") and "is not the checkpoint the client opened" in line


def test_progress_comes_back_from_the_cluster(cluster, files):
    """The callback the CLI's progress bar reads gets the workers' completed bytes, up to all."""
    from modelscope_tui.audit.runner import run_audit
    from modelscope_tui.diff.stream import diff_checkpoints
    from modelscope_tui.readers import open_checkpoint

    os.environ["MSCOPE_DASK_TASK_MB"] = TASK_MB
    try:
        seen = []
        a = open_checkpoint(files["shards_a"], strict=False)
        report = run_audit(a, stats=True, dask=cluster, progress=seen.append, chunk_bytes=1 << 18)
        total = sum(t.nbytes for t in a.tensors)
        assert report.stats and seen[-1].done == seen[-1].total == total
        assert any(0 < p.done < total for p in seen)  # in steps, as tasks complete
        seen.clear()
        b = open_checkpoint(files["shards_b"], strict=False)
        diff = diff_checkpoints(a, b, progress=seen.append, dask=cluster)
        assert seen[-1].done == seen[-1].total == diff.bytes_read > 0
    finally:
        os.environ.pop("MSCOPE_DASK_TASK_MB", None)
