"""Tests for rayfed.models: builders, forward_logits and parameter-role introspection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rayfed.config import ModelConfig
from rayfed.data.info import DatasetInfo
from rayfed.errors import ConfigError
from rayfed.models import (
    AttentionProjection,
    attention_projections,
    build_model,
    forward_logits,
    head_parameter_names,
    input_layer_parameter_names,
    param_names,
)

IMAGE = DatasetInfo(10, (1, 8, 8), "image")
TEXT = DatasetInfo(3, (16,), "text", vocab_size=50)
VECTOR = DatasetInfo(4, (12,), "vector")
SMALL = {"hidden_size": 16, "num_heads": 2, "intermediate_size": 32, "num_layers": 2}


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _vit(seed: int = 0, **kw) -> nn.Module:
    return build_model(ModelConfig(name="vit", **{**SMALL, "patch_size": 2, **kw}), IMAGE, seed)


def _bert(seed: int = 0) -> nn.Module:
    return build_model(ModelConfig(name="bert", **SMALL), TEXT, seed)


def _tokens(n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, 50, (n, 16), generator=g)


# ---------------------------------------------------------------------------------------------
# build_model / forward_logits
# ---------------------------------------------------------------------------------------------


def test_vit_shape_determinism_and_mode():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    model = _vit(0)
    assert torch.equal(torch.rand(1), before), "build_model must not disturb the global RNG"
    assert model.training
    assert next(model.parameters()).device.type == "cpu"
    assert model.config.image_size == 8 and model.config.num_channels == 1 and model.config.patch_size == 2
    assert forward_logits(model, torch.randn(4, 1, 8, 8)).shape == (4, 10)
    assert _state_equal(model, _vit(0))
    assert not _state_equal(model, _vit(1))


def test_auto_picks_by_modality():
    from transformers import BertForSequenceClassification, ViTForImageClassification

    assert isinstance(build_model(ModelConfig(**SMALL), IMAGE, 0), ViTForImageClassification)
    assert isinstance(build_model(ModelConfig(**SMALL), TEXT, 0), BertForSequenceClassification)
    assert isinstance(build_model(ModelConfig(mlp_hidden=[8]), VECTOR, 0).classifier, nn.Linear)


def test_vit_rejects_bad_patch_and_nonsquare():
    with pytest.raises(ConfigError, match=r"patch size 3 does not divide the image size 8"):
        _vit(patch_size=3)
    with pytest.raises(ConfigError, match=r"square images.*H=8, W=6"):
        build_model(ModelConfig(name="vit", **SMALL), DatasetInfo(10, (1, 8, 6), "image"), 0)
    with pytest.raises(ConfigError, match=r"\[C, H, W\]"):
        build_model(ModelConfig(name="vit", **SMALL), VECTOR, 0)


def test_bert_logits_and_padding_mask():
    model = _bert().eval()
    assert model.config.vocab_size == 50 and model.config.max_position_embeddings >= 16
    x = _tokens()
    x[1, 10:] = 0  # padded tail
    x[2, :] = 0  # all padding
    logits = forward_logits(model, x)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    # the attention mask hides padding: the same row padded with more zeros (beyond pos 16
    # is impossible here, so compare a row with and without an explicit mask) differs from
    # feeding pads as ordinary tokens
    unmasked = model(input_ids=x).logits
    assert torch.allclose(logits[0], unmasked[0], atol=1e-6)  # no padding -> same
    assert not torch.allclose(logits[1], unmasked[1], atol=1e-6)  # padding masked -> differs
    # deterministic per seed
    assert _state_equal(_bert(0), _bert(0)) and not _state_equal(_bert(0), _bert(1))


def test_bert_vocab_errors():
    with pytest.raises(ConfigError, match="vocab_size"):
        build_model(ModelConfig(name="bert", **SMALL), DatasetInfo(3, (16,), "text"), 0)
    with pytest.raises(ConfigError, match=r"model.vocab_size.*>= 50"):
        build_model(ModelConfig(name="bert", vocab_size=20, **SMALL), TEXT, 0)
    big = build_model(ModelConfig(name="bert", vocab_size=80, **SMALL), TEXT, 0)
    assert big.config.vocab_size == 80


def test_mlp_on_vectors_and_images():
    model = build_model(ModelConfig(name="mlp", mlp_hidden=[8, 6]), VECTOR, 0)
    assert forward_logits(model, torch.randn(5, 12)).shape == (5, 4)
    assert _state_equal(model, build_model(ModelConfig(name="mlp", mlp_hidden=[8, 6]), VECTOR, 0))
    linear = build_model(ModelConfig(name="mlp", mlp_hidden=[]), IMAGE, 0)
    assert forward_logits(linear, torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_factory_callable_is_seeded():
    seen = []

    def factory(info: DatasetInfo) -> nn.Module:
        seen.append(info)
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, info.num_classes))

    a, b = build_model(factory, VECTOR, 3), build_model(factory, VECTOR, 3)
    assert seen == [VECTOR, VECTOR] and a.training
    assert _state_equal(a, b) and not _state_equal(a, build_model(factory, VECTOR, 4))
    assert forward_logits(a, torch.randn(2, 12)).shape == (2, 4)
    with pytest.raises(ConfigError, match="must return a torch.nn.Module"):
        build_model(lambda info: "nope", VECTOR, 0)


# ---------------------------------------------------------------------------------------------
# pretrained (local folders, offline)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _backbone_equal(saved: nn.Module, loaded: nn.Module, prefix: str) -> None:
    ss, ls = saved.state_dict(), loaded.state_dict()
    keys = [k for k in ss if k.startswith(prefix)]
    assert keys
    for k in keys:
        assert torch.equal(ss[k], ls[k]), k


def test_pretrained_bert_classifier_folder(tmp_path, offline):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(5)
    src = BertForSequenceClassification(BertConfig(
        vocab_size=60, num_labels=5, max_position_embeddings=32, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32))
    src.save_pretrained(tmp_path)
    model = build_model(ModelConfig(name="pretrained", path=str(tmp_path)), TEXT, 0)
    assert isinstance(model, BertForSequenceClassification) and model.training
    assert model.config.num_labels == 3 and model.classifier.out_features == 3  # head resized
    _backbone_equal(src, model, "bert.")
    assert next(model.parameters()).dtype == torch.float32
    assert forward_logits(model, _tokens()).shape == (4, 3)


def test_pretrained_plain_bertmodel_folder_gets_seeded_head(tmp_path, offline, capfd, caplog):
    from transformers import BertConfig, BertModel

    torch.manual_seed(6)
    src = BertModel(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=32))
    src.save_pretrained(tmp_path)
    cfg = ModelConfig(name="pretrained", path=str(tmp_path))
    a, b, c = build_model(cfg, TEXT, 0), build_model(cfg, TEXT, 0), build_model(cfg, TEXT, 1)
    for k, v in src.state_dict().items():
        assert torch.equal(v, a.state_dict()["bert." + k]), k
    assert _state_equal(a, b)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    assert forward_logits(a, _tokens()).shape == (4, 3)
    assert head_parameter_names(a) == ["classifier.weight", "classifier.bias"]
    captured = capfd.readouterr()
    assert "LOAD REPORT" not in captured.out + captured.err  # per-client noise silenced
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_pretrained_warns_on_missing_backbone_weights(tmp_path, offline, caplog):
    import json

    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(tmp_path)
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "num_hidden_layers": 2}))
    with caplog.at_level("WARNING", logger="rayfed.models.builders"):
        build_model(ModelConfig(name="pretrained", path=str(tmp_path)), TEXT, 0)
    assert "backbone weights were not in the checkpoint" in caplog.text
    assert "encoder.layer.1" in caplog.text


def test_pretrained_vit_folder(tmp_path, offline):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(7)
    src = ViTForImageClassification(ViTConfig(image_size=8, num_channels=1, patch_size=4, hidden_size=16,
                                              num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                              num_labels=2))
    src.save_pretrained(tmp_path)
    model = build_model(ModelConfig(name="pretrained", path=str(tmp_path)), IMAGE, 0)
    _backbone_equal(src, model, "vit.")
    assert forward_logits(model, torch.randn(4, 1, 8, 8)).shape == (4, 10)
    with pytest.raises(ConfigError, match="expects 1 channels"):
        build_model(ModelConfig(name="pretrained", path=str(tmp_path)), DatasetInfo(10, (3, 8, 8), "image"), 0)


def test_pretrained_rejects_mismatched_data(tmp_path, offline):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=8)).save_pretrained(tmp_path)
    cfg = ModelConfig(name="pretrained", path=str(tmp_path))
    with pytest.raises(ConfigError, match="max_position_embeddings=8"):
        build_model(cfg, TEXT, 0)
    with pytest.raises(ConfigError, match="vocab_size is 30"):
        build_model(cfg, DatasetInfo(3, (8,), "text", vocab_size=50), 0)
    with pytest.raises(ConfigError, match="modality is 'vector'"):
        build_model(cfg, VECTOR, 0)


def test_pretrained_minilm_package(offline, minilm_path):
    info = DatasetInfo(2, (32,), "text", vocab_size=30522)
    model = build_model(ModelConfig(name="pretrained", path=minilm_path), info, 0)
    assert forward_logits(model, torch.randint(1, 30522, (2, 32))).shape == (2, 2)
    assert len(attention_projections(model)) == 18


# ---------------------------------------------------------------------------------------------
# introspection
# ---------------------------------------------------------------------------------------------


def test_attention_projections_vit():
    model = _vit()
    projs = attention_projections(model)
    assert [(p.layer, p.kind) for p in projs] == [(0, "q"), (0, "k"), (0, "v"), (1, "q"), (1, "k"), (1, "v")]
    params = dict(model.named_parameters())
    for p in projs:
        assert isinstance(p, AttentionProjection)
        assert p.weight in params and p.bias in params
        assert p.weight == f"vit.layers.{p.layer}.attention.{p.kind}_proj.weight"
        assert p.module == p.weight.removesuffix(".weight")
    with pytest.raises(AttributeError):
        projs[0].layer = 3  # frozen


def test_attention_projections_bert():
    model = _bert()
    projs = attention_projections(model)
    assert len(projs) == 6
    names = {"q": "query", "k": "key", "v": "value"}
    params = dict(model.named_parameters())
    for p in projs:
        assert p.weight == f"bert.encoder.layer.{p.layer}.attention.self.{names[p.kind]}.weight"
        assert p.weight in params and p.bias in params


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(self.wq(x) @ self.wk(x).transpose(-1, -2), dim=-1)
        return x + self.out(a @ self.wv(x))


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([_Block(8) for _ in range(3)])
        self.proj_out = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.proj_out(h.mean(1))


def test_attention_projections_custom_patterns_and_errors():
    model = _Custom()
    with pytest.raises(ConfigError, match=r"no attention q/k/v projections found.*blocks\.0\.wq.*pass patterns"):
        attention_projections(model)
    projs = attention_projections(model, {"q": r"\.wq$", "k": r"\.wk$", "v": r"\.wv$"})
    assert len(projs) == 9
    assert [p.layer for p in projs] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert projs[3] == AttentionProjection(1, "q", "blocks.1.wq", "blocks.1.wq.weight", None)
    assert projs[5].bias == "blocks.1.wv.bias"
    with pytest.raises(ConfigError, match="several kinds"):
        attention_projections(model, {"q": r"\.w[qk]$", "k": r"\.wk$"})
    with pytest.raises(ConfigError, match="unknown key"):
        attention_projections(model, {"query": "wq"})
    with pytest.raises(ConfigError, match="pass patterns"):
        attention_projections(model, {"q": "nothing_here"})


def test_attention_projections_order_of_appearance_without_indices():
    model = nn.Sequential()
    model.add_module("first", _Block(4))
    model.add_module("second", _Block(4))
    projs = attention_projections(model, {"q": "wq", "v": "wv"})
    assert [(p.layer, p.kind, p.module) for p in projs] == [
        (0, "q", "first.wq"), (0, "v", "first.wv"), (1, "q", "second.wq"), (1, "v", "second.wv")]


def test_head_and_input_layer_names():
    vit, bert = _vit(), _bert()
    mlp = build_model(ModelConfig(name="mlp", mlp_hidden=[8]), VECTOR, 0)
    assert head_parameter_names(vit) == ["classifier.weight", "classifier.bias"]
    assert head_parameter_names(bert) == ["classifier.weight", "classifier.bias"]
    assert head_parameter_names(mlp) == ["classifier.weight", "classifier.bias"]
    assert input_layer_parameter_names(vit) == [
        "vit.embeddings.cls_token", "vit.embeddings.position_embeddings",
        "vit.embeddings.patch_embeddings.projection.weight", "vit.embeddings.patch_embeddings.projection.bias"]
    assert input_layer_parameter_names(bert)[0] == "bert.embeddings.word_embeddings.weight"
    assert all(n.startswith("bert.embeddings.") for n in input_layer_parameter_names(bert))
    assert input_layer_parameter_names(mlp) == ["body.0.weight", "body.0.bias"]
    custom = _Custom()
    assert head_parameter_names(custom) == ["proj_out.weight", "proj_out.bias"]  # last Linear
    assert input_layer_parameter_names(custom) == ["embed.weight", "embed.bias"]
    for m in (vit, bert, mlp, custom):
        assert set(head_parameter_names(m)) <= set(param_names(m))
        assert set(param_names(m)) == set(m.state_dict())


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_peft_lora_vit():
    import peft
    model = _vit()
    x = torch.randn(4, 1, 8, 8)
    base_logits = forward_logits(model.eval(), x)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                      modules_to_save=["classifier"]))
    logits = forward_logits(lora.eval(), x)
    assert logits.shape == (4, 10)
    assert torch.allclose(logits, base_logits, atol=1e-5)  # LoRA B starts at zero
    params = dict(lora.named_parameters())
    projs = attention_projections(lora)
    assert [(p.layer, p.kind) for p in projs] == [(0, "q"), (0, "k"), (0, "v"), (1, "q"), (1, "k"), (1, "v")]
    for p in projs:
        assert p.weight in params and p.bias in params
    assert projs[0].weight == "base_model.model.vit.layers.0.attention.q_proj.base_layer.weight"
    assert projs[1].weight == "base_model.model.vit.layers.0.attention.k_proj.weight"
    head = head_parameter_names(lora)
    assert "base_model.model.classifier.modules_to_save.default.weight" in head
    assert all(n.startswith("base_model.model.classifier.") for n in head)
    assert input_layer_parameter_names(lora)[0] == "base_model.model.vit.embeddings.cls_token"


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_peft_lora_bert_and_custom():
    import peft
    bert = peft.get_peft_model(_bert(), peft.LoraConfig(r=2, target_modules=["query", "value"]))
    assert forward_logits(bert, _tokens()).shape == (4, 3)
    assert len(attention_projections(bert)) == 6
    custom = peft.get_peft_model(_Custom(), peft.LoraConfig(r=2, target_modules=r".*\.w[qv]"))
    assert forward_logits(custom, torch.randn(2, 3, 4)).shape == (2, 5)
    projs = attention_projections(custom, {"q": r"^blocks\.\d+\.wq$", "k": r"\.wk$", "v": r"\.wv$"})
    assert projs[0].weight == "base_model.model.blocks.0.wq.base_layer.weight"
    assert projs[1].weight == "base_model.model.blocks.0.wk.weight"
    # the last Linear is the model's own output layer, not a LoRA adapter
    assert head_parameter_names(custom) == ["base_model.model.proj_out.weight", "base_model.model.proj_out.bias"]
