"""Parameter roles: explicit data built from selectors."""

from __future__ import annotations

import pytest
import torch

from rayfed import ConfigError, Role, assign_roles
from rayfed.algorithms import get_algorithm
from rayfed.config import ModelConfig
from rayfed.data import DatasetInfo
from rayfed.models import build_model
from rayfed.roles import select


@pytest.fixture(scope="module")
def vit():
    return build_model(ModelConfig(name="vit", hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32),
                       DatasetInfo(10, (1, 8, 8), "image"), 0)


def test_default_shared_and_rules_override_in_order(vit):
    roles = assign_roles(vit, [("preset:head", Role.PRIVATE), ("classifier.bias", Role.SHARED)])
    assert roles["classifier.weight"] is Role.PRIVATE
    assert roles["classifier.bias"] is Role.SHARED  # the later rule wins
    assert roles.names(Role.PRIVATE) == ["classifier.weight"]
    assert set(roles.counts()) == {"shared", "private"}


def test_presets_resolve_both_families(vit):
    qkv = select(vit, "preset:attention_qkv")
    assert len(qkv) == 6 and all(n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")) for n in qkv)
    bert = build_model(ModelConfig(name="bert", hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
                       DatasetInfo(3, (12,), "text", vocab_size=40), 0)
    names = select(bert, "preset:attention_qkv")
    assert [n.split(".")[-2] for n in names] == ["query", "key", "value"]
    assert select(vit, "type:LayerNorm") and all("norm" in n.lower() for n in select(vit, "type:LayerNorm"))


def test_frozen_parameters_and_integer_buffers():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    m[0].weight.requires_grad_(False)
    roles = assign_roles(m)
    assert roles["0.weight"] is Role.FROZEN
    assert roles["1.num_batches_tracked"] is Role.FROZEN
    assert roles["1.running_mean"] is Role.SHARED


def test_rule_matching_nothing_is_an_error(vit):
    with pytest.raises(ConfigError, match=r"role rule 'decoder' -> private matches no parameter; parameter "
                                          r"names look like: vit.embeddings.cls_token"):
        assign_roles(vit, [("decoder", Role.PRIVATE)])
    with pytest.raises(ConfigError, match=r"unknown role preset 'heads'; valid presets: .*head, input"):
        assign_roles(vit, [("preset:heads", Role.PRIVATE)])


def test_baseline_role_assignments(vit):
    def roles(name):
        alg = get_algorithm(name)()
        return alg.roles(vit)

    assert set(roles("fedavg").counts()) == {"shared"}
    assert set(roles("local").counts()) == {"private"}
    assert roles("fedper").names(Role.PRIVATE) == ["classifier.weight", "classifier.bias"]
    assert roles("fedrep").names(Role.PRIVATE) == ["classifier.weight", "classifier.bias"]
