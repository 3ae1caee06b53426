"""FFGG: partially personalized federated learning ("fine-tuning followed by global gradient").

Mishchenko, Islamov, Gorbunov, Horváth. *Partially Personalized Federated Learning: Breaking the
Curse of Data Heterogeneity.* TMLR 2025, arXiv 2305.18285.

The parameters are split into shared ``x`` and private ``y_i`` (``algorithm.private``: the
classifier head by default; any selectors of :func:`rayfed.roles.select`). In each round a sampled
client

1. fine-tunes only ``y_i`` for ``tau`` steps with ``x`` frozen, starting from (``reinit_private``):
   ``none``, its stored ``y_i`` (warm start, the default); ``initial``, the model's initial ``y_i``
   every round; or ``normal``, a fresh draw from N(0, I) every round, which is what the authors'
   synthetic notebooks do (``w = rng.normal(size=d_w)`` before the ``tau`` inner steps;
   Rustem-Islamov/FL_representations). ``true``/``false`` are still accepted for ``initial``/``none``.
2. sends the gradient of its loss with respect to ``x`` at the fine-tuned ``y_i`` (on
   ``grad_batches`` mini-batches, or its whole training split): the paper's method.

**``local_steps = K > 1`` is this project's reading of a multi-step variant**, not an algorithm of
the paper: the client takes ``K`` steps on ``x`` (``train.optimizer``, lr ``shared_lr``) and sends
``x - x_K`` as a pseudo-gradient; with ``server_lr = 1`` and the plain SGD server this is FedAvg on
the shared part after the private fine-tuning.

The server averages the (pseudo-)gradients and steps ``x`` with its own optimizer (SGD with
momentum or Adam, state in ``ServerState.extra["server_opt"]``). ``y_i`` never leaves the client.
The asynchronous variant (``runtime.mode: async``, with the optional delay-adaptive step) and the
Byzantine-robust variant (``aggregation.rule``, e.g. bucketing then median) are runtime options
every algorithm shares; FFGG declares ``upload_kind = "gradient"`` so they act on its gradients.

Shared float buffers (e.g. BatchNorm running statistics) have no gradient, so FFGG keeps them at
the server's values; prefer LayerNorm models or mark such buffers private (``preset:norm``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import numpy as np
import torch

from rayfed.aggregate import StreamingMean
from rayfed.algorithms.base import AUX, Algorithm, ClientContext, ClientState, ClientUpdate, ServerState, to_numpy
from rayfed.config import AlgorithmConfig, require
from rayfed.errors import ConfigError
from rayfed.roles import SERVER_HELD, Role, RoleMap

__all__ = ["FFGG", "FFGGAggregator", "FFGGConfig", "server_step"]


@dataclass
class FFGGConfig(AlgorithmConfig):
    """FFGG options (the split is ``private``; local training uses the ``train`` section)."""

    name: str = "ffgg"
    private: list[str] = field(default_factory=lambda: ["preset:head"], metadata={
        "help": "selectors of the private tensors y_i (default the classifier head); e.g. ['preset:input'], "
                "['preset:lora'], or regexes"})
    tau: int = field(default=5, metadata={"help": "fine-tuning steps on the private tensors (shared ones frozen) "
                                                  "before the shared gradient; 0 = none"})
    inner_lr: Optional[float] = field(default=None, metadata={
        "help": "learning rate of the private fine-tuning (default train.lr; optimizer train.optimizer)"})
    reinit_private: Union[Literal["none", "initial", "normal"], bool] = field(default="none", metadata={
        "help": "where each round's private fine-tuning starts: none = the client's stored tensors (warm start); "
                "initial = the model's initial values; normal = a fresh N(0, I) draw, as the authors' synthetic "
                "notebooks do (true/false = initial/none)"})
    local_steps: int = field(default=1, metadata={
        "help": "K: 1 = send the gradient w.r.t. the shared tensors (the paper's FFGG); K > 1 = this project's "
                "reading of a multi-step variant: take K steps on them (train.optimizer, lr shared_lr) and "
                "send x - x_K"})
    shared_lr: Optional[float] = field(default=None, metadata={
        "help": "learning rate of the K local steps on the shared tensors (default train.lr)"})
    grad_batches: Optional[int] = field(default=1, metadata={
        "help": "local_steps=1: mini-batches (of train.batch_size) the gradient is averaged over; null = the "
                "client's whole training split (exact local gradient)"})
    server_optimizer: Literal["sgd", "adam"] = field(default="sgd", metadata={
        "help": "server optimizer stepping the shared tensors with the mean client gradient"})
    server_lr: float = field(default=1.0, metadata={"help": "server (outer) learning rate"})
    server_momentum: float = field(default=0.0, metadata={"help": "heavy-ball momentum of the sgd server"})
    server_betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={
        "help": "Adam server betas [beta1, beta2]"})
    server_eps: float = field(default=1e-8, metadata={"help": "Adam server epsilon"})
    client_weighting: Literal["uniform", "samples"] = field(default="uniform", metadata={
        "help": "mean of client gradients: uniform (the paper's objective, mean over clients) or by sample count"})

    def __post_init__(self) -> None:
        if isinstance(self.reinit_private, bool):  # the option's old form
            self.reinit_private = "initial" if self.reinit_private else "none"
        require(self.reinit_private in ("none", "initial", "normal"), "algorithm.reinit_private",
                self.reinit_private, "one of none, initial, normal")
        if not self.private:
            raise ConfigError("config key 'algorithm.private': ffgg needs at least one private selector, got []; "
                              "e.g. ['preset:head'] (or use algorithm.name=fedavg)")
        require(self.tau >= 0, "algorithm.tau", self.tau, "an integer >= 0")
        require(self.local_steps >= 1, "algorithm.local_steps", self.local_steps, "an integer >= 1")
        for k in ("inner_lr", "shared_lr"):
            v = getattr(self, k)
            if v is not None:
                require(v > 0, f"algorithm.{k}", v, "a learning rate > 0 or null")
        if self.grad_batches is not None:
            require(self.grad_batches >= 1, "algorithm.grad_batches", self.grad_batches, "an integer >= 1 or null")
        require(self.server_lr > 0, "algorithm.server_lr", self.server_lr, "a number > 0")
        require(0 <= self.server_momentum < 1, "algorithm.server_momentum", self.server_momentum, "a number in [0, 1)")
        require(len(self.server_betas) == 2 and all(0 <= b < 1 for b in self.server_betas), "algorithm.server_betas",
               self.server_betas, "two numbers in [0, 1), e.g. [0.9, 0.999]")
        require(self.server_eps > 0, "algorithm.server_eps", self.server_eps, "a number > 0")


def server_step(weights: Mapping[str, np.ndarray], grad: Mapping[str, np.ndarray], opt_state: Mapping,
                cfg: FFGGConfig) -> tuple[dict[str, np.ndarray], dict]:
    """One step of the server optimizer on the keys of ``grad``; returns new weights and state.

    SGD: ``m <- beta m + g`` (``m = g`` without momentum), ``x <- x - lr m``. Adam: the usual
    bias-corrected moments. Inputs are not modified; sums are float64, weights keep their dtype.
    """
    t = int(opt_state.get("t", 0)) + 1
    m_old, v_old = opt_state.get("m", {}), opt_state.get("v", {})
    new_w, m, v = dict(weights), dict(m_old), dict(v_old)
    b1, b2 = cfg.server_betas
    for k, g in grad.items():
        g = np.asarray(g, dtype=np.float64)
        x = np.asarray(weights[k], dtype=np.float64)
        if cfg.server_optimizer == "adam":
            m[k] = b1 * m_old.get(k, 0.0) + (1 - b1) * g
            v[k] = b2 * v_old.get(k, 0.0) + (1 - b2) * g * g
            step = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + cfg.server_eps)
        elif cfg.server_momentum:
            m[k] = cfg.server_momentum * m_old.get(k, 0.0) + g
            step = m[k]
        else:
            step = g
        new_w[k] = (x - cfg.server_lr * step).astype(np.asarray(weights[k]).dtype)
    return new_w, {"t": t, "m": m, "v": v}


class FFGGAggregator:
    """Mean of the clients' (pseudo-)gradients, then one server-optimizer step (O(model) memory)."""

    def __init__(self, state: ServerState, cfg: FFGGConfig) -> None:
        self.state, self.cfg = state, cfg
        self.mean = StreamingMean()

    def add(self, update: ClientUpdate) -> None:
        w = float(update.num_samples) if self.cfg.client_weighting == "samples" else 1.0
        self.mean.add({k: v for k, v in update.tensors.items() if not k.startswith(AUX)}, w)

    def finish(self) -> ServerState:
        s = self.state
        if self.mean.count == 0:
            return ServerState(dict(s.weights), dict(s.extra), s.round + 1)
        grad = self.mean.result()
        unknown = sorted(set(grad) - set(s.weights))
        if unknown:
            raise RuntimeError(f"ffgg received gradients for tensors the server does not hold: {unknown[:5]}")
        weights, opt = server_step(s.weights, grad, s.extra.get("server_opt", {}), self.cfg)
        return ServerState(weights, {**s.extra, "server_opt": opt}, s.round + 1)


class FFGG(Algorithm):
    """Fine-tune the private part, then send the gradient of the shared part (see module docstring)."""

    supports_multitask = False  # trains on x_train/y_train of a single task
    name = "ffgg"
    config_class = FFGGConfig
    upload_kind = "gradient"
    config: FFGGConfig

    def init_client(self, client_id: int, model: torch.nn.Module, roles: RoleMap) -> ClientState:
        state = super().init_client(client_id, model, roles)
        if self.config.reinit_private == "initial":  # the starting point every round goes back to
            state.extra["private_init"] = {k: v.clone() for k, v in state.private.items()}
        return state

    def upload_keys(self, model: torch.nn.Module, roles: RoleMap) -> list[str]:
        """Gradients of the server-held parameters (buffers have none and keep the server's values)."""
        held = set(roles.names(*SERVER_HELD))
        return [n for n, _ in model.named_parameters() if n in held]

    def aggregator(self, state: ServerState, round: int) -> FFGGAggregator:
        return FFGGAggregator(state, self.config)

    def local_update(self, ctx: ClientContext) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        from rayfed.training import train_epochs

        cfg, model, d = self.config, ctx.model, ctx.data
        private = ctx.roles.names(Role.PRIVATE)
        shared = self.upload_keys(model, ctx.roles)
        if cfg.reinit_private != "none":
            sd = model.state_dict()
            with torch.no_grad():
                if cfg.reinit_private == "initial":
                    for k, v in ctx.state.extra.get("private_init", {}).items():
                        sd[k].copy_(v)
                else:  # N(0, I) from the client's seeded generator: reproducible, fresh every round
                    for k in private:
                        sd[k].copy_(torch.randn(sd[k].shape, generator=ctx.generator, dtype=sd[k].dtype))
        metrics: dict[str, float] = {}
        if cfg.tau:
            ft = train_epochs(model, private, d.x_train, d.y_train, ctx.train, generator=ctx.generator,
                              device=ctx.device, epochs=float(cfg.tau), max_steps=cfg.tau, lr=cfg.inner_lr)
            metrics.update(finetune_loss=ft["train_loss"], finetune_steps=ft["steps"])
        if cfg.local_steps == 1:
            grads, loss = self._shared_gradient(ctx, shared)
            metrics.update(train_loss=loss, steps=metrics.get("finetune_steps", 0) + 1)
        else:
            sd = model.state_dict()
            start = {k: sd[k].detach().clone() for k in shared}
            run = train_epochs(model, shared, d.x_train, d.y_train, ctx.train, generator=ctx.generator,
                               device=ctx.device, epochs=float(cfg.local_steps), max_steps=cfg.local_steps,
                               lr=cfg.shared_lr)
            sd = model.state_dict()
            grads = {k: to_numpy(start[k] - sd[k]) for k in shared}
            with torch.no_grad():  # the model the client keeps is (x, fine-tuned y_i); x_K is not stored
                for k in shared:
                    sd[k].copy_(start[k])
            metrics.update(train_loss=run["train_loss"], steps=metrics.get("finetune_steps", 0) + run["steps"])
        metrics["grad_norm"] = float(np.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64)))
                                                 for g in grads.values())))
        return grads, metrics

    def _shared_gradient(self, ctx: ClientContext, shared: list[str]) -> tuple[dict[str, np.ndarray], float]:
        """Mean gradient of the loss w.r.t. the shared parameters over ``grad_batches`` batches."""
        from rayfed.models import forward_logits
        from rayfed.training import batches, only_trainable, task_loss, to_tensors

        model, d = ctx.model, ctx.data
        xt, yt = to_tensors(d.x_train, d.y_train, ctx.device)
        limit = self.config.grad_batches
        model.train()
        named = dict(model.named_parameters())
        with only_trainable(model, shared):
            for n in shared:
                named[n].grad = None
            total, loss_sum = 0, 0.0
            for i, (xb, yb) in enumerate(batches(xt, yt, ctx.train.batch_size, generator=ctx.generator)):
                if limit is not None and i >= limit:
                    break
                loss = task_loss(forward_logits(model, xb), yb, reduction="sum")
                loss.backward()
                total += len(yb)
                loss_sum += float(loss.detach())
            grads = {}
            for n in shared:
                g = named[n].grad
                grads[n] = to_numpy(g / max(total, 1)) if g is not None else np.zeros(tuple(named[n].shape),
                                                                                      np.float32)
                named[n].grad = None
        return grads, loss_sum / max(total, 1)


ALGORITHMS = (FFGG,)
