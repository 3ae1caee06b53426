"""FedRep: the head trains first with the body frozen, then the body with the head frozen."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import client_context, small_config

from rayfed import ConfigError, Role
from rayfed.algorithms.fedrep import FedRepConfig
from rayfed.config import TrainConfig
from rayfed.training import local_steps, train_epochs


def test_local_epochs_split_as_the_official_code():
    # lgcollins/FedRep scripts: --local_ep 11 --local_rep_ep 1 -> 10 head epochs, then 1 body epoch
    assert FedRepConfig().epochs(TrainConfig(local_epochs=11)) == (10.0, 1.0)
    assert FedRepConfig().epochs(TrainConfig(local_epochs=5)) == (4.0, 1.0)  # the code's default --local_ep 5
    assert FedRepConfig().epochs(TrainConfig(local_epochs=1)) == (1.0, 1.0)  # the head keeps one epoch
    assert FedRepConfig(body_epochs=2.0, min_head_epochs=0.5).epochs(TrainConfig(local_epochs=2)) == (0.5, 2.0)
    assert FedRepConfig(head_epochs=3.0).epochs(TrainConfig(local_epochs=11)) == (3.0, 1.0)  # explicit wins
    for key, value in (("head_epochs", 0), ("body_epochs", 0), ("min_head_epochs", -1)):
        with pytest.raises(ConfigError, match=f"algorithm.{key}"):
            small_config(algorithm__name="fedrep", **{f"algorithm__{key}": value})


def _context(cfg, cid: int = 0):
    return client_context(cfg, cid, seed=7)


def test_head_then_body_and_never_both_at_once():
    """FedRep's round equals "train the head alone, then the body alone" bit for bit, and differs from
    training both together: a FedRep that trained head and body jointly (or in the other order) fails."""
    cfg = small_config(algorithm__name="fedrep", train__local_epochs=3, train__optimizer="sgd", train__lr=0.1,
                       train__momentum=0.0)
    alg, ctx = _context(cfg)
    head, body = ctx.roles.names(Role.PRIVATE), ctx.roles.names(Role.SHARED)
    assert head == ["classifier.weight", "classifier.bias"] and body
    start = copy.deepcopy(ctx.model)
    n = len(ctx.data.y_train)

    def reference(order):
        model, gen = copy.deepcopy(start), torch.Generator().manual_seed(7)
        for names, epochs in order:
            train_epochs(model, names, ctx.data.x_train, ctx.data.y_train, cfg.train, generator=gen,
                         device=torch.device("cpu"), epochs=epochs)
        return model.state_dict()

    tensors, metrics = alg.local_update(ctx)
    got = ctx.model.state_dict()
    sequential = reference([(head, 2.0), (body, 1.0)])  # E = 3: two head epochs, then one body epoch
    for k, v in sequential.items():
        assert torch.equal(got[k], v), k
    joint = reference([(head + body, 2.0), (body, 1.0)])
    swapped = reference([(body, 1.0), (head, 2.0)])
    assert not torch.equal(joint["classifier.weight"], got["classifier.weight"])
    assert not torch.equal(swapped["classifier.weight"], got["classifier.weight"])
    assert sorted(tensors) == sorted(body)  # only the body is uploaded
    assert metrics["head_steps"] == local_steps(n, cfg.train.batch_size, 2.0) and \
        metrics["body_steps"] == local_steps(n, cfg.train.batch_size, 1.0)
