"""Tests for rayfed.models.peft: LoRA, IA3 and prompt tuning on the models rayfed builds, roles, export."""

from __future__ import annotations

import random

import numpy as np
import peft
import pytest
import torch
from torch import nn

from rayfed.config import ModelConfig, PeftConfig
from rayfed.data.info import DatasetInfo
from rayfed.errors import ConfigError
from rayfed.models import attention_projections, build_model, forward_logits, head_parameter_names
from rayfed.models.peft import adapter_state, apply_peft, export_adapter, load_adapter
from rayfed.roles import Role, assign_roles, select

# hidden 32, 2 layers: LoRA r=4 on q and v adds 2 layers x 2 modules x (4*32 + 32*4) = 1024 scalars
SMALL = {"hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "num_layers": 2}
IMAGE = DatasetInfo(10, (1, 8, 8), "image")
TEXT = DatasetInfo(3, (16,), "text", vocab_size=50)
VECTOR = DatasetInfo(3, (5,), "vector")
LORA_QV = 2 * 2 * (4 * 32 + 32 * 4)
VIT_HEAD = 32 * 10 + 10
BERT_HEAD = 32 * 3 + 3


def _vit(seed: int = 0) -> nn.Module:
    return build_model(ModelConfig(name="vit", patch_size=2, **SMALL), IMAGE, seed)


def _bert(seed: int = 0, length: int = 16) -> nn.Module:
    # rayfed's bert gets max_position_embeddings = the data's length; prompt tuning needs room for its tokens
    return build_model(ModelConfig(name="bert", **SMALL), DatasetInfo(3, (length,), "text", vocab_size=50), seed)


def _mlp(seed: int = 0) -> nn.Module:
    return build_model(ModelConfig(name="mlp", mlp_hidden=[8]), VECTOR, seed)


def _images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _tokens(n: int = 4, length: int = 16, vocab: int = 50) -> torch.Tensor:
    x = torch.randint(1, vocab, (n, length), generator=torch.Generator().manual_seed(2))
    x[0, -3:] = 0  # some padding, so the attention mask matters
    return x


def _prepare(make, cfg: PeftConfig, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(PEFT model, the base model's state dict before wrapping)."""
    base = make()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(seed)
    return apply_peft(base, cfg), before


def _base_key(key: str) -> str:
    """The base model's key of a PEFT model's frozen tensor."""
    return key.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")


def _numel(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())


# ---------------------------------------------------------------------------------------------
# build, forward, roles, hand-counted parameters
# ---------------------------------------------------------------------------------------------


def _two_layers(*layer0: str) -> list[str]:
    return sorted([*layer0, *(n.replace(".0.", ".1.") for n in layer0)])


CASES = [
    # (id, model, batch, config, expected target modules, expected trainable scalars)
    ("vit-lora", _vit, _images, PeftConfig(type="lora", r=4),
     _two_layers("vit.layers.0.attention.q_proj", "vit.layers.0.attention.v_proj"), LORA_QV + VIT_HEAD),
    ("bert-lora", _bert, _tokens, PeftConfig(type="lora", r=4),
     _two_layers("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"),
     LORA_QV + BERT_HEAD),
    # IA3: one scale per output of q and v (32 each), one per input of the feed-forward output layer (64)
    ("vit-ia3", _vit, _images, PeftConfig(type="ia3"),
     _two_layers("vit.layers.0.attention.q_proj", "vit.layers.0.attention.v_proj", "vit.layers.0.mlp.fc2"),
     2 * (32 + 32 + 64) + VIT_HEAD),
    ("bert-ia3", _bert, _tokens, PeftConfig(type="ia3"),
     _two_layers("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value",
                 "bert.encoder.layer.0.output.dense"), 2 * (32 + 32 + 64) + BERT_HEAD),
    # an MLP has no attention: every Linear but the head; r=4 on body.0 (5 -> 8): 4*5 + 8*4, head 8*3 + 3
    ("mlp-lora", _mlp, lambda: torch.randn(4, 5), PeftConfig(type="lora", r=4), ["body.0"], 4 * 5 + 8 * 4 + 8 * 3 + 3),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_lora_ia3_build_forward_roles_and_counts(case):
    _, make, batch, cfg, targets, trainable = case
    model, before = _prepare(make, cfg)
    assert isinstance(model, peft.PeftModel)
    config = model.peft_config["default"]
    assert sorted(config.target_modules) == targets
    assert config.modules_to_save == ["classifier"]
    x = batch()
    num_classes = before["classifier.bias"].numel()
    assert forward_logits(model, x).shape == (len(x), num_classes)

    adapters = adapter_state(model)
    assert _numel(adapters) == trainable
    roles = assign_roles(model)
    assert set(roles.names(Role.SHARED)) == set(adapters)
    assert not set(roles.names()) - set(adapters) - set(roles.names(Role.FROZEN))
    # the frozen tensors are exactly the base model's, in its state-dict order, bitwise equal
    sd = model.state_dict()
    frozen = roles.names(Role.FROZEN)
    assert [_base_key(k) for k in frozen] == list(before)
    assert all(torch.equal(sd[k], before[_base_key(k)]) for k in frozen)
    params = dict(model.named_parameters())
    assert all(not params[k].requires_grad for k in frozen if k in params)
    assert all(k.startswith("base_model.model.classifier.modules_to_save.default.") or
               ("lora_" in k or "ia3_" in k) for k in adapters)


def test_lora_starts_as_the_base_model():
    base = _vit()
    x = _images()
    expected = forward_logits(base.eval(), x)
    torch.manual_seed(0)
    model = apply_peft(base, PeftConfig(type="lora", r=4, alpha=8.0))
    assert torch.allclose(forward_logits(model.eval(), x), expected, atol=1e-6)  # B = 0
    layer = model.base_model.model.vit.layers[0].attention.q_proj
    assert layer.scaling["default"] == 2.0  # alpha / r
    assert layer.lora_A["default"].weight.shape == (4, 32) and not layer.lora_B["default"].weight.any()


def test_prompt_tuning_bert():
    cfg = PeftConfig(type="prompt_tuning", num_virtual_tokens=4)
    model, before = _prepare(lambda: _bert(length=20), cfg)
    assert isinstance(model, peft.PeftModelForSequenceClassification)
    logits = forward_logits(model, _tokens(length=16))  # 16 tokens + 4 virtual ones fit 20 positions
    assert logits.shape == (4, 3)
    adapters = adapter_state(model)
    assert sorted(adapters) == ["base_model.classifier.modules_to_save.default.bias",
                                "base_model.classifier.modules_to_save.default.weight",
                                "prompt_encoder.default.embedding.weight"]
    assert _numel(adapters) == 4 * 32 + BERT_HEAD
    roles = assign_roles(model)
    assert set(roles.names(Role.SHARED)) == set(adapters)
    # PeftModel keeps a second reference to the frozen word embeddings: frozen too, never sent
    assert roles["word_embeddings.weight"] is Role.FROZEN
    assert len(roles.names(Role.FROZEN)) == len(before) + 1
    # SAMPLE_VOCAB: each virtual token starts as the embedding of some real token
    words = before["bert.embeddings.word_embeddings.weight"]
    prompt = adapters["prompt_encoder.default.embedding.weight"]
    assert all(any(torch.equal(row, w) for w in words) for row in prompt)
    assert select(model, "preset:adapter") == ["prompt_encoder.default.embedding.weight"]


def test_prompt_tuning_checks_the_positions_when_told_the_length():
    with pytest.raises(ConfigError, match=r"model\.peft\.num_virtual_tokens.*20 positions.*is 16; use at most 0"):
        apply_peft(_bert(), PeftConfig(type="prompt_tuning", num_virtual_tokens=4), sequence_length=16)
    model = apply_peft(_bert(length=20), PeftConfig(type="prompt_tuning", num_virtual_tokens=4), sequence_length=16)
    assert isinstance(model, peft.PeftModel)


def test_selectors_on_wrapped_models():
    lora, _ = _prepare(_bert, PeftConfig(type="lora", r=4))
    lora_keys = [k for k in lora.state_dict() if ".lora_A." in k or ".lora_B." in k]
    assert len(lora_keys) == 8
    assert select(lora, "preset:lora") == lora_keys == select(lora, "preset:adapter")
    roles = assign_roles(lora, [("preset:lora", Role.PRIVATE)])
    assert roles.names(Role.PRIVATE) == lora_keys
    assert roles.names(Role.SHARED) == ["base_model.model.classifier.modules_to_save.default.weight",
                                        "base_model.model.classifier.modules_to_save.default.bias"]
    head = head_parameter_names(lora)
    assert set(roles.names(Role.SHARED)) < set(head)
    projections = attention_projections(lora)
    assert [p.weight for p in projections if p.layer == 0] == [
        "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight",
        "base_model.model.bert.encoder.layer.0.attention.self.key.weight",
        "base_model.model.bert.encoder.layer.0.attention.self.value.base_layer.weight"]
    ia3, _ = _prepare(_vit, PeftConfig(type="ia3"))
    assert select(ia3, "preset:adapter") == [k for k in ia3.state_dict() if ".ia3_l." in k]
    assert len(select(ia3, "preset:adapter")) == 6 and select(ia3, "preset:lora") == []
    assert attention_projections(ia3)[0].weight == "base_model.model.vit.layers.0.attention.q_proj.base_layer.weight"


def test_explicit_targets_and_modules_to_save():
    cfg = PeftConfig(type="lora", r=2, target_modules=r".*\.(query|key)", modules_to_save=[])
    model, _ = _prepare(_bert, cfg)
    assert sorted(model.peft_config["default"].target_modules) == [
        f"bert.encoder.layer.{i}.attention.self.{k}" for i in (0, 1) for k in ("key", "query")]
    assert _numel(adapter_state(model)) == 4 * (2 * 32 + 32 * 2)  # no head: modules_to_save=[]
    # a user list uses PEFT's suffix matching; IA3 scales the inputs of the detected feed-forward outputs only
    cfg = PeftConfig(type="ia3", target_modules=["value", "output.dense"])
    model, _ = _prepare(_bert, cfg)
    config = model.peft_config["default"]
    assert sorted(config.feedforward_modules) == _two_layers("bert.encoder.layer.0.output.dense")
    assert len(config.target_modules) == 6  # value, attention.output.dense and output.dense in 2 layers
    # attention.output.dense (32 -> 32) is scaled on its output, output.dense (64 -> 32) on its input
    assert _numel(adapter_state(model)) == 2 * (32 + 32 + 64) + BERT_HEAD


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = torch.softmax(self.query(x) @ self.key(x).transpose(-1, -2), dim=-1) @ self.value(x)
        return x + self.down(torch.relu(self.up(x + attn)))


class _Custom(nn.Module):
    """A user module: attention blocks with BERT's projection names and a two-layer head."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(d), _Block(d)])
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=1))


def test_defaults_on_a_user_module():
    torch.manual_seed(0)
    lora = apply_peft(_Custom(), PeftConfig(type="lora", r=2))
    config = lora.peft_config["default"]
    assert sorted(config.target_modules) == ["blocks.0.query", "blocks.0.value", "blocks.1.query", "blocks.1.value"]
    assert config.modules_to_save == ["head"]  # the whole Sequential head trains
    assert _numel(adapter_state(lora)) == 4 * (2 * 6 + 6 * 2) + (6 * 6 + 6) + (6 * 2 + 2)
    assert forward_logits(lora, torch.randn(3, 4, 6)).shape == (3, 2)
    ia3 = apply_peft(_Custom(), PeftConfig(type="ia3"))
    assert sorted(ia3.peft_config["default"].feedforward_modules) == ["blocks.0.down", "blocks.1.down"]
    assert _numel(adapter_state(ia3)) == 2 * (6 + 6 + 12) + (6 * 6 + 6) + (6 * 2 + 2)


def test_type_none_returns_the_model_itself():
    model = _mlp()
    assert apply_peft(model, PeftConfig()) is model
    assert apply_peft(model, None) is model


def test_adapter_initialisation_depends_only_on_the_torch_seed():
    def adapters(seed: int, noise: int) -> dict[str, torch.Tensor]:
        random.seed(noise)
        np.random.seed(noise)
        model, _ = _prepare(_vit, PeftConfig(type="lora", r=4), seed=seed)
        return {k: v.clone() for k, v in adapter_state(model).items()}

    a, b, c = adapters(0, 1), adapters(0, 2), adapters(1, 1)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    lora_a = [k for k in a if ".lora_A." in k]
    assert all(not torch.equal(a[k], c[k]) for k in lora_a)

    torch.manual_seed(5)
    p1 = apply_peft(_bert(length=20), PeftConfig(type="prompt_tuning", num_virtual_tokens=3))
    torch.manual_seed(5)
    p2 = apply_peft(_bert(length=20), PeftConfig(type="prompt_tuning", num_virtual_tokens=3))
    key = "prompt_encoder.default.embedding.weight"
    assert torch.equal(adapter_state(p1)[key], adapter_state(p2)[key])


# ---------------------------------------------------------------------------------------------
# export and reload
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [PeftConfig(type="lora", r=4), PeftConfig(type="ia3"),
                                 PeftConfig(type="prompt_tuning", num_virtual_tokens=4)], ids=lambda c: c.type)
def test_export_and_reload_small_bert(cfg, tmp_path):
    model, _ = _prepare(lambda: _bert(length=20), cfg)
    with torch.no_grad():  # make every adapter tensor non-trivial (LoRA B and IA3 start as no-ops)
        for t in adapter_state(model).values():
            t.add_(0.1 * torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel())))
    x = _tokens()
    expected = forward_logits(model.eval(), x)
    path = export_adapter(model, tmp_path / "client_0")
    assert path == tmp_path / "client_0"
    assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
    # the same random base (seed 0); the perturbed head and adapters come from the folder
    reloaded = load_adapter(_bert(length=20), path)
    assert torch.equal(forward_logits(reloaded.eval(), x), expected)
    assert adapter_state(reloaded) == {}  # PEFT's default: a frozen adapter, for inference
    if cfg.type == "prompt_tuning":
        with pytest.raises(ValueError, match="prompt-learning adapter.*inference only"):
            load_adapter(_bert(length=20), path, is_trainable=True)
    else:
        trainable = load_adapter(_bert(length=20), path, is_trainable=True)
        assert adapter_state(trainable).keys() == adapter_state(model).keys()


def test_export_and_reload_custom_module(tmp_path):
    model, _ = _prepare(_mlp, PeftConfig(type="lora", r=2))
    with torch.no_grad():
        model.base_model.model.body[0].lora_B["default"].weight.fill_(0.5)
    x = torch.randn(3, 5)
    expected = forward_logits(model, x)
    reloaded = load_adapter(_mlp(), export_adapter(model, tmp_path / "mlp"))
    assert torch.equal(forward_logits(reloaded, x), expected)


def test_export_plain_hf_model_and_errors(tmp_path):
    vit = _vit(seed=4).eval()
    path = export_adapter(vit, tmp_path / "full")
    assert (path / "model.safetensors").is_file()
    again = build_model(ModelConfig(name="pretrained", path=str(path)), IMAGE, seed=0).eval()
    assert torch.equal(forward_logits(again, _images()), forward_logits(vit, _images()))
    with pytest.raises(TypeError, match=r"MLPClassifier.*peft\.PeftModel.*transformers\.PreTrainedModel"):
        export_adapter(_mlp(), tmp_path / "mlp")
    with pytest.raises(TypeError, match=r"expected a peft\.PeftModel.*got MLPClassifier"):
        adapter_state(_mlp())
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(_vit(), path)


# ---------------------------------------------------------------------------------------------
# configuration errors
# ---------------------------------------------------------------------------------------------


def test_unknown_target_module_names_key_value_and_examples():
    with pytest.raises(ConfigError, match=r"'model\.peft\.target_modules': got \['qkv'\].*"
                                          r"bert\.encoder\.layer\.0\.attention\.self\.query"):
        apply_peft(_bert(), PeftConfig(type="lora", target_modules=["qkv"]))
    with pytest.raises(ConfigError, match=r"target_modules': got '\.\*nothing'.*vit\.layers\.0\.attention\.q_proj"):
        apply_peft(_vit(), PeftConfig(type="ia3", target_modules=".*nothing"))
    with pytest.raises(ConfigError, match=r"target_modules.*container modules vit\.layers\.0\.attention \(ViTAtt"):
        apply_peft(_vit(), PeftConfig(type="lora", target_modules=["attention"]))
    with pytest.raises(ConfigError, match=r"'model\.peft\.modules_to_save': got \['head'\]"):
        apply_peft(_vit(), PeftConfig(type="lora", modules_to_save=["head"]))
    with pytest.raises(ConfigError, match=r"'model\.peft\.feedforward_modules': only IA3 has feed-forward"):
        PeftConfig(type="lora", feedforward_modules=["fc2"])  # rejected with the config, before any model
    with pytest.raises(ConfigError, match=r"'model\.peft\.feedforward_modules': got \['fc1'\].*none of the target"):
        apply_peft(_vit(), PeftConfig(type="ia3", feedforward_modules=["fc1"]))
    linear_only = build_model(ModelConfig(name="mlp", mlp_hidden=[]), VECTOR, 0)
    with pytest.raises(ConfigError, match=r"target_modules': got None.*no nn\.Linear outside modules_to_save"):
        apply_peft(linear_only, PeftConfig(type="lora"))


def test_prompt_tuning_needs_a_hf_text_model():
    with pytest.raises(ConfigError, match=r"'model\.peft\.type'.*text model.*ViTForImageClassification "
                                          r"\(main input 'pixel_values'\); use lora or ia3"):
        apply_peft(_vit(), PeftConfig(type="prompt_tuning"))
    with pytest.raises(ConfigError, match=r"model\.peft\.type.*got MLPClassifier"):
        apply_peft(_mlp(), PeftConfig(type="prompt_tuning"))
    with pytest.raises(ConfigError, match=r"'model\.peft\.target_modules'.*prompt tuning adapts no modules"):
        apply_peft(_bert(), PeftConfig(type="prompt_tuning", target_modules=["query"]))


def test_already_wrapped_model_is_rejected():
    model, _ = _prepare(_mlp, PeftConfig(type="lora", r=2))
    with pytest.raises(TypeError, match="already a PeftModel"):
        apply_peft(model, PeftConfig(type="lora"))


def test_frozen_tied_parameter_alias_stays_frozen():
    """assign_roles: a state-dict key aliasing a frozen parameter is frozen, not a float buffer."""
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight
    model[0].weight.requires_grad_(False)
    assert list(model.state_dict()) == ["0.weight", "1.weight"]
    assert assign_roles(model).names(Role.FROZEN) == ["0.weight", "1.weight"]


# ---------------------------------------------------------------------------------------------
# the real pre-trained MiniLM
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(minilm_path):
    cfg = ModelConfig(name="pretrained", path=minilm_path)
    info = DatasetInfo(num_classes=4, feature_shape=(32,), modality="text", vocab_size=30522)
    return lambda seed=0: build_model(cfg, info, seed=seed)


@pytest.mark.slow  # loading the real weights: about 5 s the first time
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # direct PeftModel.from_pretrained
def test_minilm_lora_trains_only_adapters_and_round_trips(minilm, tmp_path):
    model, before = _prepare(minilm, PeftConfig(type="lora", r=8))
    adapters = adapter_state(model)
    # 6 layers x (query, value) x (8*384 + 384*8)
    assert sum(t.numel() for k, t in adapters.items() if "lora_" in k) == 73_728
    assert _numel(adapters) == 73_728 + 384 * 4 + 4
    roles = assign_roles(model)
    assert set(roles.names(Role.SHARED)) == set(adapters)
    frozen = roles.names(Role.FROZEN)
    assert len(frozen) == len(before)

    start = {k: v.clone() for k, v in model.state_dict().items()}
    x = _tokens(n=8, length=32, vocab=30522)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(3):  # LoRA A gets a gradient once B is non-zero, from the second step
        opt.zero_grad()
        nn.functional.cross_entropy(forward_logits(model, x), y).backward()
        opt.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], start[k]) for k in frozen)
    assert all(not torch.equal(after[k], start[k]) for k in adapters)

    expected = forward_logits(model.eval(), x)
    path = export_adapter(model, tmp_path / "client_0")
    reloaded = load_adapter(minilm(seed=1), path)
    assert torch.equal(forward_logits(reloaded.eval(), x), expected)
    # the standard PEFT entry point reads the same folder
    direct = peft.PeftModel.from_pretrained(minilm(seed=2), str(path))
    assert torch.equal(forward_logits(direct.eval(), x), expected)
