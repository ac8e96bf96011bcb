"""Checkpoints over HTTP(S) range requests, against a real server started here (tests/rangeserver):
the same answers as the local files, within the fetch budget, values included."""

from __future__ import annotations

import json
import struct
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from rangeserver import RangeServer  # noqa: E402
from remotehelp import run_main, same_json  # noqa: E402

SAMPLES = TESTS.parent / "sample_models"
FILES = sorted(
    p.name for p in SAMPLES.iterdir() if p.is_file() and p.suffix in (".pt", ".ckpt", ".safetensors")
)
INDEXES = ["sharded_hf/model.safetensors.index.json", "sharded_bin/pytorch_model.bin.index.json"]
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("MSCOPE_TIMEOUT", "5")


@pytest.fixture(scope="module")
def server():
    srv = RangeServer(SAMPLES)
    yield srv
    srv.close()


def metadata_bytes(path: Path) -> int:
    """What the issue calls metadata: the safetensors length + header; a zip's central directory
    and data.pkl; a whole small pickle; an index and its shards' metadata."""
    head = path.read_bytes()[:16]
    if path.name.endswith(".json"):
        doc = json.loads(path.read_text())
        shards = set(doc["weight_map"].values())
        return path.stat().st_size + sum(metadata_bytes(path.parent / s) for s in shards)
    if head[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            directory = sum(46 + len(i.filename.encode()) + len(i.extra) + len(i.comment) for i in infos)
            pkl = sum(i.file_size for i in infos if i.filename.endswith("data.pkl"))
        return directory + pkl
    if head[8:9] == b"{":
        return 8 + struct.unpack("<Q", head[:8])[0]
    return path.stat().st_size


def within_budget(srv: RangeServer, meta: int) -> None:
    assert srv.requests <= 8, srv.log
    assert srv.bytes <= 1.25 * meta + 2 * MiB, (srv.bytes, meta)


@pytest.mark.parametrize("name", FILES + INDEXES)
def test_summary_over_http_equals_local(server, name):
    code, local, err = run_main("summary", "--json", SAMPLES / name)
    assert code == 0, err
    server.reset()
    code, remote, err = run_main("summary", "--json", f"{server.url}/{name}")
    assert code == 0, err
    same_json(local, remote)
    assert json.loads(remote)["file"] == f"{server.url}/{name}"  # the URL, '//' intact
    within_budget(server, metadata_bytes(SAMPLES / name))


@pytest.mark.parametrize("name", ["llama_tiny.safetensors", "transformer_tied.pt", "legacy_cnn.pt", INDEXES[0], INDEXES[1]])
def test_audit_stats_over_http_equals_local(server, name):
    code, local, _ = run_main("audit", "--stats", "--json", SAMPLES / name)
    rcode, remote, err = run_main("audit", "--stats", "--json", f"{server.url}/{name}")
    assert rcode == code, err
    same_json(local, remote)


def test_diff_over_http_equals_local(server):
    a, b = "transformer_tied.pt", "transformer.safetensors"
    code, local, _ = run_main("diff", "--json", SAMPLES / a, SAMPLES / b)
    rcode, remote, err = run_main("diff", "--json", f"{server.url}/{a}", f"{server.url}/{b}")
    assert rcode == code, err
    same_json(local, remote)


def test_values_read_only_their_ranges(server, tmp_path):
    """audit --stats of one file fetches each storage once: bytes fetched stay near the file's size."""
    name = "transformer_tied.pt"
    server.reset()
    code, _, err = run_main("audit", "--stats", "--json", f"{server.url}/{name}")
    assert code == 0, err
    assert server.bytes <= (SAMPLES / name).stat().st_size + 256 * 1024


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """Files whose metadata is large and whose data is larger: a safetensors header of 3,000
    tensors before 16 MiB of data, and a torch zip of 3,000 storages."""
    root = tmp_path_factory.mktemp("big")
    tensors = {f"layers.{i}.weight": torch.full((4, 4), float(i)) for i in range(3000)}
    tensors["embed.weight"] = torch.zeros(4 * MiB // 4)  # 16 MiB
    save_file(tensors, str(root / "big.safetensors"))
    torch.save(tensors, root / "big.pt")
    srv = RangeServer(root)
    yield root, srv
    srv.close()


@pytest.mark.parametrize("name", ["big.safetensors", "big.pt"])
def test_fetch_budget_on_large_metadata(big, name):
    root, srv = big
    srv.reset()
    code, remote, err = run_main("summary", "--json", f"{srv.url}/{name}")
    assert code == 0, err
    assert json.loads(remote)["totals"]["tensors"] == 3001
    meta = metadata_bytes(root / name)
    within_budget(srv, meta)
    assert srv.bytes < (root / name).stat().st_size / 4  # the tensor data was not fetched
    code, local, _ = run_main("summary", "--json", root / name)
    same_json(local, remote)


def test_predicted_zip_offsets_are_checked_where_values_are_read(big):
    """A torch zip's member offsets come from its directory (no request per local header); the
    statistics still match the local file, value for value."""
    root, srv = big
    code, local, _ = run_main("audit", "--stats", "--json", root / "big.pt")
    rcode, remote, err = run_main("audit", "--stats", "--json", f"{srv.url}/big.pt")
    assert (rcode, err) == (code, "")
    same_json(local, remote)


def test_missing_file_is_one_line_with_the_url_intact(server):
    code, out, err = run_main("summary", f"{server.url}/nope.pt")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"mscope: error: {server.url}/nope.pt: no such file on the server (HTTP 404)"]


def test_url_secrets_are_not_printed(server):
    url = server.url.replace("http://", "http://user:hunter2@") + "/nope.pt?token=hunter2"
    code, _, err = run_main("summary", url)
    assert code == 2 and "hunter2" not in err and "nope.pt" in err


DCP = "dcp_checkpoint/.metadata"


@pytest.mark.parametrize("command", [["summary", "--json"], ["audit", "--stats", "--json"]])
def test_dcp_over_http_equals_local(server, command):
    code, local, _ = run_main(*command, SAMPLES / "dcp_checkpoint")
    rcode, remote, err = run_main(*command, f"{server.url}/{DCP}")
    assert rcode == code, err
    same_json(local, remote)


def test_dcp_diff_over_http_equals_local(server):
    local_args = [SAMPLES / "dcp_checkpoint", SAMPLES / "transformer_tied.pt"]
    code, local, _ = run_main("diff", "--json", *local_args)
    urls = [f"{server.url}/{DCP}", f"{server.url}/transformer_tied.pt"]
    rcode, remote, err = run_main("diff", "--json", *urls)
    assert rcode == code, err
    same_json(local, remote)


@pytest.fixture(scope="module")
def big_dcp(tmp_path_factory) -> Path:
    """8 tensors of 1 MiB in 4 .distcp files (FileSystemWriter's thread_count), plus a value."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    folder = tmp_path_factory.mktemp("bigdcp") / "ckpt"
    state = {f"layers.{i}.weight": torch.randn(512, 512) for i in range(8)}
    state["step"] = 7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=FileSystemWriter(folder, thread_count=4))
    return folder


def test_dcp_fetch_budget_reads_the_distcp_files_concurrently(big_dcp):
    """The DCP budget: requests grow with the files and items, not the bytes: `.metadata` (1),
    one first range per .distcp file, and each item's head and tail (merged when neighbours);
    bytes: `.metadata`, the 64 KiB first range per file, 2 x 4 KiB per item. No tensor data
    beyond those read-aheads, and the files are read at once."""
    files = sorted(big_dcp.glob("*.distcp"))
    items = 9
    srv = RangeServer(big_dcp.parent)
    srv.latency = 0.05
    try:
        code, local, _ = run_main("summary", "--json", big_dcp)
        rcode, remote, err = run_main("summary", "--json", f"{srv.url}/ckpt/.metadata")
    finally:
        srv.close()
    assert rcode == code == 0, err
    same_json(local, remote)
    assert srv.requests <= 1 + len(files) + 2 * items, srv.log
    meta = (big_dcp / ".metadata").stat().st_size
    assert srv.bytes <= meta + len(files) * 64 * 1024 + items * 8 * 1024, srv.log
    assert srv.bytes < sum(f.stat().st_size for f in files) / 20
    assert srv.max_in_flight >= 2


def test_dcp_item_outside_the_folder_is_refused(tmp_path, big_dcp):
    """`.metadata` names the .distcp files; one outside the folder is one line, nothing fetched there."""
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(big_dcp, folder)
    meta = (folder / ".metadata").read_bytes()
    name = b"__0_1.distcp"
    assert meta.count(name) >= 1
    (folder / ".metadata").write_bytes(meta.replace(name, b"../_1.distcp"))  # same length
    srv = RangeServer(tmp_path)
    try:
        code, _, err = run_main("summary", f"{srv.url}/ckpt/.metadata")
        assert not any("_1.distcp" in path for path, _ in srv.log)
    finally:
        srv.close()
    assert code == 2 and "'..'" in err and len(err.strip().splitlines()) == 1, err


def test_shard_headers_are_fetched_concurrently(tmp_path):
    """With 50 ms a request, the server sees several shard requests in flight at once."""
    weight_map = {}
    for i in range(8):
        name = f"model-{i:05d}-of-00008.safetensors"
        save_file({f"layers.{i}.weight": torch.ones(2, 2) * i}, str(tmp_path / name))
        weight_map[f"layers.{i}.weight"] = name
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    srv = RangeServer(tmp_path)
    srv.latency = 0.05
    try:
        code, out, err = run_main("summary", "--json", f"{srv.url}/model.safetensors.index.json")
    finally:
        srv.close()
    assert code == 0, err
    assert json.loads(out)["totals"]["tensors"] == 8
    assert srv.requests == 10  # the index, 8 shards, config.json (404 here)
    assert srv.max_in_flight >= 2


def test_second_open_comes_from_the_cache(tmp_path):
    """The second summary makes one HEAD (the ETag check) per file and no range request; a new
    version of the file is fetched again; --no-cache fetches every time."""
    import shutil

    shutil.copy(SAMPLES / "transformer_tied.pt", tmp_path / "m.pt")
    srv = RangeServer(tmp_path)
    try:
        url = f"{srv.url}/m.pt"
        first = run_main("summary", "--json", url)
        assert first[0] == 0 and srv.requests >= 2
        srv.reset()
        second = run_main("summary", "--json", url)
        assert second == first
        assert srv.requests == 1 and srv.bytes == 0 and srv.log[0][1] == ""  # HEAD, no Range
        srv.reset()
        run_main("summary", "--no-cache", url)
        assert srv.requests >= 2 and srv.bytes > 0
        torch.save({"w": torch.ones(3)}, tmp_path / "m.pt")  # a new version: new ETag
        srv.reset()
        code, out, _ = run_main("summary", "--json", url)
        assert code == 0 and json.loads(out)["totals"]["tensors"] == 1 and srv.bytes > 0
    finally:
        srv.close()


def test_offline_open_uses_the_cache_and_says_so(tmp_path):
    import shutil

    shutil.copy(SAMPLES / "llama_tiny.safetensors", tmp_path / "m.safetensors")
    srv = RangeServer(tmp_path)
    url = f"{srv.url}/m.safetensors"
    code, _, err = run_main("summary", url)
    srv.close()  # the server is gone: connections are refused
    assert code == 0, err
    code, out, err = run_main("summary", "--json", url)
    assert code == 0, err
    warnings = json.loads(out)["warnings"]
    assert any(w.startswith("offline: metadata from the cache") for w in warnings)


def test_values_are_fetched_several_at_a_time(tmp_path):
    """audit --stats plans its reads: with 20 ms a request the server sees several value ranges
    in flight at once, and the numbers stay the local ones."""
    torch.save({f"w{i}": torch.randn(64, 64) for i in range(40)}, tmp_path / "m.pt")
    srv = RangeServer(tmp_path)
    try:
        run_main("summary", f"{srv.url}/m.pt")
        srv.reset()
        srv.latency = 0.02
        rcode, remote, err = run_main("audit", "--stats", "--json", f"{srv.url}/m.pt")
    finally:
        srv.close()
    code, local, _ = run_main("audit", "--stats", "--json", tmp_path / "m.pt")
    assert (rcode, err) == (code, "")
    same_json(local, remote)
    assert srv.max_in_flight >= 4


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_large_remote_tensors_stream_by_chunk(tmp_path, monkeypatch, fmt):
    """A storage over STREAM_BYTES is fetched a chunk at a time (no request spans the whole
    tensor), and audit --stats and diff still give the local numbers."""
    import modelscope_tui.values.data as values_data

    monkeypatch.setattr(values_data, "STREAM_BYTES", 64 * 1024)
    tensors = {"big": torch.randn(512, 512), "small": torch.randn(8), "half": torch.randn(256, 256).half()}
    if fmt == "pt":
        torch.save(tensors, tmp_path / "a.pt")
        torch.save({k: v + 1 for k, v in tensors.items()}, tmp_path / "b.pt")
    else:
        save_file(tensors, str(tmp_path / "a.safetensors"))
        save_file({k: v + 1 for k, v in tensors.items()}, str(tmp_path / "b.safetensors"))
    a, b = f"a.{fmt}", f"b.{fmt}"
    srv = RangeServer(tmp_path)
    try:
        for args in (["audit", "--stats", "--json", "--chunk-mb", "0.125"], ["diff", "--json"]):
            files = [a] if args[0] == "audit" else [a, b]
            code, local, _ = run_main(*args, *(tmp_path / f for f in files))
            srv.reset()
            rcode, remote, err = run_main(*args, *(f"{srv.url}/{f}" for f in files))
            assert (rcode, err) == (code, "")
            same_json(local, remote)
            if args[0] == "audit":  # pieces of --chunk-mb (diff reads by its own chunk size)
                spans = [int(r.split("-")[1]) - int(r.split("=")[1].split("-")[0]) + 1 for _, r in srv.log if r]
                assert spans and max(spans) < 512 * 512 * 4
    finally:
        srv.close()


def test_estimate_and_plan_take_a_url(server, tmp_path, monkeypatch):
    """estimate prints the local answer; plan writes its JSON in the current directory (a
    URL never becomes a local path)."""
    code, local, _ = run_main("estimate", SAMPLES / "transformer_tied.pt")
    rcode, remote, err = run_main("estimate", f"{server.url}/transformer_tied.pt")
    assert (rcode, err, remote) == (code, "", local)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main("plan", f"{server.url}/transformer_tied.pt", "--freeze", "embed*")
    assert code == 0, err
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".json"] == ["transformer_tied.freeze-plan.json"]


async def test_explorer_compares_against_a_url_typed_in_the_prompt(tmp_path):
    """The compare prompt takes a URL (not turned into a local path); the diff header is the one
    a local comparison shows."""
    from test_tui_diff import header

    from conftest import settle
    from diffpair import write_pair
    from modelscope_tui.tui.app import MscopeApp
    from modelscope_tui.tui.screens.compare import CompareScreen

    a, b = write_pair(tmp_path)
    srv = RangeServer(tmp_path)
    try:
        app = MscopeApp(b, show_gpus=False)
        async with app.run_test(size=(120, 36)) as pilot:
            await settle(pilot)
            await pilot.press("v")
            await pilot.pause()
            assert isinstance(app.screen, CompareScreen)
            app.screen.query_one("#path").value = f"{srv.url}/{Path(a).name}"
            await pilot.press("enter")
            await settle(pilot)
            assert app.diff.live is not None, header(app)
            remote_top = header(app)
        app = MscopeApp(b, compare=a, show_gpus=False)
        async with app.run_test(size=(120, 36)) as pilot:
            await settle(pilot)
            local_top = header(app)
    finally:
        srv.close()
    assert "6 changed" in remote_top and remote_top == local_top


def test_quantization_config_beside_a_remote_index_is_read(tmp_path):
    """config.json next to an index is fetched with the shards: its quantization_config reaches
    the summary as it does for the local folder."""
    import shutil

    for p in (SAMPLES / "sharded_hf").iterdir():
        shutil.copy(p, tmp_path / p.name)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))
    srv = RangeServer(tmp_path)
    try:
        code, local, _ = run_main("summary", "--json", tmp_path / "model.safetensors.index.json")
        rcode, remote, err = run_main("summary", "--json", f"{srv.url}/model.safetensors.index.json")
    finally:
        srv.close()
    assert (rcode, err) == (code, "")
    same_json(local, remote)
    assert "gptq" in remote


def test_convert_from_a_url_says_to_download_first_and_writes_nothing(server, tmp_path):
    """convert copies bytes from the file: over a URL it has none to copy, so one line says what to do."""
    dest = tmp_path / "out.safetensors"
    code, out, err = run_main("convert", f"{server.url}/transformer.safetensors", str(dest))
    assert code == 2 and "download" in err and len(err.strip().splitlines()) == 1, err
    assert not dest.exists() and [p.name for p in tmp_path.iterdir() if p.name != "cache"] == []
