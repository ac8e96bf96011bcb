"""Hugging Face device maps: export, read back, balance; on real checkpoints written by torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelscope_tui import open_checkpoint
from modelscope_tui.errors import MscopeError
from modelscope_tui.training.devicemap import (
    BalancedMap,
    DeviceMapError,
    balanced_device_map,
    device_label,
    device_map_json,
    export_device_map,
    load_device_map,
    parse_device,
    parse_size,
    read_device_map,
    save_device_map,
    tie_conflicts,
)
from modelscope_tui.training.session import Session

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"


@pytest.fixture(scope="module")
def tied():
    return Session(open_checkpoint(SAMPLES / "transformer_tied.pt"))


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert isinstance(exc.value, MscopeError) and "\n" not in text and text
    return text


# -- devices ---------------------------------------------------------------------------------------
def test_parse_device_normalises_like_transformers():
    assert parse_device(0) == 0 and parse_device(3) == 3
    assert (
        parse_device("cuda:2") == 2 and parse_device("cuda") == 0 and parse_device(" CUDA:1 ") == 1
    )
    for name in ("cpu", "disk", "meta", "mps", "xpu:1", "npu:0"):
        assert parse_device(name) == name
    assert device_label(1) == "cuda:1" and device_label("cpu") == "cpu"


@pytest.mark.parametrize("bad", [-1, True, None, 1.5, "gpu", "cuda:x", "auto", [0], ""])
def test_parse_device_rejects(bad):
    with pytest.raises(DeviceMapError) as exc:
        parse_device(bad, "entry 'x'")
    assert "entry 'x'" in one_line(exc)


def test_parse_device_hint_for_digit_strings():
    with pytest.raises(DeviceMapError, match=r"write 1 \(a number\) for cuda:1"):
        parse_device("1")


def test_parse_size():
    assert parse_size(123) == 123
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("512 MiB") == 512 * 2**20
    assert parse_size("1.5TB") == 1_500_000_000_000
    assert parse_size("100") == 100
    # a bare number in the caller's unit (`--chunk-mb 2`); a unit always means what it says
    assert parse_size("2", bare=2**20) == parse_size(2, bare=2**20) == 2 * 2**20
    assert parse_size("0.5", bare=2**20) == 2**19
    assert parse_size("512KiB", bare=2**20) == 512 * 2**10
    assert parse_size("4MB", bare=2**20) == 4 * 10**6
    assert parse_size("24gib") == parse_size("24 GiB") == parse_size("24Gi") == 24 * 2**30
    for bad in ("lots", "-5GB", -1, True):
        with pytest.raises(DeviceMapError):
            parse_size(bad)


# -- export and read back --------------------------------------------------------------------------
def layered(session: Session) -> dict[str, object]:
    """blocks.0 on GPU 0, blocks.1 on GPU 1, everything else on the CPU."""
    out: dict[str, object] = {}
    for name in session.records:
        out[name] = (
            "cuda:0"
            if name.startswith("blocks.0.")
            else 1
            if name.startswith("blocks.1.")
            else "cpu"
        )
    return out


def test_export_compresses_to_the_highest_modules(tied):
    dmap = export_device_map(tied, layered(tied))
    assert dmap == {
        "embed": "cpu",
        "pos_embed": "cpu",
        "blocks.0": 0,
        "blocks.1": 1,
        "ln_f": "cpu",
        "lm_head": "cpu",
    }
    assert list(dmap) == ["embed", "pos_embed", "blocks.0", "blocks.1", "ln_f", "lm_head"]


def test_export_whole_model_on_one_device(tied):
    assert export_device_map(tied, dict.fromkeys(tied.records, "cuda:0")) == {"": 0}
    assert export_device_map(tied.ckpt, {}, default="meta") == {"": "meta"}


def test_export_splits_a_module_into_its_tensors(tied):
    devices = dict.fromkeys(tied.records, 0)
    devices["blocks.1.linear1.bias"] = "cpu"
    dmap = export_device_map(tied, devices)
    assert dmap["blocks.1.linear1.weight"] == 0 and dmap["blocks.1.linear1.bias"] == "cpu"
    assert dmap["blocks.0"] == 0 and dmap["blocks.1.self_attn"] == 0 and dmap["embed"] == 0
    assert "" not in dmap and "blocks.1" not in dmap and "blocks.1.linear1" not in dmap
    assert read_device_map(dmap, tied) == devices


def test_export_file_placement_takes_the_default(tied):
    devices = dict.fromkeys(tied.records, "file")  # placement.FILE: not materialised
    devices["ln_f.weight"] = devices["ln_f.bias"] = "cuda:1"
    assert export_device_map(tied, devices, default="cpu") == {
        "embed": "cpu",
        "pos_embed": "cpu",
        "blocks": "cpu",
        "ln_f": 1,
        "lm_head": "cpu",
    }
    with pytest.raises(DeviceMapError, match="no device for tensor 'embed.weight'"):
        export_device_map(tied, devices)


def test_export_rejects_names_and_devices(tied):
    with pytest.raises(DeviceMapError, match="not model tensors"):
        export_device_map(tied, {"nope.weight": 0}, default=0)
    with pytest.raises(DeviceMapError, match="embed.weight"):
        export_device_map(tied, {"embed.weight": "gpu"}, default=0)


@pytest.mark.parametrize(
    "sample",
    [
        "transformer_tied.pt",
        "notebook_full.pt",
        "cnn_state_dict.pt",
        "scripted_cnn.pt",
        "sharded_hf",
        "dtypes.pt",
    ],
)
def test_round_trip_through_a_file(tmp_path, sample):
    session = Session(open_checkpoint(SAMPLES / sample))
    names = list(session.records)
    devices = {n: [0, 1, "cpu", "disk"][i * 4 // len(names)] for i, n in enumerate(names)}
    dmap = export_device_map(session, devices)
    path = save_device_map(dmap, tmp_path / "device_map.json")
    assert json.loads(path.read_text()) == dmap == load_device_map(path)
    assert read_device_map(path, session) == devices
    assert read_device_map(str(path), session.ckpt) == devices
    assert len(dmap) <= len(names)


def test_save_never_overwrites_silently(tmp_path, tied):
    path = tmp_path / "dm.json"
    save_device_map({"": 0}, path)
    with pytest.raises(MscopeError, match="exists"):
        save_device_map({"": 1}, path)
    save_device_map({"": 1}, path, overwrite=True)
    assert json.loads(path.read_text()) == {"": 1}
    assert json.loads((tmp_path / "dm.json.bak").read_text()) == {"": 0}


def test_json_is_what_transformers_reads():
    text = device_map_json({"": 0})
    assert text == '{\n  "": 0\n}\n'
    assert json.loads(device_map_json({"a": "cpu", "b": 1})) == {"a": "cpu", "b": 1}


def test_read_resolves_nearest_module_like_transformers(tied):
    per_tensor = read_device_map(
        {"": "cpu", "blocks": 0, "blocks.1.norm2": "disk", "lm_head.weight": 1}, tied
    )
    assert per_tensor["embed.weight"] == "cpu"
    assert per_tensor["blocks.0.linear1.weight"] == 0
    assert per_tensor["blocks.1.norm2.bias"] == "disk"
    assert per_tensor["blocks.1.norm1.bias"] == 0
    assert per_tensor["lm_head.weight"] == 1
    assert set(per_tensor) == set(tied.records)


def test_read_accepts_empty_modules_of_a_full_module():
    session = Session(open_checkpoint(SAMPLES / "notebook_full.pt"))
    per_tensor = read_device_map({"": 0, "stem.2": "cpu"}, session)  # stem.2 is a ReLU
    assert set(per_tensor.values()) == {0}


@pytest.mark.parametrize(
    ("dmap", "message"),
    [
        ({"blocks.9": 0, "": 0}, "'blocks.9', which is not a module or tensor"),
        ({"": 0, "blocks.0.self_atn": 1}, "did you mean 'blocks.0.self_attn'"),
        ({"": "gpu0"}, "entry '': invalid device 'gpu0'"),
        ({"": -2}, "CUDA indices start at 0"),
        ({"": True}, "invalid device True"),
        ({"": "0"}, "write 0 (a number) for cuda:0"),
        ({"blocks": 0}, "no device for tensor 'embed.weight'"),
        ({}, "no device for tensor 'embed.weight'"),
    ],
)
def test_read_rejects_invalid_maps(tied, dmap, message):
    with pytest.raises(DeviceMapError) as exc:
        read_device_map(dmap, tied)
    assert message in one_line(exc)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not valid JSON"),
        ('"auto"', "not a str"),
        ("[0, 1]", "not a list"),
        pytest.param("[" * 100_000, "not", id="nested-too-deep"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_read_rejects_bad_files(tmp_path, tied, content, message):
    path = tmp_path / "dm.json"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    with pytest.raises(DeviceMapError) as exc:
        read_device_map(path, tied)
    text = one_line(exc)
    assert message in text and str(path) in text


def test_read_names_the_file_on_bad_entries(tmp_path, tied):
    path = tmp_path / "dm.json"
    path.write_text('{"": "tpu"}')
    with pytest.raises(DeviceMapError) as exc:
        read_device_map(path, tied)
    assert one_line(exc).startswith(f"{path}: entry '': invalid device 'tpu'")
    with pytest.raises(DeviceMapError, match="no such file"):
        read_device_map(tmp_path / "missing.json", tied)
    with pytest.raises(DeviceMapError, match="is a directory"):
        read_device_map(tmp_path, tied)
    with pytest.raises(DeviceMapError, match="dict or a file path"):
        read_device_map(42, tied)  # type: ignore[arg-type]


def test_tie_conflicts(tied):
    devices = dict.fromkeys(tied.records, 0)
    assert tie_conflicts(tied, devices) == []
    devices["lm_head.weight"] = "cpu"
    (line,) = tie_conflicts(tied, devices)
    assert "embed.weight on cuda:0" in line and "lm_head.weight on cpu" in line


# -- balancing -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def net_session(tmp_path_factory) -> Session:
    """6 identical blocks (attn, mlp Sequential, norm) between an embedding and a head."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(64, 64)
            self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
            self.norm = nn.LayerNorm(64)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(300, 64)
            self.layers = nn.ModuleList(Block() for _ in range(6))
            self.norm = nn.LayerNorm(64)
            self.head = nn.Linear(64, 10)

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("net") / "net.pt"
    torch.save(Net().state_dict(), path)
    return Session(open_checkpoint(path))


NET_BYTES, BLOCK_BYTES, EMBED_BYTES = 580_648, 83_456, 76_800

# infer_auto_device_map(Net(), max_memory=caps, no_split_module_classes=["Block"]) from
# accelerate 1.15.0, run on the same model: cases where something is offloaded (there both
# keep the largest layer free on the first GPU and, with disk, on the CPU).
ACCELERATE_CASES = [
    (
        {0: 150_000, 1: 200_000, "cpu": 10**9},
        {"embed": 1, "layers.0": 1, "layers.1": "cpu", "layers.2": "cpu", "layers.3": "cpu",
         "layers.4": "cpu", "layers.5": "cpu", "norm": "cpu", "head": "cpu"},
    ),
    (
        {0: 250_000, 1: 100_000, "cpu": 200_000, "disk": 10**12},
        {"embed": 0, "layers.0": 0, "layers.1": 1, "layers.2": "cpu", "layers.3": "disk",
         "layers.4": "disk", "layers.5": "disk", "norm": "disk", "head": "disk"},
    ),
    ({0: 120_000, "cpu": 150_000, "disk": 10**12}, {"": "disk"}),
]  # fmt: skip


@pytest.mark.parametrize(("caps", "expected"), ACCELERATE_CASES)
def test_balanced_matches_accelerate_when_offloading(net_session, caps, expected):
    session = net_session
    plan = balanced_device_map(session, caps)
    assert plan.offloaded
    assert plan.tensors == read_device_map(expected, session)
    assert plan.reserved[0] == BLOCK_BYTES


def test_balanced_keeps_blocks_whole_and_order(net_session):
    session = net_session
    assert session.totals()[1] * 4 == NET_BYTES
    caps = {0: EMBED_BYTES + BLOCK_BYTES + 2 * BLOCK_BYTES // 3, 1: 3 * BLOCK_BYTES, 2: NET_BYTES}
    plan = balanced_device_map(session, caps)
    assert not plan.offloaded and plan.reserved == {}  # nothing offloaded: no room kept free
    assert plan.device_map == {
        "embed": 0,
        "layers.0": 0,
        "layers.1": 1,
        "layers.2": 1,
        "layers.3": 1,
        "layers.4": 2,
        "layers.5": 2,
        "norm": 2,
        "head": 2,
    }
    for dev, used in plan.used.items():
        assert used <= caps[dev]
    assert sum(plan.used.values()) == NET_BYTES
    order = {0: 0, 1: 1, 2: 2}
    devs = [order[plan.tensors[n]] for n in session.records]
    assert devs == sorted(devs)  # sequential: never back to an earlier device


def test_balanced_splits_modules_that_are_not_blocks(net_session):
    session = net_session
    # room for the embedding and half the head on device 0: "head" is a leaf, kept whole
    caps = {0: EMBED_BYTES + 1000, "cpu": None}
    plan = balanced_device_map(session, caps, reserve_largest=False)
    assert plan.tensors["embed.weight"] == 0 and plan.tensors["head.weight"] == "cpu"
    assert plan.tensors["head.weight"] == plan.tensors["head.bias"]
    assert plan.device_map == {"embed": 0, "layers": "cpu", "norm": "cpu", "head": "cpu"}


def test_balanced_ties_travel_together(tied):
    caps = {0: 40_000, 1: 40_000, "cpu": 10**6}
    plan = balanced_device_map(tied, caps)
    # accelerate 1.15.0 on the same model: {'embed': 1, 'lm_head': 1, 'pos_embed': 1,
    # 'ln_f': 'cpu', 'blocks': 'cpu'} (GPU 0 keeps room for a block: too little for the rest)
    assert plan.device_map == {
        "embed": 1,
        "pos_embed": 1,
        "blocks": "cpu",
        "ln_f": "cpu",
        "lm_head": 1,
    }
    assert plan.used[1] == (128 + 16) * 32 * 4  # lm_head.weight is embed.weight: counted once
    assert tie_conflicts(tied, plan.tensors) == []
    assert plan.lines()[0] == "cuda:0: 0 B of 39.1 KiB (+33.4 KiB kept free)"


def test_balanced_whole_model_on_one_device(tied):
    plan = balanced_device_map(tied, {"cuda:0": "1MB"})
    assert plan.device_map == {"": 0} and plan.used == {0: 21_760 * 4}
    assert isinstance(plan, BalancedMap)


def test_balanced_with_training_precision(tied):
    tied.freeze_all()
    try:
        tied.unfreeze(tied.match("blocks.1"))
        trainable = tied.totals()[0]
        plan = balanced_device_map(tied, {0: 10**6}, precision="bf16-mixed", optimizer="adamw")
        assert plan.used[0] == 21_760 * 2 + trainable * (2 + 4 + 8)
    finally:
        tied.unfreeze_all()


def test_balanced_reports_what_does_not_fit(tied):
    with pytest.raises(DeviceMapError) as exc:
        balanced_device_map(tied, {0: 20_000, 1: 20_000})
    text = one_line(exc)
    assert "does not fit" in text and "'blocks.0'" in text
    with pytest.raises(DeviceMapError, match="no devices"):
        balanced_device_map(tied, {})
    with pytest.raises(DeviceMapError, match="invalid device"):
        balanced_device_map(tied, {"gpu": 10})


def test_balanced_largest_unit_too_big_for_the_first_gpu(tied):
    plan = balanced_device_map(tied, {0: 30_000, "cpu": 10**6})
    assert plan.device_map == {"": "cpu"}  # as accelerate: {'': 'cpu'}
    assert plan.notes and "cuda:0 cannot hold the largest unit" in plan.notes[0]


@pytest.mark.parametrize(
    "sample",
    ["notebook_full.pt", "scripted_cnn.pt", "sharded_hf", "dtypes.pt", "cnn_state_dict.pt"],
)
def test_balanced_on_samples_round_trips(sample):
    session = Session(open_checkpoint(SAMPLES / sample))
    total = sum(t.nbytes for t in session.records.values() if t.alias_of is None)
    plan = balanced_device_map(session, {0: total // 2, "cpu": None}, reserve_largest=False)
    assert read_device_map(plan.device_map, session) == plan.tensors
    assert sum(plan.used.values()) == total
    assert plan.used[0] <= total // 2
