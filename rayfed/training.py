"""Local training and evaluation loops shared by every algorithm (torch only, no Ray)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from rayfed.config import TrainConfig
from rayfed.models import forward_logits
from rayfed.models.views import named_params, set_mode

__all__ = ["batches", "evaluate", "local_steps", "make_optimizer", "only_trainable", "task_loss",
           "train_epochs", "warm_up"]


def task_loss(outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The loss the data's task implies: cross-entropy for integer labels, mean squared error for
    float (regression) targets (``(N, 1)`` outputs are matched to ``(N,)`` targets).
    """
    if torch.is_floating_point(targets):
        if outputs.dim() == targets.dim() + 1 and outputs.shape[-1] == 1:
            outputs = outputs.squeeze(-1)
        return F.mse_loss(outputs, targets.to(outputs.dtype), reduction=reduction)
    return F.cross_entropy(outputs, targets, reduction=reduction)


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig, *,
                   lr: float | None = None) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg`` over ``params`` (``lr`` overrides ``cfg.lr``).

    Over more than :data:`FOREACH_MIN_TENSORS` tensors it is the multi-tensor (``foreach``)
    implementation, which PyTorch picks by default only on GPUs: on CPU it takes bitwise the same
    steps as the per-tensor loop (tested) and saves a few tenths of a millisecond per step on a model
    of many small tensors (most of a client's step on a small transformer). Over a handful of tensors
    it is slower, so there PyTorch's default stays.
    """
    params = list(params)
    lr = cfg.lr if lr is None else lr
    foreach = True if len(params) > FOREACH_MIN_TENSORS else None
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=foreach)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay, foreach=foreach)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, foreach=foreach)


#: parameter tensors above which :func:`make_optimizer` uses the multi-tensor implementation
FOREACH_MIN_TENSORS = 8


def local_steps(num_samples: int, batch_size: int, epochs: float, max_steps: int | None = None) -> int:
    """Optimizer steps of :func:`train_epochs` on ``num_samples`` samples: ``epochs`` (may be
    fractional) of ``ceil(num_samples / batch_size)`` batches, capped at ``max_steps``.
    """
    total = math.ceil(epochs * math.ceil(num_samples / batch_size))
    return total if max_steps is None else min(total, max_steps)


def warm_up(cfg: TrainConfig) -> None:
    """Pay once, at set-up, what a process's first optimizer costs (PyTorch imports its compiler
    stack on the first ``Optimizer`` construction: about 1.5 s here), instead of in the first round,
    where it would skew the round's timing and could trip ``runtime.round_timeout_s``.
    """
    make_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *,
            generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of ``(x, y)``; shuffled with ``generator`` when one is given."""
    n = len(y)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]


@contextmanager
def only_trainable(model: torch.nn.Module, names: Iterable[str]):
    """Within the block only parameters in ``names`` require grad (others are skipped by backward)."""
    names = set(names)
    # one walk over the modules, and requires_grad_ only where it changes (both cost per client)
    saved = [(n, p, p.requires_grad) for n, p in named_params(model)]
    try:
        for n, p, was in saved:
            if was and n not in names:
                p.requires_grad_(False)
        yield [p for _, p, _ in saved if p.requires_grad]
    finally:
        for _, p, was in saved:
            if p.requires_grad != was:
                p.requires_grad_(was)


def to_tensors(x: np.ndarray, y: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(x, device=device), torch.as_tensor(y, device=device)


def train_epochs(
    model: torch.nn.Module,
    names: Iterable[str],
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    *,
    generator: torch.Generator,
    device: torch.device,
    epochs: float | None = None,
    max_steps: int | None = None,
    lr: float | None = None,
    loss_fn=None,
) -> dict[str, float]:
    """Train the parameters in ``names`` on ``(x, y)``; returns mean loss and step count.

    ``loss_fn(logits, targets) -> loss`` defaults to :func:`task_loss` (cross-entropy for integer
    labels, mean squared error for float targets); ``epochs`` defaults to
    ``cfg.local_epochs`` and may be fractional; ``max_steps`` (or ``cfg.max_steps``) caps the steps.
    """
    epochs = cfg.local_epochs if epochs is None else epochs
    max_steps = max_steps if max_steps is not None else cfg.max_steps
    loss_fn = loss_fn or task_loss
    xt, yt = to_tensors(x, y, device)
    total = local_steps(len(yt), cfg.batch_size, epochs, max_steps)
    if total <= 0 or len(yt) == 0:
        return {"train_loss": float("nan"), "steps": 0}
    set_mode(model, True)
    loss_sum, steps = 0.0, 0
    with only_trainable(model, names) as params:
        if not params:
            return {"train_loss": float("nan"), "steps": 0}
        opt = make_optimizer(params, cfg, lr=lr)
        while steps < total:
            for xb, yb in batches(xt, yt, cfg.batch_size, generator=generator):
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(forward_logits(model, xb), yb)
                loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                loss_sum += float(loss.detach())
                steps += 1
                if steps >= total:
                    break
    return {"train_loss": loss_sum / steps, "steps": steps}


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, *, device: torch.device,
             batch_size: int = 256) -> dict[str, float]:
    """Accuracy, mean loss and sample count of ``model`` on ``(x, y)``.

    For regression (float targets) only the mean squared error (``loss``) and the sample count.
    """
    set_mode(model, False)
    xt, yt = to_tensors(x, y, device)
    regression = torch.is_floating_point(yt)
    correct, loss_sum = 0, 0.0
    for xb, yb in batches(xt, yt, batch_size):
        logits = forward_logits(model, xb)
        loss_sum += float(task_loss(logits, yb, reduction="sum"))
        if not regression:
            correct += int((logits.argmax(-1) == yb).sum())
    n = len(yt)
    model.train()
    if regression:
        return {"loss": loss_sum / max(n, 1), "num_test": n}
    return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1), "correct": correct, "num_test": n}
