"""PEFT adapters with the real peft library on CPU: opened alone and over their base (counts equal
peft's get_nb_trainable_parameters), a freeze selection exported as a LoraConfig that peft applies
to exactly the selected modules, and apply_freeze_plan on a PeftModel."""

from __future__ import annotations

import json
import warnings

import pytest

from modelscope_tui.cli import main
from modelscope_tui.readers import open_checkpoint
from modelscope_tui.readers.peft import open_checkpoint_with_adapter, peft_param_name, split_lora
from modelscope_tui.training.apply import apply_freeze_plan
from modelscope_tui.training.peft import (
    LoraExportError,
    lora_config,
    lora_config_json,
    lora_snippet,
)
from modelscope_tui.training.plan import plan_from_session
from modelscope_tui.training.session import Selector, Session

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
save_file = pytest.importorskip("safetensors.torch").save_file

nn = torch.nn


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d, bias=False)


class Layer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn = Attn(d)
        self.input_layernorm = nn.LayerNorm(d)
        self.mlp = nn.Linear(d, 2 * d)


class Inner(nn.Module):
    def __init__(self, d, n):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, d)
        self.layers = nn.ModuleList([Layer(d) for _ in range(n)])
        self.norm = nn.LayerNorm(d)


class Tiny(nn.Module):
    """HF-like names: model.layers.N.self_attn.q_proj, model.norm, lm_head."""

    def __init__(self, d=8, n=4):
        super().__init__()
        self.model = Inner(d, n)
        self.lm_head = nn.Linear(d, 10)

    def forward(self, x):
        return self.lm_head(self.model.norm(self.model.embed_tokens(x)))


ADAPTERS = {
    "lora": dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, lora_dropout=0.1),
    "dora": dict(target_modules=["q_proj", "mlp"], r=2, use_dora=True),
    "saved": dict(
        target_modules=["q_proj"],
        r=2,
        modules_to_save=["lm_head", "input_layernorm"],
        layers_to_transform=[1, 2],
    ),
    "bias": dict(target_modules=["v_proj"], r=2, bias="all"),
}


def fresh() -> nn.Module:
    torch.manual_seed(0)
    return Tiny()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    base = root / "model.safetensors"
    save_file(fresh().state_dict(), base)
    counts = {}
    for name, kwargs in ADAPTERS.items():
        model = peft.get_peft_model(fresh(), peft.LoraConfig(**kwargs))
        counts[name] = model.get_nb_trainable_parameters()
        model.save_pretrained(root / name)
    model = peft.get_peft_model(fresh(), peft.LoraConfig(**ADAPTERS["lora"]))
    model.save_pretrained(root / "lora-bin", safe_serialization=False)
    counts["lora-bin"] = counts["lora"]
    return root, base, counts


@pytest.mark.parametrize("name", [*ADAPTERS, "lora-bin"])
def test_counts_over_the_base_are_peft_own(files, name):
    root, base, counts = files
    ckpt = open_checkpoint_with_adapter(base, root / name)
    totals = ckpt.totals()
    assert (totals.trainable, totals.parameters) == counts[name]
    assert Session(ckpt).totals() == counts[name]
    assert not [w for w in ckpt.warnings if "adapter:" in w]
    # the LoRA factors hang under the base module they modify, next to its frozen weight
    q = ckpt.tree
    for part in "model.layers.1.self_attn.q_proj".split("."):
        q = q.children[part]
    own = {t.name.rpartition(".")[2] for t in q.tensors}
    assert "weight" in own and all(
        not t.trainable for t in q.tensors if t.name.endswith("q_proj.weight")
    )
    if name in ("lora", "dora", "saved", "lora-bin"):
        assert {"lora_A", "lora_B"} <= set(q.children)
    if name == "dora":
        assert any(
            t.name.endswith("q_proj.lora_magnitude_vector") and t.shape == (8,) for t in q.tensors
        )


def test_adapter_alone_names_and_config(files):
    root, _, counts = files
    ckpt = open_checkpoint(root / "saved")
    names = {t.name for t in ckpt.tensors}
    assert "model.layers.1.self_attn.q_proj.lora_A.weight" in names
    assert "lm_head.modules_to_save.weight" in names
    assert "model.layers.0.input_layernorm.modules_to_save.bias" in names
    assert not any(n.startswith("base_model.") for n in names)
    assert ckpt.totals().trainable == counts["saved"][0]
    facts = ckpt.metadata["peft"]
    assert (facts["r"], facts["lora_alpha"], facts["layers_to_transform"]) == (2, 8, [1, 2])
    alone = open_checkpoint(root / "lora")
    assert alone.metadata["peft"]["lora_dropout"] == pytest.approx(0.1)
    assert {t.name for t in alone.tensors} == {
        t.name for t in open_checkpoint(root / "lora-bin").tensors
    }


def test_summary_cli_shows_rank_alpha_dropout(files, capsys):
    root, base, _ = files
    assert main(["summary", str(base), "--adapter", str(root / "lora")]) == 0
    out = capsys.readouterr().out
    assert (
        "PEFT adapter" in out and "rank: 4" in out and "alpha: 8" in out and "dropout: 0.1" in out
    )
    assert "lora_A" in out
    assert main(["summary", str(base), "--adapter", str(root / "lora"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["metadata"]["peft"]["r"] == 4 and doc["metadata"]["peft"]["findings"] == []


def test_mismatches_are_findings(files, tmp_path):
    root, _, _ = files
    torch.manual_seed(0)
    other = Tiny(d=6, n=1)  # narrower, and only one block: layers 1..3 are missing
    save_file(other.state_dict(), tmp_path / "other.safetensors")
    ckpt = open_checkpoint_with_adapter(tmp_path / "other.safetensors", root / "lora")
    text = "\n".join(ckpt.warnings)
    assert (
        "model.layers.0.self_attn.q_proj.lora_A.weight: [4, 8] does not fit the base weight [6, 6]"
        in text
    )
    assert "targets 'model.layers.3.self_attn.v_proj', which the base lacks" in text
    assert (
        main(["summary", str(tmp_path / "other.safetensors"), "--adapter", str(root / "lora")]) == 0
    )


def test_adapter_over_an_adapter_is_refused(files, capsys):
    root, _, _ = files
    assert main(["summary", str(root / "lora"), "--adapter", str(root / "dora")]) == 2
    assert "the base is itself a PEFT adapter" in capsys.readouterr().err
    assert main(["summary", str(root / "lora"), "--adapter", str(root)]) == 2


# -- the other way: a selection as a LoraConfig ----------------------------------------------
def adapted_modules(model) -> set[str]:
    """Base modules whose copies or LoRA factors train in a PeftModel."""
    out = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mapped, own = peft_param_name(name, set(model.peft_config))
        assert own, name  # nothing of the base trains
        lora = split_lora(mapped)
        out.add(lora[0] if lora else mapped.rpartition(".modules_to_save.")[0])
    return out


SELECTIONS = {
    "q everywhere": ["*.q_proj.weight"],
    "block range": ["model.layers.[12].self_attn.*.weight", "model.layers.[12].mlp.weight"],
    "mixed": [
        "*q_proj*",
        "model.layers.[23].mlp.*",
        "lm_head.*",
        "model.norm.*",
        "model.layers.0.input_layernorm.*",
    ],
    "scattered": [
        "model.layers.0.mlp.weight",
        "model.layers.3.self_attn.v_proj.weight",
        "model.layers.2.self_attn.q_proj.weight",
    ],
}


@pytest.mark.parametrize("regex", [None, True])
@pytest.mark.parametrize("case", SELECTIONS)
def test_exported_config_adapts_exactly_the_selection(files, case, regex):
    _, base, _ = files
    session = Session(open_checkpoint(base))
    session.freeze_all()
    for pattern in SELECTIONS[case]:
        session.freeze_pattern(pattern, Selector.GLOB, value=True)
    export = lora_config(session, r=4, alpha=8, dropout=0.0, regex=regex)
    assert isinstance(export.config["target_modules"], str if regex else list)
    config = peft.LoraConfig(**json.loads(lora_config_json(export)))
    model = peft.get_peft_model(fresh(), config)
    assert adapted_modules(model) == set(export.targets) | set(export.saved)
    if case == "block range" and regex is None:
        assert export.config["layers_to_transform"] == [1, 2]
        assert export.config["target_modules"] == ["mlp", "q_proj", "v_proj"]
    if case == "mixed":
        assert "model.norm" in export.saved and "lm_head" in export.targets
    # the snippet runs and builds the same model
    scope: dict = {}
    exec(compile(lora_snippet(export, "model.safetensors"), "snippet", "exec"), scope)
    again = scope["add_lora"](fresh())
    assert adapted_modules(again) == adapted_modules(model)


def test_nothing_selected_is_one_line(files):
    _, base, _ = files
    session = Session(open_checkpoint(base))
    session.freeze_all()
    with pytest.raises(LoraExportError, match="nothing is selected"):
        lora_config(session)


def test_plan_cli_writes_lora_config(files, tmp_path, capsys):
    _, base, _ = files
    out = tmp_path / "lora.json"
    rc = main(
        [
            "plan",
            str(base),
            "--freeze",
            "*",
            "--unfreeze",
            "*.v_proj.*",
            "-o",
            str(tmp_path / "p.json"),
            "--lora-config",
            str(out),
            "--lora-r",
            "2",
        ]
    )
    assert rc == 0, capsys.readouterr()
    config = json.loads(out.read_text())
    assert config["target_modules"] == ["v_proj"] and config["r"] == 2
    model = peft.get_peft_model(fresh(), peft.LoraConfig(**config))
    assert model.get_nb_trainable_parameters()[0] == 4 * 2 * (8 + 8)
    assert (tmp_path / "lora.py").read_text().startswith("# PEFT LoraConfig")


# -- apply_freeze_plan on a PeftModel -----------------------------------------------------------
def test_apply_freeze_plan_on_a_peft_model_with_a_base_plan(files):
    _, base, _ = files
    session = Session(open_checkpoint(base))
    session.freeze_all()
    session.freeze_pattern("model.layers.3.*", Selector.GLOB, value=True)
    plan = plan_from_session(session)
    model = peft.get_peft_model(fresh(), peft.LoraConfig(**ADAPTERS["lora"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fingerprint matches: no mismatch warning
        report = apply_freeze_plan(model, plan, strict=True)
    assert report.fingerprint_match is True and report.missing_in_model == []
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    base_trains = {n for n in trains if "lora_" not in n}
    assert base_trains == {
        n for n, _ in model.named_parameters() if ".layers.3." in n and "lora_" not in n
    }
    assert any("lora_A" in n for n in trains)  # the adapter stays as PEFT set it
    assert "base_model.model.model.layers.3.self_attn.q_proj.base_layer.weight" in trains
    assert any("adapter parameter(s)" in n for n in report.notes)


def test_apply_freeze_plan_with_a_plan_of_the_attached_view(files):
    root, base, _ = files
    session = Session(open_checkpoint_with_adapter(base, root / "saved"))
    session.freeze_pattern("*.layers.1.*", Selector.GLOB)  # the adapter's block 1 stops training
    plan = plan_from_session(session)
    model = peft.get_peft_model(fresh(), peft.LoraConfig(**ADAPTERS["saved"]))
    report = apply_freeze_plan(model, plan, strict=True)
    assert report.fingerprint_match is True
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(".layers.1." in n for n in trains)
    assert "base_model.model.model.layers.2.self_attn.q_proj.lora_A.default.weight" in trains
    assert "base_model.model.lm_head.modules_to_save.default.weight" in trains
    assert "base_model.model.lm_head.original_module.weight" not in trains


def test_adapter_over_a_quantized_base_checks_logical_shapes(tmp_path):
    """QLoRA: the base's packed weights (MXFP4 [64, 32] bytes for a [64, 64] weight, FP8 with
    block scales) are matched by their logical shape, and stay frozen."""
    from pathlib import Path

    sample = Path(__file__).resolve().parents[2] / "sample_models" / "quant_tiny.safetensors"
    d = tmp_path / "qlora"
    d.mkdir()
    (d / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 4,
                "lora_alpha": 8,
                "target_modules": ["q_proj", "shared_expert"],
            }
        )
    )
    prefix = "base_model.model.model.layers.0."
    tensors = {
        f"{prefix}self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
        f"{prefix}self_attn.q_proj.lora_B.weight": torch.zeros(64, 4),
        f"{prefix}mlp.shared_expert.lora_A.weight": torch.zeros(4, 64),
        f"{prefix}mlp.shared_expert.lora_B.weight": torch.zeros(64, 4),
    }
    save_file(tensors, d / "adapter_model.safetensors")
    ckpt = open_checkpoint_with_adapter(sample, d)
    assert ckpt.metadata["peft"]["findings"] == []
    assert ckpt.totals().trainable == 4 * 64 * 4
    assert ckpt.totals().parameters == open_checkpoint(sample).totals().parameters + 4 * 64 * 4
    assert ckpt.tensor("model.layers.0.mlp.shared_expert.weight").quant is not None


def test_estimate_takes_rank_and_targets_from_the_adapter(files, capsys):
    root, base, counts = files
    assert main(["estimate", str(base), "--adapter", str(root / "lora")]) == 0
    out = capsys.readouterr().out
    assert (
        f"LoRA rank 4 on 8 module(s) (q_proj, v_proj): {counts['lora'][0]} trainable"
        in out.replace("v_proj, q_proj", "q_proj, v_proj")
    )


# ----------------------------------------------------------------------------------------------
# QLoRA: a LoraConfig exported from a real bitsandbytes 4-bit checkpoint
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nf4_llama(tmp_path_factory):
    """A tiny Llama quantized to nf4 by transformers + bitsandbytes on the CPU, saved with
    save_pretrained, and the 4-bit model loaded back from it (what a QLoRA user wraps)."""
    pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    tmp = tmp_path_factory.mktemp("qlora")
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp / "base")
    qc = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
    )

    def load(path):
        return transformers.LlamaForCausalLM.from_pretrained(
            path, quantization_config=qc, device_map="cpu", use_kernels=False
        )

    try:
        load(tmp / "base").save_pretrained(tmp / "nf4")
    except Exception as exc:  # no CPU backend in this bitsandbytes build
        mp.undo()
        pytest.skip(f"bitsandbytes cannot quantize on this machine: {exc}")
    yield tmp / "nf4", lambda: load(tmp / "nf4")
    mp.undo()


QLORA_SELECTIONS = {
    "attention q,v": ["*.q_proj.weight", "*.v_proj.weight"],
    "all linear": ["model.layers.*proj.weight"],
    "last block + norm": ["model.layers.2.*", "model.norm.*"],
}


@pytest.mark.parametrize("case", QLORA_SELECTIONS)
def test_lora_config_from_a_4bit_base_adapts_exactly_the_chosen_layers(nf4_llama, case):
    path, load = nf4_llama
    session = Session(open_checkpoint(path))
    session.freeze_all()
    total_before = session.totals()
    for pattern in QLORA_SELECTIONS[case]:
        result = session.freeze_pattern(pattern, Selector.GLOB, value=True)
        assert "LoRA target" in result.message or result.changed
    chosen, quantized = session.lora_target_count()
    assert quantized == 3 * 7 and chosen > 0
    # the quantized base never trains: only the float norm counts as trainable
    trainable, total = session.totals()
    assert total == total_before[1]
    # the two norms of block 2 and model.norm
    assert trainable == {"last block + norm": 3 * 64}.get(case, 0)
    assert f"LoRA on {chosen}/21 quantized" in session.totals_line()
    export = lora_config(session, r=4, alpha=8, dropout=0.0)
    assert len(export.targets) == chosen
    model = peft.get_peft_model(load(), peft.LoraConfig(**json.loads(lora_config_json(export))))
    assert adapted_modules(model) == set(export.targets) | set(export.saved)
    if case == "last block + norm":
        assert set(export.saved) == {
            "model.layers.2.input_layernorm",
            "model.layers.2.post_attention_layernorm",
            "model.norm",
        }
    # PEFT wrapped the 4-bit layers with its bitsandbytes LoRA layer
    wrapped = dict(model.named_modules())[f"base_model.model.{export.targets[0]}"]
    assert type(wrapped).__module__.endswith("bnb"), type(wrapped)
    # undo drops the LoRA targets again, as one step per rule
    for _ in QLORA_SELECTIONS[case]:
        session.undo()
    assert session.lora_target_count() == (0, 21)


def test_quantized_module_state_in_the_session(nf4_llama):
    path, _ = nf4_llama
    ckpt = open_checkpoint(path)
    session = Session(ckpt)
    session.freeze_all()
    q = session.node("model.layers.0.self_attn.q_proj")
    assert session.node_state(q) == "frozen"
    result = session.toggle([t.name for t in q.all_tensors()])  # space on the module
    assert result.changed == 1 and session.is_lora_target("model.layers.0.self_attn.q_proj.weight")
    assert session.node_state(q) == "lora"
    assert session.node_state(session.node("model.layers.0")) == "mixed"
    assert session.totals()[0] == 0  # nothing trains whole
    session.toggle([t.name for t in q.all_tensors()])
    assert session.node_state(q) == "frozen"
    # "train the last block" on a 4-bit base: its Linears become LoRA targets, its norms train
    session.train_last_n_blocks(1)
    assert session.lora_target_count(session.node("model.layers.2")) == (7, 7)
    assert session.lora_target_count() == (7, 21)
    assert session.node_state(session.node("model.layers.2.mlp")) == "lora"
    session.undo()
    assert session.lora_target_count() == (0, 21)
