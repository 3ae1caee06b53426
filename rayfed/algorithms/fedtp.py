"""FedTP: hypernetwork-generated self-attention, and Personalized-T (private self-attention).

Li, Cai, Wang, Tang, Ding, Lin, Shi. *FedTP: Federated Learning by Transformer Personalization.*
IEEE TNNLS 2023, arXiv 2211.01572 (official code: zhyczy/FedTP).

**Roles.** The query/key/value projection weights of every attention layer are *generated* per
client by a hypernetwork that lives on the server (``ServerState.extra``, so inside the
``ServerActor``); their biases are shared unless ``generate_bias`` is set. Everything else is
*shared* and averaged weighted by client training-set size. Targets are resolved with
:func:`rayfed.models.attention_projections` (transformers ViT ``q_proj/k_proj/v_proj``, BERT
``query/key/value``) or, for a custom module, with ``attention_patterns``.

**Hypernetwork.** A learnable embedding per client (``embedding_dim``, default 128) feeds an MLP
trunk ``Linear(embedding_dim, hidden)`` followed by ``hypernet_layers`` x ``[ReLU, Linear(hidden,
hidden)]`` (the official code's ``n_hidden``; default 150 wide, 3 layers), then one output head
per attention layer, reshaped to that layer's Q/K/V tensors. Heads (``head``):

- ``full`` (default, the paper's form): ``Linear(hidden, numel)``; parameters ``hidden x numel``
  per layer, fine for small models but 3.2 billion for a ViT-Base-shaped target.
- ``bottleneck``: ``Linear(hidden, r, bias=False) -> Linear(r, numel)``.
- ``factorized``: per weight ``W = B + U(f) V(f)^T / sqrt(r)``, ``U`` (out x r) and ``V`` (in x r)
  generated, ``B`` a learnable base shared by all clients; ``O(hidden (in + out) r + in out)``.

``head_init="default"`` keeps PyTorch's ``nn.Linear`` initialisation (the official code);
``head_init="model"`` starts every head at the model's own initial Q/K/V (head bias or base = the
initial tensor, generation weights scaled by 0.1): use it for pre-trained models, whose attention a
random generation would destroy.

**Round.** ``payloads`` generates the sampled clients' tensors in one batched pass (no autograd
graph is kept); the client trains *all* weights with the usual ``train`` config; it uploads its
shared tensors and, for each generated tensor, ``delta = received - trained`` (the official code's
``delta_theta``; the change is taken against the generation the client trained from, which it
holds as its payload). The aggregator averages the shared tensors (never the generated ones) and,
as each update arrives, backpropagates its delta through that client's generation into the
hypernetwork: ``grad_phi += a_i n_i (d gen_i / d phi)^T delta_i``; at the end the gradient is
divided by the received clients' total ``n`` (so weights are data fractions), optionally clipped,
and one optimizer step is taken. ``a_i`` is 1 in synchronous rounds.

**Asynchronous FedTP** (``runtime.mode: async``): a stale update's delta is still the one against
the generation the client trained from (not the server's current one), and ``a_i`` is the
update's delay-adaptive step (``step_scale``, ``runtime.asynchronous.staleness_scaling``), the same
factor the runtime applies to its shared tensors. The Jacobian ``d gen_i / d phi`` is taken at the
current hypernetwork (the old one is not kept): the usual stale-gradient approximation.

**The paper's settings** (``algorithm.preset: paper``, :data:`PAPER_PRESET`): the official code's
hypernetwork optimizer and shape; keys set to other values than their defaults win. Its client
training and sampling (SGD lr 0.01, momentum 0.9, weight decay 1e-5, batch 64, one local epoch,
10% of the clients per round) are in ``rayfed/configs/fedtp_paper.yaml``, which ``rayfed run``
takes as is; :func:`paper_config` puts them over any config. The official ViT, with its fused
bias-free ``to_qkv`` projection, is ``examples/fedtp_vit.py`` (``attention_patterns: {q:
'to_qkv$'}`` makes FedTP generate the fused weight whole, as the official hypernetwork does).

**Hypernetwork optimizer (a deliberate deviation).** The paper steps the hypernetwork with SGD
(lr 0.01, momentum 0.9, weight decay 1e-3) over 1,500 rounds; that is ``preset: paper`` (or
``hypernet_optimizer=sgd hypernet_lr=0.01``). In budgets of ~20 rounds it does not personalize:
the update of a client's generation is about ``lr (1 + |f|^2) (n_i / n) delta_i``, a few percent
of its local progress per round, and the clients' trunk features start nearly parallel (cosine
~0.8), so the hypernetwork acts as one shared attention (digits, 2 classes per client: 0.32 client-mean accuracy, FedAvg
0.30); raising the SGD lr makes ``|f|`` and the generated weights grow without bound (lr 0.5:
``|f|^2`` 0.6 -> 55 in 10 rounds). AdamW (the default, lr 3e-3, decoupled weight decay 1e-3)
moves the embeddings and heads at a scale-free rate and reaches 0.98 there.

**Evaluation.** Every client's generated Q/K/V are plugged into the shared model and tested on
its own test split (``payloads`` is called with all client ids, generated in batches).

**New clients.** :func:`personalize_new_client` fits only a new client's embedding on its local
data with the hypernetwork and the shared weights frozen; ``holdout_clients=N`` keeps N clients out
of training and personalizes them this way at the end of a run.

**Personalized-T** (``personalized_t``) is the paper's "vanilla personalization": the same split,
but each client keeps its own Q/K/V in its actor's state (no hypernetwork).

Open details (our reading, configurable): "3 hidden layers" is read as the official code's
``n_hidden=3`` (four Linear layers in the trunk). The shared tensors and the hypernetwork see the
same sampled clients; the Jacobian is recomputed per client at aggregation time (at the
hypernetwork the payload came from, in synchronous rounds).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rayfed.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientUpdate,
    MeanAggregator,
    ServerState,
    to_numpy,
)
from rayfed.config import AlgorithmConfig, FederationConfig, TrainConfig, require
from rayfed.data.info import ClientData, DatasetInfo
from rayfed.errors import ConfigError
from rayfed.roles import SERVER_HELD, Role, RoleMap

__all__ = [
    "FedTP",
    "FedTPAggregator",
    "FedTPConfig",
    "GenerationTarget",
    "HyperNetwork",
    "NewClientFit",
    "PAPER_CONFIG",
    "PAPER_PRESET",
    "PersonalizedT",
    "PersonalizedTConfig",
    "generation_targets",
    "paper_config",
    "personalize_new_client",
]

HYPERNET = "hypernet"
HYPERNET_OPT = "hypernet_optimizer"
CLIENT_INDEX = "client_index"
UPDATES_PER_CLIENT = "hypernet_updates"


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------


def _check_patterns(patterns: Optional[dict[str, str]], key: str) -> None:
    if patterns is None:
        return
    bad = [k for k in patterns if k not in ("q", "k", "v")]
    if not patterns or bad:
        raise ConfigError(f"config key '{key}': expected a mapping with keys among 'q', 'k', 'v' to regexes over "
                          f"module names, got {patterns!r}; e.g. {{q: 'attn\\.wq$', k: 'attn\\.wk$', v: 'attn\\.wv$'}}")


#: ``algorithm.preset: paper``: the algorithm keys the official code (zhyczy/FedTP, ``main.py``) sets.
#: Its train and sampling keys are in ``rayfed/configs/fedtp_paper.yaml`` (see :data:`PAPER_CONFIG`).
PAPER_PRESET: dict[str, Any] = {
    "hypernet_optimizer": "sgd",     # torch.optim.SGD(hnet.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-3)
    "hypernet_lr": 0.01,             # args.lr, default and every script: 0.01
    "hypernet_momentum": 0.9,
    "hypernet_weight_decay": 1e-3,
    "hypernet_grad_clip": None,      # no clipping
    "embedding_dim": 128,            # --client_embed_size
    "hypernet_hidden": 150,          # --hyper_hid
    "hypernet_layers": 3,            # --n-hidden
    "head": "full",                  # one Linear(hidden, numel) per layer
    "head_init": "default",          # PyTorch's nn.Linear initialisation
    "generate_bias": False,          # the official ViT's fused to_qkv has no bias
    "server_lr": 1.0,                # plain FedAvg of the shared tensors, weighted by samples
    "server_momentum": 0.0,
}

#: the config file holding the paper's train and sampling keys (``rayfed run`` takes it as is)
PAPER_CONFIG = "fedtp_paper.yaml"


@dataclass
class FedTPConfig(AlgorithmConfig):
    """FedTP options (defaults: the paper's hypernetwork shape; see the module docstring)."""

    name: str = "fedtp"
    preset: Optional[Literal["paper"]] = field(default=None, metadata={
        "help": "paper: the official code's hypernetwork settings (SGD lr 0.01, momentum 0.9, weight decay 1e-3; "
                "embedding 128, trunk 150 x 3, full heads, PyTorch init), applied to every key left at its "
                "default (a key set to another value wins); its train/sampling keys are in "
                "rayfed/configs/fedtp_paper.yaml"})
    embedding_dim: int = field(default=128, metadata={"help": "client embedding size"})
    hypernet_hidden: int = field(default=150, metadata={"help": "width of the hypernetwork's MLP trunk"})
    hypernet_layers: int = field(default=3, metadata={
        "help": "hidden->hidden layers after the trunk's input layer (the official code's n_hidden)"})
    head: Literal["full", "bottleneck", "factorized"] = field(default="full", metadata={
        "help": "output head per attention layer: full Linear(hidden, numel) (paper), bottleneck "
                "hidden->r->numel, or factorized W = B + U V^T of rank r (for ViT-Base-sized models)"})
    head_rank: int = field(default=8, metadata={"help": "r of the bottleneck / factorized heads"})
    head_init: Literal["default", "model"] = field(default="default", metadata={
        "help": "default: PyTorch's nn.Linear init as in the official code; model: heads start at the model's "
                "own initial Q/K/V with small client deviations (use it for pre-trained models)"})
    generate_bias: bool = field(default=False, metadata={"help": "also generate the Q/K/V biases (else shared)"})
    attention_patterns: Optional[dict[str, str]] = field(default=None, metadata={
        "help": "regexes (keys q, k, v) over module names for custom models; None = built-in names "
                "(q_proj/k_proj/v_proj, query/key/value, q_lin/k_lin/v_lin)"})
    hypernet_optimizer: Literal["adam", "sgd"] = field(default="adam", metadata={
        "help": "optimizer of the hypernetwork and embeddings: adam (AdamW; trains in ~20 rounds) or sgd "
                "(the paper's, with hypernet_lr=0.01 over ~1,500 rounds)"})
    hypernet_lr: float = field(default=3e-3, metadata={
        "help": "hypernetwork learning rate (paper with sgd: 0.01)"})
    hypernet_momentum: float = field(default=0.9, metadata={"help": "SGD momentum of the hypernetwork (sgd only)"})
    hypernet_weight_decay: float = field(default=1e-3, metadata={
        "help": "weight decay of the hypernetwork (L2 for sgd, decoupled for adam)"})
    hypernet_grad_clip: Optional[float] = field(default=None, metadata={
        "help": "clip the hypernetwork gradient norm to this value (None = off)"})
    holdout_clients: int = field(default=0, metadata={
        "help": "keep this many (seeded) clients out of training and personalize them at the end by "
                "fitting only their embedding (reported as holdout_* metrics)"})
    personalize_epochs: float = field(default=20.0, metadata={
        "help": "epochs over a new client's training data when fitting its embedding"})
    personalize_lr: float = field(default=0.05, metadata={"help": "Adam lr when fitting a new client's embedding"})
    private: list[str] = field(default_factory=list, metadata={
        "help": "selectors of extra private tensors, e.g. ['preset:head'] (FedTP-Per in the official code)"})
    payload_batch: int = field(default=64, metadata={
        "help": "clients generated per batched hypernetwork pass (bounds the server's peak memory)"})
    server_lr: float = field(default=1.0, metadata={"help": "server step on the averaged shared tensors"})
    server_momentum: float = field(default=0.0, metadata={"help": "server momentum on the shared tensors"})

    def __post_init__(self) -> None:
        if self.preset is not None:
            if self.preset != "paper":
                raise ConfigError(f"config key 'algorithm.preset': got {self.preset!r}; valid choices: 'paper' or "
                                  "null")
            defaults = {f.name: f.default for f in fields(self)}
            for k, v in PAPER_PRESET.items():
                if getattr(self, k) == defaults[k]:  # a key given another value than its default wins
                    setattr(self, k, v)
        require(self.payload_batch >= 1, "algorithm.payload_batch", self.payload_batch, "an integer >= 1")
        require(self.embedding_dim >= 1, "algorithm.embedding_dim", self.embedding_dim, "an integer >= 1")
        require(self.hypernet_hidden >= 1, "algorithm.hypernet_hidden", self.hypernet_hidden, "an integer >= 1")
        require(self.hypernet_layers >= 0, "algorithm.hypernet_layers", self.hypernet_layers, "an integer >= 0")
        require(self.head_rank >= 1, "algorithm.head_rank", self.head_rank, "an integer >= 1")
        require(self.hypernet_lr > 0, "algorithm.hypernet_lr", self.hypernet_lr, "a learning rate > 0 (e.g. 0.003)")
        require(0 <= self.hypernet_momentum < 1, "algorithm.hypernet_momentum", self.hypernet_momentum,
               "a number in [0, 1)")
        require(self.hypernet_weight_decay >= 0, "algorithm.hypernet_weight_decay", self.hypernet_weight_decay,
               "a number >= 0")
        if self.hypernet_grad_clip is not None:
            require(self.hypernet_grad_clip > 0, "algorithm.hypernet_grad_clip", self.hypernet_grad_clip,
                   "a number > 0 or null")
        require(self.holdout_clients >= 0, "algorithm.holdout_clients", self.holdout_clients, "an integer >= 0")
        require(self.personalize_epochs > 0, "algorithm.personalize_epochs", self.personalize_epochs, "a number > 0")
        require(self.personalize_lr > 0, "algorithm.personalize_lr", self.personalize_lr, "a number > 0")
        require(self.server_lr > 0, "algorithm.server_lr", self.server_lr, "a number > 0")
        require(0 <= self.server_momentum < 1, "algorithm.server_momentum", self.server_momentum, "a number in [0, 1)")
        _check_patterns(self.attention_patterns, "algorithm.attention_patterns")


@dataclass
class PersonalizedTConfig(AlgorithmConfig):
    """Personalized-T options: which attention tensors stay private."""

    name: str = "personalized_t"
    private_bias: bool = field(default=False, metadata={"help": "also keep the Q/K/V biases private (else shared)"})
    private: list[str] = field(default_factory=list, metadata={
        "help": "selectors of extra private tensors besides Q/K/V, e.g. ['preset:head']"})
    attention_patterns: Optional[dict[str, str]] = field(default=None, metadata={
        "help": "regexes (keys q, k, v) over module names for custom models; None = built-in names"})
    server_lr: float = field(default=1.0, metadata={"help": "server step on the averaged shared tensors"})
    server_momentum: float = field(default=0.0, metadata={"help": "server momentum on the shared tensors"})

    def __post_init__(self) -> None:
        require(self.server_lr > 0, "algorithm.server_lr", self.server_lr, "a number > 0")
        require(0 <= self.server_momentum < 1, "algorithm.server_momentum", self.server_momentum, "a number in [0, 1)")
        _check_patterns(self.attention_patterns, "algorithm.attention_patterns")


def _attention_names(model: nn.Module, patterns: Optional[dict[str, str]], bias: bool) -> list[str]:
    from rayfed.models import attention_projections

    names = []
    for p in attention_projections(model, patterns):
        names.append(p.weight)
        if bias and p.bias:
            names.append(p.bias)
    return names


# ---------------------------------------------------------------------------------------------
# the hypernetwork
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationTarget:
    """One generated tensor: its state-dict key, shape and attention layer."""

    name: str
    shape: tuple[int, ...]
    layer: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def generation_targets(model: nn.Module, patterns: Optional[dict[str, str]] = None, *,
                       bias: bool = False) -> list[GenerationTarget]:
    """The tensors FedTP generates for ``model``: Q/K/V weights (and biases) per attention layer."""
    from rayfed.models import attention_projections

    params = dict(model.named_parameters())
    out = []
    for p in attention_projections(model, patterns):
        for name in (p.weight, p.bias if bias else None):
            if name:
                out.append(GenerationTarget(name, tuple(params[name].shape), p.layer))
    return out


def _layers(targets: Sequence[GenerationTarget]) -> list[list[GenerationTarget]]:
    by: dict[int, list[GenerationTarget]] = {}
    for t in targets:
        by.setdefault(t.layer, []).append(t)
    return [by[k] for k in sorted(by)]


class _FullHead(nn.Module):
    """``Linear(hidden, numel)``: the paper's head."""

    def __init__(self, hidden: int, targets: list[GenerationTarget], init: Optional[list[torch.Tensor]],
                 scale: float) -> None:
        super().__init__()
        self.targets = targets
        self.out = nn.Linear(hidden, sum(t.numel for t in targets))
        if init is not None:
            with torch.no_grad():
                self.out.weight.mul_(scale)
                self.out.bias.copy_(torch.cat([v.reshape(-1) for v in init]))

    def flat(self, f: torch.Tensor) -> torch.Tensor:
        return self.out(f)

    def forward(self, f: torch.Tensor) -> list[torch.Tensor]:
        flat = self.flat(f)
        parts = torch.split(flat, [t.numel for t in self.targets], dim=-1)
        return [p.reshape(f.shape[0], *t.shape) for p, t in zip(parts, self.targets)]


class _BottleneckHead(_FullHead):
    """``Linear(hidden, r, bias=False) -> Linear(r, numel)``."""

    def __init__(self, hidden: int, rank: int, targets: list[GenerationTarget],
                 init: Optional[list[torch.Tensor]], scale: float) -> None:
        super().__init__(rank, targets, init, scale)
        self.down = nn.Linear(hidden, rank, bias=False)

    def flat(self, f: torch.Tensor) -> torch.Tensor:
        return self.out(self.down(f))


class _FactorizedHead(nn.Module):
    """Per target: ``W = B + U(f) V(f)^T / sqrt(r)`` for matrices, ``b = B + Linear(f)`` for vectors."""

    def __init__(self, hidden: int, rank: int, targets: list[GenerationTarget],
                 init: Optional[list[torch.Tensor]], scale: float) -> None:
        super().__init__()
        self.targets = targets
        self.rank = rank
        self.base = nn.ParameterList()
        sizes = []
        for i, t in enumerate(targets):
            if init is not None:
                b = init[i].detach().clone().float()
            else:
                b = torch.empty(t.shape)
                nn.init.normal_(b, std=0.02)
            self.base.append(nn.Parameter(b))
            sizes.append((t.shape[0] + t.shape[1]) * rank if len(t.shape) == 2 else t.numel)
        self.sizes = sizes
        self.out = nn.Linear(hidden, sum(sizes))
        with torch.no_grad():
            self.out.weight.mul_(scale)
            self.out.bias.zero_()

    def forward(self, f: torch.Tensor) -> list[torch.Tensor]:
        parts = torch.split(self.out(f), self.sizes, dim=-1)
        res = []
        n, r = f.shape[0], self.rank
        for p, t, base in zip(parts, self.targets, self.base):
            if len(t.shape) == 2:
                o, i = t.shape
                u = p[:, :o * r].reshape(n, o, r)
                v = p[:, o * r:].reshape(n, i, r)
                res.append(base + torch.bmm(u, v.transpose(1, 2)) / math.sqrt(r))
            else:
                res.append(base + p.reshape(n, *t.shape))
        return res


class HyperNetwork(nn.Module):
    """Client embedding -> MLP trunk -> one head per attention layer -> that layer's Q/K/V tensors.

    Args:
        num_clients: rows of the embedding table.
        targets: the generated tensors (see :func:`generation_targets`).
        embedding_dim: client embedding size.
        hidden: trunk width.
        layers: hidden->hidden layers after the trunk's input layer.
        head: ``full``, ``bottleneck`` or ``factorized`` (see the module docstring).
        rank: r of the low-rank heads.
        init: optional initial value per target (``head_init="model"``): heads start there.
        init_scale: multiplier of the generation weights when ``init`` is given (small: clients
            start close to ``init``).

    Example:
        >>> t = [GenerationTarget("attn.q.weight", (4, 4), 0)]
        >>> hn = HyperNetwork(3, t, embedding_dim=8, hidden=16, layers=1)
        >>> hn(torch.tensor([0, 2]))["attn.q.weight"].shape
        torch.Size([2, 4, 4])
    """

    def __init__(self, num_clients: int, targets: Sequence[GenerationTarget], *, embedding_dim: int = 128,
                 hidden: int = 150, layers: int = 3, head: str = "full", rank: int = 8,
                 init: Optional[Mapping[str, torch.Tensor]] = None, init_scale: float = 0.1) -> None:
        super().__init__()
        if not targets:
            raise ConfigError("FedTP: the model has no attention projections to generate")
        self.targets = list(targets)
        self.embeddings = nn.Embedding(num_clients, embedding_dim)
        trunk: list[nn.Module] = [nn.Linear(embedding_dim, hidden)]
        for _ in range(layers):
            trunk += [nn.ReLU(), nn.Linear(hidden, hidden)]
        self.trunk = nn.Sequential(*trunk)
        heads = []
        for group in _layers(self.targets):
            start = [init[t.name] for t in group] if init is not None else None
            if head == "full":
                heads.append(_FullHead(hidden, group, start, init_scale))
            elif head == "bottleneck":
                heads.append(_BottleneckHead(hidden, rank, group, start, init_scale))
            elif head == "factorized":
                heads.append(_FactorizedHead(hidden, rank, group, start, init_scale if start is not None else 1.0))
            else:
                raise ConfigError(f"config key 'algorithm.head': got {head!r}; valid choices: 'full', 'bottleneck', "
                                  "'factorized'")
        self.heads = nn.ModuleList(heads)

    @property
    def names(self) -> list[str]:
        """Generated state-dict keys, in generation order."""
        return [t.name for group in _layers(self.targets) for t in group]

    def generate(self, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        """Generated tensors for a batch of embeddings ``(B, embedding_dim)``: name -> ``(B, *shape)``."""
        f = self.trunk(embeddings)
        out: dict[str, torch.Tensor] = {}
        for head in self.heads:
            for t, v in zip(head.targets, head(f)):
                out[t.name] = v
        return out

    def forward(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Generated tensors of the clients at rows ``index`` of the embedding table."""
        return self.generate(self.embeddings(index))


def _make_hypernet_optimizer(params, cfg: FedTPConfig) -> torch.optim.Optimizer:
    if cfg.hypernet_optimizer == "adam":
        return torch.optim.AdamW(params, lr=cfg.hypernet_lr, weight_decay=cfg.hypernet_weight_decay)
    return torch.optim.SGD(params, lr=cfg.hypernet_lr, momentum=cfg.hypernet_momentum,
                           weight_decay=cfg.hypernet_weight_decay)


# ---------------------------------------------------------------------------------------------
# the server's aggregation
# ---------------------------------------------------------------------------------------------


class FedTPAggregator:
    """Streaming FedTP aggregation: shared tensors averaged; generated tensors -> hypernetwork grads.

    Each :meth:`add` recomputes the client's generation with autograd and accumulates
    ``a_i n_i (d gen_i / d phi)^T delta_i`` into the hypernetwork's ``.grad``, where the upload's
    ``delta_i = received_i - trained_i`` (:meth:`FedTP.upload`) and ``a_i`` is its ``step_scale``
    metric (the asynchronous delay-adaptive step; 1 when absent);
    :meth:`finish` divides by the total ``n`` of the received updates, clips if asked, and takes
    one optimizer step, in place on the hypernetwork held in ``state.extra``. Memory is
    O(hypernetwork + model) whatever the number of clients.
    """

    def __init__(self, state: ServerState, config: FedTPConfig) -> None:
        self.state = state
        self.cfg = config
        self.shared = MeanAggregator(state, server_lr=config.server_lr, server_momentum=config.server_momentum)
        self.device = torch.device(state.device)  # runtime.server_device
        self.hypernet: HyperNetwork = state.extra[HYPERNET].to(self.device)
        self.names = set(self.hypernet.names)
        self.index: dict[int, int] = state.extra[CLIENT_INDEX]
        self.total = 0.0
        self.clients: list[int] = []
        self.seconds = 0.0
        self.grad_norm = float("nan")
        self.hypernet.zero_grad(set_to_none=True)

    def add(self, update: ClientUpdate) -> None:
        gen = {k: v for k, v in update.tensors.items() if k in self.names}
        rest = {k: v for k, v in update.tensors.items() if k not in self.names}
        # generated tensors never enter the mean of shared weights
        self.shared.add(ClientUpdate(update.client_id, update.round, update.num_samples, rest, update.metrics))
        if not gen:
            return
        missing = self.names - set(gen)
        if missing:
            raise ValueError(f"client {update.client_id} uploaded only some generated tensors; missing "
                             f"{sorted(missing)[:3]}")
        t0 = time.perf_counter()
        w = float(update.num_samples)
        # the delayed-update step of asynchronous runs (1 in synchronous rounds), as for the shared tensors
        scale = float(update.metrics.get("step_scale", 1.0))
        with torch.enable_grad():
            out = self.hypernet(torch.tensor([self.index[update.client_id]], device=self.device))
            outs = [out[k][0] for k in self.hypernet.names]
            # the upload is already delta = received - trained (see FedTP.upload): the generation the
            # client trained from, not the current one, which has moved on when the update is stale
            deltas = [(w * scale) * torch.tensor(np.asarray(gen[k]), dtype=o.dtype, device=o.device)
                      for o, k in zip(outs, self.hypernet.names)]
            torch.autograd.backward(outs, deltas)
        self.total += w
        self.clients.append(update.client_id)
        self.seconds += time.perf_counter() - t0

    def finish(self) -> ServerState:
        new = self.shared.finish()
        extra = dict(new.extra)
        t0 = time.perf_counter()
        if self.total > 0:
            params = [p for p in self.hypernet.parameters() if p.grad is not None]
            for p in params:
                p.grad.div_(self.total)
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            self.grad_norm = float(norm)
            if self.cfg.hypernet_grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.hypernet_grad_clip)
            opt = _make_hypernet_optimizer(self.hypernet.parameters(), self.cfg)
            if extra.get(HYPERNET_OPT):
                opt.load_state_dict(extra[HYPERNET_OPT])
            opt.step()
            extra[HYPERNET_OPT] = opt.state_dict()
            counts = dict(extra.get(UPDATES_PER_CLIENT, {}))
            for c in self.clients:
                counts[c] = counts.get(c, 0) + 1
            extra[UPDATES_PER_CLIENT] = counts
        self.hypernet.zero_grad(set_to_none=True)
        self.seconds += time.perf_counter() - t0
        return ServerState(new.weights, extra, new.round)

    def metrics(self) -> dict[str, float]:
        """Round metrics for the server's summary (``server_*`` columns)."""
        return {"hypernet_seconds": self.seconds, "hypernet_grad_norm": self.grad_norm,
                "hypernet_clients": float(len(self.clients))}


# ---------------------------------------------------------------------------------------------
# the algorithms
# ---------------------------------------------------------------------------------------------


class FedTP(Algorithm):
    """Q/K/V generated per client by a server-side hypernetwork; the rest shared (FedAvg).

    Example:
        >>> from rayfed import Federation, load_config
        >>> cfg = load_config(None, ["algorithm.name=fedtp", "algorithm.holdout_clients=2"])
        >>> result = Federation(cfg).fit()                      # doctest: +SKIP
        >>> result.summary["holdout_accuracy_mean"]             # doctest: +SKIP
    """

    supports_multitask = False  # trains on x_train/y_train of a single task
    name = "fedtp"
    config_class = FedTPConfig
    config: FedTPConfig

    def role_rules(self) -> list[tuple[Any, Role]]:
        cfg = self.config
        # extra private selectors first: Q/K/V stay generated whatever they match
        return [*super().role_rules(),
                (lambda m: _attention_names(m, cfg.attention_patterns, cfg.generate_bias), Role.GENERATED)]

    def init_server(self, model: nn.Module, roles: RoleMap, client_sizes: Mapping[int, int],
                    seed: int) -> ServerState:
        state = super().init_server(model, roles, client_sizes, seed)
        cfg = self.config
        targets = generation_targets(model, cfg.attention_patterns, bias=cfg.generate_bias)
        sd = model.state_dict()
        init = {t.name: sd[t.name].detach().clone() for t in targets} if cfg.head_init == "model" else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) + 1)
            hn = HyperNetwork(len(client_sizes), targets, embedding_dim=cfg.embedding_dim, hidden=cfg.hypernet_hidden,
                              layers=cfg.hypernet_layers, head=cfg.head, rank=cfg.head_rank, init=init)
        state.extra[HYPERNET] = hn
        state.extra[CLIENT_INDEX] = {cid: i for i, cid in enumerate(sorted(client_sizes))}
        state.extra[HYPERNET_OPT] = None
        return state

    def generate(self, state: ServerState, client_ids: Sequence[int]) -> dict[int, dict[str, torch.Tensor]]:
        """The generated tensors of ``client_ids`` (one batched pass, no autograd graph)."""
        hn: HyperNetwork = state.extra[HYPERNET].to(state.device)  # runtime.server_device
        index = state.extra[CLIENT_INDEX]
        unknown = [c for c in client_ids if c not in index]
        if unknown:
            raise KeyError(f"FedTP has no embedding for client(s) {unknown[:5]}; new clients are personalized "
                           "with rayfed.algorithms.fedtp.personalize_new_client")
        with torch.no_grad():
            out = hn(torch.tensor([index[c] for c in client_ids], dtype=torch.long, device=state.device))
        return {c: {k: v[i] for k, v in out.items()} for i, c in enumerate(client_ids)}

    def payloads(self, state: ServerState, client_ids: list[int], round: int) -> dict[int, dict[str, np.ndarray]]:
        """Each client's own generated Q/K/V (never another client's), in batches of ``payload_batch``."""
        out: dict[int, dict[str, np.ndarray]] = {}
        step = self.config.payload_batch
        for i in range(0, len(client_ids), step):
            gen = self.generate(state, client_ids[i:i + step])
            out.update({c: {k: to_numpy(v) for k, v in t.items()} for c, t in gen.items()})
        return out

    def aggregator(self, state: ServerState, round: int) -> FedTPAggregator:
        return FedTPAggregator(state, self.config)

    def upload(self, ctx: ClientContext) -> dict[str, np.ndarray]:
        """The shared tensors, and for each generated tensor its change ``received - trained``.

        The change is taken against the generation this client received (``ctx.payload``), which
        is what the hypernetwork's update needs (the official code's ``delta_theta``); in an
        asynchronous run the server's generation has moved on by the time the update arrives.
        """
        sd = ctx.model.state_dict()
        generated = set(ctx.roles.names(Role.GENERATED))
        missing = sorted(generated - set(ctx.payload))
        if missing:
            raise RuntimeError(f"client {ctx.client_id} trained without its generated tensors {missing[:3]}; the "
                               "server's payload must hold every generated tensor")
        out = {}
        for k in self.upload_keys(ctx.model, ctx.roles):
            t = to_numpy(sd[k])
            out[k] = np.asarray(ctx.payload[k], dtype=t.dtype) - t if k in generated else t
        return out

    def upload_keys(self, model: nn.Module, roles: RoleMap) -> list[str]:
        """The server-held tensors and the generated ones (sent as their change, see :meth:`upload`)."""
        return roles.names(*SERVER_HELD, Role.GENERATED)

    # -- clients kept out of training ----------------------------------------------------------
    def holdout_clients(self, client_ids: Sequence[int], seed: int) -> list[int]:
        """``holdout_clients`` clients drawn with ``seed``; they never train and are personalized at the end."""
        n = self.config.holdout_clients
        if n == 0:
            return []
        if n >= len(client_ids):
            raise ConfigError(f"config key 'algorithm.holdout_clients': got {n}, but there are only "
                              f"{len(client_ids)} clients; hold out fewer than data.num_clients")
        rng = np.random.default_rng([seed, 11])
        return sorted(int(c) for c in rng.choice(np.asarray(client_ids), size=n, replace=False))

    def personalize_holdout(self, state: ServerState, model: nn.Module, data: ClientData, train: TrainConfig,
                            seed: int) -> dict[str, float]:
        """Fit a held-out client's embedding; its test metrics, plus those of the mean embedding."""
        fit = personalize_new_client(state, model, data, epochs=self.config.personalize_epochs,
                                     lr=self.config.personalize_lr, batch_size=train.batch_size, seed=seed)
        return {"client_id": data.client_id, **fit.metrics}


class PersonalizedT(Algorithm):
    """Q/K/V private to each client (kept in its actor's state); the rest shared (FedAvg)."""

    name = "personalized_t"
    config_class = PersonalizedTConfig
    config: PersonalizedTConfig

    def role_rules(self) -> list[tuple[Any, Role]]:
        cfg = self.config
        return [*super().role_rules(),
                (lambda m: _attention_names(m, cfg.attention_patterns, cfg.private_bias), Role.PRIVATE)]


def paper_config(base: Union[str, Mapping[str, Any], None] = None,
                 overrides: Optional[Sequence[str]] = None) -> FederationConfig:
    """A FedTP run with the official code's settings over ``base``'s data, model and runtime.

    The keys of ``rayfed/configs/fedtp_paper.yaml`` (the ``paper`` preset of the hypernetwork, the
    clients' SGD, batch 64, one local epoch, 10% of the clients per round) replace those of
    ``base`` (FedTP options of ``base`` that the paper does not set, such as
    ``attention_patterns``, are kept); ``overrides`` (``a.b=value``, as ``--set``) apply last.

    Args:
        base: a YAML path or a config mapping (data, model, runtime...); None = the defaults.
        overrides: ``--set``-style overrides applied after the paper's keys.

    Example:
        >>> cfg = paper_config({"data": {"source": "digits", "num_clients": 20}}, ["rounds=50"])
        >>> cfg.algorithm.hypernet_optimizer, cfg.train.weight_decay, cfg.sample_fraction, cfg.rounds
        ('sgd', 1e-05, 0.1, 50)
    """
    from importlib import resources

    from rayfed.config import apply_overrides, from_dict, read_config_file

    data = read_config_file(base) if isinstance(base, (str, Path)) else copy.deepcopy(dict(base or {}))
    paper = read_config_file(Path(str(resources.files("rayfed") / "configs" / PAPER_CONFIG)))
    if isinstance(data.get("algorithm"), dict) and data["algorithm"].get("name", "fedtp") != "fedtp":
        del data["algorithm"]  # another method's options do not apply to FedTP
    for key, value in paper.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) \
            else copy.deepcopy(value)
    return from_dict(apply_overrides(data, list(overrides or [])))


# ---------------------------------------------------------------------------------------------
# new clients
# ---------------------------------------------------------------------------------------------


@dataclass
class NewClientFit:
    """A new client's personalization.

    Attributes:
        embedding: the fitted embedding ``(embedding_dim,)``.
        generated: its generated Q/K/V (state-dict key -> array), to load into the shared model.
        metrics: ``train_loss`` before/after; with a test split, ``accuracy``/``loss``/``correct``/
            ``num_test`` of the fitted embedding and ``mean_embedding_accuracy``/``mean_embedding_loss``
            of the starting (mean) embedding.
    """

    embedding: np.ndarray
    generated: dict[str, np.ndarray]
    metrics: dict[str, float]


class _Forward(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from rayfed.models import forward_logits

        return forward_logits(self.model, x)


def _resolve(source: Any) -> tuple[ServerState, Any]:
    if isinstance(source, ServerState):
        return source, None
    state = getattr(source, "server_state", None)
    if isinstance(state, ServerState):
        return state, getattr(source, "config", None)
    raise TypeError(f"expected a ServerState or a FederationResult of a fedtp run, got {type(source).__name__}")


def personalize_new_client(
    source: Any,
    model: Union[nn.Module, None],
    data: ClientData,
    *,
    epochs: float = 20.0,
    lr: float = 0.05,
    batch_size: int = 32,
    init: Literal["mean", "zeros"] = "mean",
    seed: int = 0,
    device: Union[str, torch.device, None] = None,
) -> NewClientFit:
    """Personalize a client that joined after training: fit only its embedding, all else frozen.

    The shared weights and the hypernetwork come from ``source``; the client's loss on its own
    training data is minimised over the embedding alone (Adam), starting from the mean embedding of
    the clients that trained (``init="mean"``). Runs wherever the client's data is.

    Args:
        source: the final :class:`ServerState` of a FedTP run, or its ``FederationResult``.
        model: a model of the run's architecture (its weights are overwritten), or None to build it
            from the result's config (``source`` must then be a ``FederationResult``).
        data: the new client's data; its test split, when not empty, is used for the reported metrics.
        epochs: passes over the training data.
        lr: Adam learning rate of the embedding.
        batch_size: mini-batch size.
        init: ``mean`` of the trained clients' embeddings, or ``zeros``.
        seed: shuffling seed.
        device: where to fit; default the run's ``runtime.device`` (``auto``: cuda when this process
            sees a GPU), or cpu for a bare ``ServerState``.

    Returns:
        A :class:`NewClientFit` (embedding, generated tensors, metrics).

    Example:
        >>> fit = personalize_new_client(result, None, new_client_data)   # doctest: +SKIP
        >>> fit.metrics["accuracy"], fit.metrics["mean_embedding_accuracy"]  # doctest: +SKIP
    """
    from rayfed.training import batches, evaluate, resolve_device

    state, run_cfg = _resolve(source)
    if HYPERNET not in state.extra:
        raise ConfigError("personalize_new_client needs the server state of a fedtp run (no hypernetwork found)")
    if model is None:
        if run_cfg is None:
            raise TypeError("pass a model of the run's architecture, or a FederationResult to build it from")
        from rayfed.data import FederatedDataset
        from rayfed.models import build_model

        info: DatasetInfo = FederatedDataset.from_config(run_cfg.data, run_cfg.seed).info
        model = build_model(run_cfg.model, info, run_cfg.seed)
    device = torch.device(device) if device is not None else \
        resolve_device(getattr(getattr(run_cfg, "runtime", None), "device", "cpu"))
    hn: HyperNetwork = copy.deepcopy(state.extra[HYPERNET]).requires_grad_(False).to(device)
    model = model.to(device)
    sd = model.state_dict()
    with torch.no_grad():
        for k, v in state.weights.items():
            if k in sd:
                sd[k].copy_(torch.tensor(np.asarray(v), device=device))
    model.requires_grad_(False)
    model.eval()  # no dropout: the embedding sees a deterministic model
    fwd = _Forward(model)

    table = hn.embeddings.weight.detach()
    trained = sorted(state.extra.get(UPDATES_PER_CLIENT, {}))
    rows = [state.extra[CLIENT_INDEX][c] for c in trained] or list(range(table.shape[0]))
    start = table[rows].mean(0) if init == "mean" else torch.zeros(table.shape[1], device=device)
    emb = start.clone().requires_grad_(True)

    def logits(e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        gen = {f"model.{k}": v[0] for k, v in hn.generate(e[None]).items()}
        return torch.func.functional_call(fwd, gen, (x,), strict=False)

    x, y = torch.as_tensor(data.x_train, device=device), torch.as_tensor(data.y_train, device=device)

    def train_loss(e: torch.Tensor) -> float:
        with torch.no_grad():
            return float(F.cross_entropy(logits(e, x), y)) if len(y) else float("nan")

    before = train_loss(emb)
    opt = torch.optim.Adam([emb], lr=lr)
    gen_rng = torch.Generator().manual_seed(int(seed))  # shuffles on the host, whatever the device
    steps = math.ceil(epochs * math.ceil(len(y) / batch_size)) if len(y) else 0
    done = 0
    while done < steps:
        for xb, yb in batches(x, y, batch_size, generator=gen_rng):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(logits(emb, xb), yb).backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    emb = emb.detach()
    metrics: dict[str, float] = {"train_loss_before": before, "train_loss": train_loss(emb), "steps": float(steps)}

    def load(e: torch.Tensor) -> dict[str, np.ndarray]:
        with torch.no_grad():
            gen = {k: v[0] for k, v in hn.generate(e[None]).items()}
            for k, v in gen.items():
                sd[k].copy_(v)
        return {k: to_numpy(v) for k, v in gen.items()}

    if data.num_test:
        load(start)
        base = evaluate(model, data.x_test, data.y_test, device=device)
        metrics.update(mean_embedding_accuracy=base["accuracy"], mean_embedding_loss=base["loss"])
    generated = load(emb)
    if data.num_test:
        metrics.update(evaluate(model, data.x_test, data.y_test, device=device))
    return NewClientFit(to_numpy(emb), generated, metrics)


ALGORITHMS = (FedTP, PersonalizedT)
