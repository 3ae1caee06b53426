"""Local training and evaluation loops shared by every algorithm (torch only, no Ray)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from rayfed.config import TrainConfig
from rayfed.data.info import ClientData, TaskInfo
from rayfed.models import forward_logits
from rayfed.models.views import named_params, set_mode

__all__ = ["Stepper", "batches", "evaluate", "evaluate_data", "evaluate_task", "forward_task", "is_multitask",
           "local_steps", "make_optimizer", "only_trainable", "resolve_device", "task_loss", "train_client",
           "train_epochs", "warm_up"]


def task_loss(outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
              kind: str | None = None) -> torch.Tensor:
    """The loss the data's task implies: cross-entropy for integer labels, mean squared error for
    float (regression or image) targets (``(N, 1)`` outputs are matched to ``(N,)`` targets), and
    for ``kind="tokens"`` the cross-entropy of every position of ``(N, L, vocab)`` logits against
    ``(N, L)`` token ids, ignoring padding (id 0).
    """
    if kind == "tokens":
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), ignore_index=0,
                               reduction=reduction)
    if torch.is_floating_point(targets):
        if outputs.dim() == targets.dim() + 1 and outputs.shape[-1] == 1:
            outputs = outputs.squeeze(-1)
        return F.mse_loss(outputs, targets.to(outputs.dtype), reduction=reduction)
    return F.cross_entropy(outputs, targets, reduction=reduction)


def resolve_device(requested: str | None, *, key: str = "runtime.device",
                   gpus: str = "runtime.num_gpus_per_actor", auto_cuda: bool = True) -> torch.device:
    """The torch device a ``cpu | cuda | auto`` setting means in this process (``auto``: cuda when
    ``auto_cuda`` and a GPU is visible).

    Raises:
        RuntimeError: ``cuda`` asked for where no GPU is visible, naming ``key`` and the ``gpus`` key.
    """
    if requested in (None, "auto"):
        return torch.device("cuda" if auto_cuda and torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{key}='cuda' but this process sees no GPU; give the actor GPUs ({gpus}) or set "
                           f"{key}=cpu")
    return torch.device(requested)


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
        yield ({k: v[idx] for k, v in x.items()} if isinstance(x, Mapping) else x[idx]), y[idx]


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


def to_tensors(x, y: np.ndarray, device: torch.device):
    """``(x, y)`` as tensors on ``device`` (``x`` may be a mapping of modality -> array)."""
    if isinstance(x, Mapping):
        return {k: torch.as_tensor(v, device=device) for k, v in x.items()}, torch.as_tensor(y, device=device)
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
        step = Stepper(params, cfg, lr=lr, batches=total, device=device)
        while steps < total:
            for xb, yb in batches(xt, yt, cfg.batch_size, generator=generator):
                with step.forward():
                    loss = loss_fn(forward_logits(model, xb), yb)
                loss_sum += step.backward(loss)
                steps += 1
                if steps >= total:
                    break
        step.finish()
    return {"train_loss": loss_sum / steps, "steps": steps}


class Stepper:
    """One optimizer step per batch (or per ``train.grad_accumulation`` batches), with the loss
    computed under ``train.precision`` autocast and the learning rate following ``train.lr_schedule``
    over the round's ``batches``: compute each batch's loss inside ``with step.forward():`` and pass
    it to :meth:`backward`. With the defaults (fp32, no accumulation, constant rate) that is exactly
    ``zero_grad; loss.backward(); clip; step``. Call :meth:`finish` after the last batch: it applies
    the gradients of an incomplete accumulation group.
    """

    def __init__(self, params: list[torch.nn.Parameter], cfg: TrainConfig, *, lr: float | None, batches: int,
                 device: torch.device) -> None:
        self.params, self.cfg = params, cfg
        self.opt = make_optimizer(params, cfg, lr=lr)
        self.accum = cfg.grad_accumulation
        self.k = 0
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.autocast = (torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else None)
        self.scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" and device.type == "cuda" else None
        self.schedule = None
        if cfg.lr_schedule != "constant" or cfg.warmup_steps:
            total = max(1, math.ceil(batches / self.accum))
            warm = min(cfg.warmup_steps, total - 1) if total > 1 else 0

            def factor(i: int) -> float:
                if i < warm:
                    return (i + 1) / (warm + 1)
                done = (i - warm) / max(1, total - warm)
                if cfg.lr_schedule == "cosine":
                    return 0.5 * (1 + math.cos(math.pi * done))
                if cfg.lr_schedule == "linear":
                    return 1.0 - done
                return 1.0

            self.schedule = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)

    def forward(self) -> AbstractContextManager:
        """The context a batch's forward pass and loss run in (``train.precision`` autocast)."""
        return self.autocast if self.autocast is not None else nullcontext()

    def backward(self, loss: torch.Tensor) -> float:
        """Backward one batch's loss, stepping when an accumulation group is complete; returns the loss."""
        if self.k % self.accum == 0:
            self.opt.zero_grad(set_to_none=True)
        scaled = loss / self.accum if self.accum > 1 else loss
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        self.k += 1
        if self.k % self.accum == 0:
            self._step()
        return float(loss.detach())

    def finish(self) -> None:
        """Apply the gradients of batches not yet stepped on (``grad_accumulation`` > 1)."""
        if self.k % self.accum:
            self._step()

    def _step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        if self.schedule is not None:
            self.schedule.step()


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


def forward_task(model: torch.nn.Module, task: TaskInfo, x) -> torch.Tensor:
    """Outputs of ``model`` for ``task`` on the batch ``x``: a multi-task model (one taking a ``task``
    argument, e.g. :class:`~rayfed.models.multitask.MultiTaskModel`, also under PEFT) gets the task's
    name; any other model is a single-task model run with :func:`rayfed.models.forward_logits`.
    """
    if is_multitask(model):
        return model(x, task=task.name)
    return forward_logits(model, x)


def is_multitask(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a :class:`~rayfed.models.multitask.MultiTaskModel` (also under PEFT)."""
    from rayfed.models.builders import unwrap_model
    from rayfed.models.multitask import MultiTaskModel

    return isinstance(unwrap_model(model), MultiTaskModel)


def _task_batches(data: ClientData, infos: Mapping[str, TaskInfo], cfg: TrainConfig, device: torch.device,
                  generator: torch.Generator, epochs: float, max_steps: int | None):
    """One pass of a multi-task client's training: each task's batches for ``epochs`` (fractional:
    the first part of the last epoch), interleaved task by task, capped at ``max_steps``.
    """
    per_task = {}
    for name, t in data.tasks.items():
        xt, yt = to_tensors(t.x_train, t.y_train, device)
        per_task[name] = (xt, yt, local_steps(len(yt), cfg.batch_size, epochs))

    def stream(name):
        xt, yt, total = per_task[name]
        done = 0
        while done < total:
            for xb, yb in batches(xt, yt, cfg.batch_size, generator=generator):
                yield xb, yb
                done += 1
                if done >= total:
                    return

    streams = {n: stream(n) for n, (_, y, total) in per_task.items() if total > 0 and len(y)}
    steps = 0
    while streams and (max_steps is None or steps < max_steps):
        for name in list(streams):
            batch = next(streams[name], None)
            if batch is None:
                del streams[name]
                continue
            yield infos[name], batch
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return


def train_client(model: torch.nn.Module, names: Iterable[str], data: ClientData, cfg: TrainConfig, *,
                 infos: Mapping[str, TaskInfo] | None = None, generator: torch.Generator, device: torch.device,
                 epochs: float | None = None, max_steps: int | None = None, lr: float | None = None,
                 ) -> dict[str, float]:
    """Train the parameters in ``names`` on a client's data, whatever tasks it holds.

    A single-task model trains on the client's only task with :func:`train_epochs`. A multi-task
    model (:func:`is_multitask`; ``infos`` gives each task's :class:`~rayfed.data.info.TaskInfo`)
    takes every optimizer step on one batch of one task, the tasks taking turns, each for
    ``epochs`` over its own training split, with the task's own loss (:func:`task_loss`). Returns
    the mean loss and step count, and (multi-task) each task's mean loss under ``tasks``.
    """
    if not is_multitask(model):
        t = data.only_task()
        return train_epochs(model, names, t.x_train, t.y_train, cfg, generator=generator, device=device,
                            epochs=epochs, max_steps=max_steps, lr=lr)
    if infos is None:
        raise ValueError(f"client {data.client_id} holds tasks {data.task_names}: pass infos (their TaskInfo)")
    epochs = cfg.local_epochs if epochs is None else epochs
    max_steps = max_steps if max_steps is not None else cfg.max_steps
    set_mode(model, True)
    sums: dict[str, list[float]] = {n: [0.0, 0] for n in data.tasks}
    steps, total = 0, 0.0
    with only_trainable(model, names) as params:
        if not params:
            return {"train_loss": float("nan"), "steps": 0}
        planned = sum(local_steps(t.num_train, cfg.batch_size, epochs) for t in data.tasks.values())
        step = Stepper(params, cfg, lr=lr, batches=planned if max_steps is None else min(planned, max_steps),
                       device=device)
        for info, (xb, yb) in _task_batches(data, infos, cfg, device, generator, epochs, max_steps):
            with step.forward():
                loss = task_loss(forward_task(model, info, xb), yb, kind=info.target)
            value = step.backward(loss)
            sums[info.name][0] += value
            sums[info.name][1] += 1
            total += value
            steps += 1
        step.finish()
    if steps == 0:
        return {"train_loss": float("nan"), "steps": 0}
    return {"train_loss": total / steps, "steps": steps,
            "tasks": {n: {"train_loss": s / k} for n, (s, k) in sums.items() if k}}


@torch.no_grad()
def evaluate_task(model: torch.nn.Module, info: TaskInfo, x, y: np.ndarray, *, device: torch.device,
                  batch_size: int = 256) -> dict[str, float]:
    """A task's metrics on ``(x, y)``: for class targets ``accuracy``, ``loss``, ``correct`` and
    ``num_test``; for regression and image targets the mean squared error (``loss``) and
    ``num_test``; for token sequences the token ``accuracy`` over non-padding positions, ``loss``,
    ``correct`` and ``num_scored`` (the positions scored) besides ``num_test``.
    """
    set_mode(model, False)
    xt, yt = to_tensors(x, y, device)
    correct, loss_sum, scored = 0, 0.0, 0
    for xb, yb in batches(xt, yt, batch_size):
        out = forward_task(model, info, xb)
        if info.target == "tokens":
            loss_sum += float(task_loss(out, yb, reduction="sum", kind="tokens"))
            keep = yb != 0
            correct += int(((out.argmax(-1) == yb) & keep).sum())
            scored += int(keep.sum())
        else:
            loss_sum += float(task_loss(out, yb, reduction="sum"))
            if info.target == "class":
                correct += int((out.argmax(-1) == yb).sum())
    n = len(yt)
    model.train()
    if info.target in ("regression", "image"):
        values = max(n, 1) * (int(np.prod(info.target_shape)) if info.target == "image" else 1)
        return {"loss": loss_sum / values, "num_test": n}
    if info.target == "tokens":
        return {"accuracy": correct / max(scored, 1), "loss": loss_sum / max(scored, 1), "correct": correct,
                "num_scored": scored, "num_test": n}
    return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1), "correct": correct, "num_test": n}


def evaluate_data(model: torch.nn.Module, data: ClientData, *, infos: Mapping[str, TaskInfo] | None = None,
                  device: torch.device) -> dict:
    """A client's test metrics: :func:`evaluate` of its only task for a single-task model, or each
    task's :func:`evaluate_task` under ``tasks`` for a multi-task model (``infos``: the tasks'
    :class:`~rayfed.data.info.TaskInfo`).
    """
    if not is_multitask(model):
        t = data.only_task()
        return evaluate(model, t.x_test, t.y_test, device=device)
    if infos is None:
        raise ValueError(f"client {data.client_id} holds tasks {data.task_names}: pass infos (their TaskInfo)")
    return {"tasks": {n: evaluate_task(model, infos[n], t.x_test, t.y_test, device=device)
                      for n, t in data.tasks.items()}}
