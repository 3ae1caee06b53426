"""Local training options (train.precision, grad_accumulation, lr_schedule, warmup_steps) in the one
loop every algorithm's local training goes through (rayfed.training.Stepper)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rayfed.config import ConfigError, TrainConfig, load_config
from rayfed.training import Stepper, train_epochs

CPU = torch.device("cpu")


def _data(n=12, d=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, classes, n)


def _model(d=5, classes=3, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(d, classes)


def _weights(m):
    return [p.detach().clone() for p in m.parameters()]


def test_defaults_take_exactly_the_plain_steps():
    x, y = _data()
    cfg = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, batch_size=4, local_epochs=2, grad_clip=0.5)
    ours, ref = _model(), _model()
    train_epochs(ours, [n for n, _ in ours.named_parameters()], x, y, cfg, generator=torch.Generator().manual_seed(3),
                 device=CPU)
    # the loop as it was written before the options existed, on the same batch order
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(2):
        order = torch.randperm(len(yt), generator=g)
        for k in range(0, len(yt), 4):
            idx = order[k:k + 4]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(ref(xt[idx]), yt[idx]).backward()
            torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.5)
            opt.step()
    for a, b in zip(_weights(ours), _weights(ref)):
        assert torch.equal(a, b)


def test_accumulating_two_half_batches_is_one_full_batch_step():
    x, y = _data(n=8)
    names = ["weight", "bias"]
    acc, full = _model(), _model()
    train_epochs(acc, names, x, y, TrainConfig(optimizer="sgd", lr=0.5, batch_size=4, grad_accumulation=2),
                 generator=torch.Generator().manual_seed(0), device=CPU)
    train_epochs(full, names, x, y, TrainConfig(optimizer="sgd", lr=0.5, batch_size=8),
                 generator=torch.Generator().manual_seed(0), device=CPU)
    start = _weights(_model())
    for a, f, s in zip(_weights(acc), _weights(full), start):
        assert not torch.equal(a, s)  # it did step
        torch.testing.assert_close(a, f, rtol=1e-6, atol=1e-7)


def test_an_incomplete_accumulation_group_is_applied_by_finish():
    m = _model()
    p = list(m.parameters())
    step = Stepper(p, TrainConfig(optimizer="adam", grad_accumulation=2), lr=None, batches=3, device=CPU)
    x, y = map(torch.from_numpy, _data(n=4))
    for _ in range(3):
        with step.forward():
            loss = torch.nn.functional.cross_entropy(m(x), y)
        step.backward(loss)
    assert step.opt.state[p[0]]["step"] == 1  # batches 1+2 stepped; batch 3 waits
    step.finish()
    assert step.opt.state[p[0]]["step"] == 2


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_warm_up_then_decay_over_the_rounds_steps(schedule):
    m = _model()
    cfg = TrainConfig(optimizer="sgd", lr=1.0, lr_schedule=schedule, warmup_steps=2)
    step = Stepper(list(m.parameters()), cfg, lr=None, batches=6, device=CPU)
    x, y = map(torch.from_numpy, _data(n=4))
    lrs = []
    for _ in range(6):
        lrs.append(step.opt.param_groups[0]["lr"])
        with step.forward():
            loss = torch.nn.functional.cross_entropy(m(x), y)
        step.backward(loss)
    decay = [0.5 * (1 + math.cos(math.pi * k / 4)) if schedule == "cosine" else 1 - k / 4 for k in range(4)]
    assert lrs == pytest.approx([1 / 3, 2 / 3, *decay])


def test_bf16_autocast_trains_fp32_weights_on_cpu():
    x, y = _data(n=16)
    names = ["weight", "bias"]
    lo, hi = _model(), _model()
    a = train_epochs(lo, names, x, y, TrainConfig(precision="bf16", batch_size=4),
                     generator=torch.Generator().manual_seed(0), device=CPU)
    b = train_epochs(hi, names, x, y, TrainConfig(batch_size=4), generator=torch.Generator().manual_seed(0), device=CPU)
    assert all(p.dtype == torch.float32 for p in lo.parameters())
    assert math.isfinite(a["train_loss"]) and a["train_loss"] == pytest.approx(b["train_loss"], rel=0.05)
    assert any(not torch.equal(p, q) for p, q in zip(lo.parameters(), hi.parameters()))  # it did run in bf16


@pytest.mark.parametrize("key, value", [("grad_accumulation", 0), ("warmup_steps", -1), ("precision", "fp8"),
                                        ("lr_schedule", "step")])
def test_bad_training_options_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"train.{key}"):
        load_config(None, [f"train.{key}={value}"])
