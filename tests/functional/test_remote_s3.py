"""s3:// through s3fs against moto's S3 server (the one s3fs's own tests use), reached through
AWS_ENDPOINT_URL with dummy credentials: files and sharded folders in a bucket answer as the
local files do."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from remotehelp import run_main, same_json  # noqa: E402

SAMPLES = TESTS.parent / "sample_models"
BUCKET = "ckpts"
UPLOAD = [
    "llama_tiny.safetensors",
    "transformer_tied.pt",
    "transformer.safetensors",
    "legacy_cnn.pt",
    "sharded_hf/model.safetensors.index.json",
    "sharded_hf/model-00001-of-00002.safetensors",
    "sharded_hf/model-00002-of-00002.safetensors",
    "sharded_hf/config.json",
    "sharded_bin/pytorch_model.bin.index.json",
    "sharded_bin/pytorch_model-00001-of-00002.bin",
    "sharded_bin/pytorch_model-00002-of-00002.bin",
    "dcp_checkpoint/.metadata",
    "dcp_checkpoint/__0_0.distcp",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    mp = pytest.MonkeyPatch()
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        mp.setenv(key, value)
    mp.delenv("AWS_PROFILE", raising=False)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    for name in UPLOAD:
        client.upload_file(str(SAMPLES / name), BUCKET, f"run/{name}")
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    yield endpoint
    server.stop()
    mp.undo()


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.mark.parametrize(
    "local, remote",
    [
        ("llama_tiny.safetensors", "run/llama_tiny.safetensors"),
        ("transformer_tied.pt", "run/transformer_tied.pt"),
        ("legacy_cnn.pt", "run/legacy_cnn.pt"),
        ("sharded_hf", "run/sharded_hf/"),
        ("sharded_bin", "run/sharded_bin"),
        ("dcp_checkpoint", "run/dcp_checkpoint/"),  # a prefix holding .metadata: a DCP folder
        ("dcp_checkpoint", "run/dcp_checkpoint/.metadata"),
    ],
)
@pytest.mark.parametrize("command", [["summary", "--json"], ["audit", "--stats", "--json"]])
def test_s3_equals_local(s3, local, remote, command):
    code, expected, _ = run_main(*command, SAMPLES / local)
    rcode, got, err = run_main(*command, f"s3://{BUCKET}/{remote}")
    assert (rcode, err) == (code, "")
    same_json(expected, got)


def test_s3_diff_equals_local(s3):
    code, expected, _ = run_main("diff", "--json", SAMPLES / "transformer_tied.pt", SAMPLES / "transformer.safetensors")
    rcode, got, err = run_main(
        "diff", "--json", f"s3://{BUCKET}/run/transformer_tied.pt", f"s3://{BUCKET}/run/transformer.safetensors"
    )
    assert (rcode, err) == (code, "")
    same_json(expected, got)


def test_s3_dcp_diff_equals_local(s3):
    local = [SAMPLES / "dcp_checkpoint", SAMPLES / "transformer_tied.pt"]
    code, expected, _ = run_main("diff", "--json", *local)
    urls = [f"s3://{BUCKET}/run/dcp_checkpoint", f"s3://{BUCKET}/run/transformer_tied.pt"]
    rcode, got, err = run_main("diff", "--json", *urls)
    assert (rcode, err) == (code, "")
    same_json(expected, got)


def test_s3_missing_key_keeps_the_url(s3):
    code, out, err = run_main("summary", f"s3://{BUCKET}/run/nope.pt")
    assert code == 2 and out == ""
    assert err.strip() == f"mscope: error: s3://{BUCKET}/run/nope.pt: no such file or directory"


def test_s3_folder_of_several_checkpoints_names_one(s3):
    code, _, err = run_main("summary", f"s3://{BUCKET}/run/")
    assert code == 2 and "name one" in err and f"s3://{BUCKET}/run/" in err


async def test_explorer_first_paint_from_s3(s3):
    """The explorer opens a bucket folder like a local directory: the same header and tree."""
    from test_tui import header, started, tree_lines

    from modelscope_tui.tui.app import MscopeApp

    shown = []
    for where in (SAMPLES / "sharded_hf", f"s3://{BUCKET}/run/sharded_hf/"):
        app = MscopeApp(where)
        async with app.run_test(size=(120, 36)) as pilot:
            await started(pilot)
            shown.append((header(app).split("·", 1)[-1], tree_lines(app)))
    assert shown[0] == shown[1]
    assert shown[1][1]


def test_writers_refuse_a_remote_source(s3):
    """Writing a changed copy needs the bytes on this disk: one line that says so, nothing written."""
    from modelscope_tui.readers import open_checkpoint
    from modelscope_tui.write.atomic import SaveError
    from modelscope_tui.write.requires_grad import save_with_requires_grad

    ckpt = open_checkpoint(f"s3://{BUCKET}/run/transformer_tied.pt")
    with pytest.raises(SaveError) as info:
        save_with_requires_grad(ckpt, {})
    assert "needs the checkpoint on this disk" in info.value.line()
    assert f"s3://{BUCKET}/run/transformer_tied.pt" in info.value.line()


@pytest.fixture(scope="module")
def s3_cluster(s3, tmp_path_factory):
    """A real scheduler and two workers (test_dask's cluster, started here after the S3
    variables are set): the workers read their ranges straight from the bucket."""
    pytest.importorskip("distributed")
    import test_dask

    yield from test_dask.cluster.__wrapped__(tmp_path_factory)  # the fixture's own generator


@pytest.mark.parametrize(
    "args, local, remote",
    [
        (["audit", "--stats", "--json"], ["sharded_hf"], ["run/sharded_hf/"]),
        (["diff", "--json"], ["transformer_tied.pt", "transformer.safetensors"],
         ["run/transformer_tied.pt", "run/transformer.safetensors"]),
    ],
)  # fmt: skip
def test_dask_workers_read_from_s3_like_local(s3_cluster, args, local, remote):
    code, expected, _ = run_main(*args, *(SAMPLES / p for p in local))
    rcode, got, err = run_main(*args, "--dask", s3_cluster, *(f"s3://{BUCKET}/{p}" for p in remote))
    assert (rcode, err) == (code, "")
    same_json(expected, got)


@pytest.mark.parametrize("when", ["before-values", "after-values"])
@pytest.mark.parametrize("command", ["audit", "diff"])
def test_s3_object_replaced_while_read_is_one_line(s3, monkeypatch, when, command):
    """The object is overwritten (same size, other bytes: a new ETag) after its metadata was
    read: before the first value read (caught there) or after it (caught by the check at the end
    of the audit or diff). One line, exit 2, no report on stdout."""
    from modelscope_tui.readers import sources

    client = boto3.client("s3", endpoint_url=s3, region_name="us-east-1")
    key = f"changing/{command}-{when}.pt"
    data = (SAMPLES / "transformer_tied.pt").read_bytes()
    client.put_object(Bucket=BUCKET, Key=key, Body=data)
    url = f"s3://{BUCKET}/{key}"
    real = sources.remote_source
    replaced = []

    def replace() -> None:
        if not replaced:
            replaced.append(True)
            client.put_object(Bucket=BUCKET, Key=key, Body=data[:-1] + bytes([data[-1] ^ 1]))

    def hooked(loc):
        if loc.url == url and when == "before-values":
            replace()
        src = real(loc)
        if loc.url == url and when == "after-values":
            replace()
        return src

    monkeypatch.setattr(sources, "remote_source", hooked)
    if command == "audit":
        code, out, err = run_main("audit", "--stats", "--json", url)
    else:
        code, out, err = run_main("diff", "--json", url, SAMPLES / "transformer_tied.pt")
    assert replaced
    assert (code, out) == (2, "")
    assert err.strip().splitlines() == [
        f"mscope: error: {url}: the file changed while being read (its ETag / version changed)"
        " (open it again once the upload is finished)"
    ]
