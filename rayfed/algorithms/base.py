"""The algorithm interface: explicit state records and a handful of hooks (torch only, no Ray).

Before the first round, on the driver: ``alg.client_specs(specs, seed)`` may refine each client's
description (depth tier, tasks, site); every client's model is built once per distinct structure
by :func:`rayfed.models.prepare.build_structure`, which calls ``alg.prepare_model`` (cut to a
depth, PEFT, exits...) and ``alg.roles``. A round, as the runtime drives it::

    server: broadcast = alg.broadcast(server_state, r); payloads = alg.payloads(server_state, ids, r)
    client: alg.load_client_model(model, roles, broadcast, payloads[id], client_state)
            tensors, metrics = alg.local_update(ctx)          # ctx.state is the client's own state
    server: agg = alg.aggregator(server_state, r); agg.add(update) for each; server_state = agg.finish()

Evaluation loads each client's model the same way and tests it on the client's own test split.
``finalize_client`` is an optional post-training stage (fine-tuning, distillation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Protocol

import numpy as np
import torch

from rayfed.aggregate import PackedTensors, StreamingMean
from rayfed.config import AlgorithmConfig, PeftConfig, TrainConfig
from rayfed.data.info import ClientData, DatasetInfo, TaskInfo
from rayfed.models.views import tensors
from rayfed.roles import SERVER_HELD, TRAINED, Role, RoleMap, assign_roles
from rayfed.tensors import SparseTensor, is_sparse, wire_nbytes

if TYPE_CHECKING:
    from rayfed.clients import ClientSpec, Structure

__all__ = [
    "Aggregator",
    "Algorithm",
    "ClientContext",
    "ClientState",
    "ClientUpdate",
    "MeanAggregator",
    "ServerState",
    "to_numpy",
]

#: Prefix for upload entries that are not model tensors (e.g. a mask or an embedding gradient).
AUX = "aux/"


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A detached CPU numpy copy (never a view of live model memory)."""
    t = t.detach()
    if t.device.type == "cpu" and not (t.is_conj() or t.is_neg()):
        return t.numpy().copy()  # one copy, without .to()'s dispatch cost (this runs per tensor per client)
    return t.to("cpu", copy=True).numpy()


def pack_numpy(named: Sequence[tuple[str, torch.Tensor]]) -> Mapping[str, np.ndarray]:
    """Detached CPU copies of tensors: a :class:`~rayfed.aggregate.PackedTensors` over one new
    buffer (one copy, one device transfer) when they share a dtype, else a dict of
    :func:`to_numpy` copies. Never a view of live model memory.
    """
    if not named:
        return {}
    dtype = named[0][1].dtype
    if len(named) == 1 or any(t.dtype != dtype or t.is_complex() for _, t in named):
        return {k: to_numpy(t) for k, t in named}
    with torch.no_grad():
        flat = torch.cat([t.detach().reshape(-1) for _, t in named]).cpu().numpy()
    layout, off = [], 0
    for k, t in named:
        layout.append((k, off, tuple(t.shape)))
        off += t.numel()
    return PackedTensors(flat, tuple(layout))


@dataclass
class ClientState:
    """Everything a client keeps between rounds; it never leaves the client's actor.

    Attributes:
        client_id: the client.
        private: its private tensors (state-dict key -> tensor).
        masks: boolean masks of its ``masked`` tensors: the positions of the shared tensor it holds,
            trains and sends (the runtime zeroes the rest when loading, and uploads only these).
        extra: anything else the algorithm keeps.
        rounds_trained: rounds this client has trained.
    """

    client_id: int
    private: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    rounds_trained: int = 0
    masks: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ServerState:
    """Everything the server keeps: its copy of the uploaded tensors and algorithm state."""

    weights: dict[str, np.ndarray] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    round: int = 0
    #: the torch device of the server's own modules (``runtime.server_device``); numpy state stays on the host
    device: str = "cpu"


@dataclass
class ClientUpdate:
    """What one client uploads after a round: only the tensors its roles allow."""

    client_id: int
    round: int
    num_samples: int
    tensors: dict[str, np.ndarray]
    metrics: dict[str, float] = field(default_factory=dict)

    def report(self) -> dict:
        """The metadata the driver records for this update: ``client_id`` and the metrics."""
        return {"client_id": self.client_id, **self.metrics}

    @property
    def nbytes(self) -> int:
        """Bytes this update puts on the wire (:func:`rayfed.tensors.wire_nbytes`: sparse tensors
        count their values and index, not their dense size).
        """
        return wire_nbytes(self.tensors)


@dataclass
class ClientContext:
    """What ``local_update`` and ``finalize_client`` work with."""

    client_id: int
    round: int
    model: torch.nn.Module
    roles: RoleMap
    data: ClientData
    train: TrainConfig
    state: ClientState
    payload: Mapping[str, np.ndarray]
    device: torch.device
    generator: torch.Generator
    num_clients: int = 1
    #: this client's description (depth tier, tasks, modalities, site)
    spec: Optional[ClientSpec] = None
    #: the data set's tasks (what each of this client's tasks predicts and how it is scored)
    tasks: Mapping[str, TaskInfo] = field(default_factory=dict)
    #: the run's number of rounds (e.g. for schedules over the run)
    num_rounds: int = 0


class Aggregator(Protocol):
    """Consumes client updates one at a time (streaming) and produces the next server state.

    ``add`` must leave the server state untouched (accumulate only); ``finish`` makes the new state.
    The runtime streams a round's updates in as they arrive and may abandon the round before
    ``finish`` (a lost quorum), so that rule keeps an abandoned round from leaving a trace.
    """

    def add(self, update: ClientUpdate) -> None: ...

    def finish(self) -> ServerState: ...


class MeanAggregator:
    """Sample-weighted mean of uploaded tensors (per key over the clients that sent it), with an
    optional server learning rate and momentum: ``w <- w + lr * m`` where ``m <- beta*m + (mean - w)``.
    Memory is O(model) whatever the number of clients.
    """

    def __init__(self, state: ServerState, *, server_lr: float = 1.0, server_momentum: float = 0.0):
        self.state = state
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self.mean = StreamingMean()

    def add(self, update: ClientUpdate) -> None:
        t = update.tensors
        if any(k.startswith(AUX) for k in t):  # else as is: a packed upload keeps its fast path
            t = {k: v for k, v in t.items() if not k.startswith(AUX)}
        self.mean.add(t, float(update.num_samples))

    def finish(self) -> ServerState:
        s = self.state
        if self.mean.count == 0:
            return ServerState(dict(s.weights), dict(s.extra), s.round + 1)
        # a coordinate no client held (sparse uploads) keeps its value
        avg = self.mean.result(fallback=s.weights)
        weights = dict(s.weights)
        extra = dict(s.extra)
        plain = self.server_lr == 1.0 and self.server_momentum == 0.0
        mom = dict(extra.get("server_momentum", {}))
        for k, v in avg.items():
            if plain:
                weights[k] = v
                continue
            delta = v.astype(np.float64) - weights[k]
            if self.server_momentum:
                delta = self.server_momentum * mom.get(k, 0.0) + delta
                mom[k] = delta
            weights[k] = (weights[k] + self.server_lr * delta).astype(weights[k].dtype)
        if self.server_momentum:
            extra["server_momentum"] = mom
        return ServerState(weights, extra, s.round + 1)


class Algorithm:
    """Base class: FedAvg-shaped defaults that subclasses override hook by hook.

    Subclasses set ``name`` and ``config_class`` and are registered with
    :func:`rayfed.algorithms.register_algorithm`.
    """

    name: ClassVar[str] = "base"
    config_class: ClassVar[type[AlgorithmConfig]] = AlgorithmConfig
    #: What the uploaded shared tensors are: ``"weights"`` (new values of the server's weights,
    #: FedAvg-style) or ``"gradient"`` (a step direction the server's aggregator applies, e.g.
    #: FFGG). Robust aggregation, simulated attacks and asynchronous staleness handling work on
    #: updates: ``weights - server weights`` for the first kind, the tensors as sent for the second.
    upload_kind: ClassVar[str] = "weights"
    #: Whether the method trains multi-task models (data with several tasks, or tasks with several
    #: inputs); the base hooks do, through :func:`rayfed.training.train_client`.
    supports_multitask: ClassVar[bool] = True

    def __init__(self, config: AlgorithmConfig | None = None) -> None:
        self.config = config if config is not None else self.config_class(name=self.name)

    # -- clients and their models ---------------------------------------------------------------
    def client_specs(self, specs: dict[int, ClientSpec], seed: int) -> dict[int, ClientSpec]:
        """Refine the clients' descriptions made from the config and the data (e.g. give each a
        depth tier from the algorithm's own options); default: as given. Runs once, on the driver.
        """
        return specs

    def prepare_model(self, model: torch.nn.Module, structure: Structure, peft: Optional[PeftConfig],
                      info: DatasetInfo) -> torch.nn.Module:
        """Shape a freshly built model for one client structure; return it (it may be a new object).

        The default keeps the structure's task heads and encoders, cuts the model to its depth tier
        and wraps it with HF PEFT when ``model.peft`` is set
        (:func:`rayfed.models.prepare.standard_preparation`). Override to add modules (exits,
        adapters) or wrap differently; runs under an RNG seeded by the run's seed, identically in
        every process, and before the role rules are applied.
        """
        from rayfed.models.prepare import standard_preparation

        return standard_preparation(model, structure, peft, info)

    # -- roles ---------------------------------------------------------------------------------
    def role_rules(self) -> list[tuple[str, Role]]:
        """``(selector, role)`` rules applied over the default role (see :func:`assign_roles`):
        ``algorithm.private`` selectors, then ``algorithm.frozen`` ones.
        """
        return ([(s, Role.PRIVATE) for s in getattr(self.config, "private", [])]
                + [(s, Role.FROZEN) for s in getattr(self.config, "frozen", [])])

    def default_role(self) -> Role:
        return Role.SHARED

    def roles(self, model: torch.nn.Module) -> RoleMap:
        return assign_roles(model, self.role_rules(), default=self.default_role())

    # -- server --------------------------------------------------------------------------------
    def init_server(self, model: torch.nn.Module, roles: RoleMap, client_sizes: Mapping[int, int],
                    seed: int) -> ServerState:
        sd = tensors(model)
        keys = roles.names(*SERVER_HELD)
        return ServerState({k: to_numpy(sd[k]) for k in keys},
                           {"client_sizes": dict(client_sizes)}, 0)

    def broadcast(self, state: ServerState, round: int) -> dict[str, np.ndarray]:
        """Tensors sent to every sampled client (one object-store copy per round)."""
        return state.weights

    def payloads(self, state: ServerState, client_ids: list[int], round: int,
                 ) -> dict[int, dict[str, np.ndarray]]:
        """Per-client tensors (e.g. generated attention); default none."""
        return {}

    def aggregator(self, state: ServerState, round: int) -> Aggregator:
        return MeanAggregator(state, server_lr=getattr(self.config, "server_lr", 1.0),
                              server_momentum=getattr(self.config, "server_momentum", 0.0))

    # -- client --------------------------------------------------------------------------------
    def init_client(self, client_id: int, model: torch.nn.Module, roles: RoleMap) -> ClientState:
        """A new client's state: its private tensors start from the common initial model."""
        sd = tensors(model)
        return ClientState(client_id, {k: sd[k].detach().clone() for k in roles.names(Role.PRIVATE)})

    def load_client_model(self, model: torch.nn.Module, roles: RoleMap,
                          broadcast: Mapping[str, np.ndarray], payload: Mapping[str, np.ndarray],
                          state: ClientState) -> None:
        """Write server tensors, then per-client tensors, then private state into ``model``; a
        ``masked`` tensor is then zeroed off the client's mask. A sparse value (e.g. a client's
        masked slice) is written with zeros off its positions.
        """
        sd = tensors(model)
        with torch.no_grad():
            for src in (broadcast, payload):
                for k, v in src.items():
                    if k in sd:
                        sd[k].copy_(torch.from_numpy(v.to_dense() if is_sparse(v) else np.asarray(v)))
            for k, v in state.private.items():
                sd[k].copy_(v)
            for k, m in state.masks.items():
                sd[k].mul_(m.to(sd[k].dtype))

    def trained_names(self, roles: RoleMap) -> list[str]:
        """Parameters a client trains in ``local_update`` by default."""
        return roles.names(*TRAINED)

    def local_update(self, ctx: ClientContext) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Train locally; return the tensors to upload and metrics. Default: train every trainable
        tensor for ``train.local_epochs`` and upload the shared ones.
        """
        from rayfed.training import train_client

        metrics = train_client(ctx.model, self.trained_names(ctx.roles), ctx.data, ctx.train, infos=ctx.tasks,
                               generator=ctx.generator, device=ctx.device)
        return self.upload(ctx), metrics

    #: names of ``aux/`` entries (without the prefix) this method's uploads may carry, besides model
    #: tensors; the server refuses any other ``aux/`` entry
    aux_uploads: ClassVar[frozenset[str]] = frozenset()

    def upload_keys(self, model: torch.nn.Module, roles: RoleMap) -> list[str]:
        """The model tensors :meth:`upload` sends for a model of these roles: the server checks that
        every update holds exactly these (and refuses any other name). Default: the server-held ones.
        """
        return roles.names(*SERVER_HELD)

    def upload(self, ctx: ClientContext) -> Mapping[str, Any]:
        """Copies of the server-held (shared, masked, tiered) tensors: one buffer when they share a
        dtype; a masked tensor with a mask in the client's state goes as a
        :class:`~rayfed.tensors.SparseTensor` of its mask's positions only.
        """
        sd = tensors(ctx.model)
        names = ctx.roles.names(*SERVER_HELD)
        masks = ctx.state.masks
        if not masks:
            return pack_numpy([(k, sd[k]) for k in names])
        out: dict[str, Any] = dict(pack_numpy([(k, sd[k]) for k in names if k not in masks]))
        for k in names:
            if k in masks:
                out[k] = SparseTensor.from_dense(to_numpy(sd[k]), to_numpy(masks[k]).astype(bool))
        return out

    def save_client_state(self, ctx: ClientContext) -> None:
        """After training: keep the private tensors in the client's state."""
        names = ctx.roles.names(Role.PRIVATE)
        if not names:  # nothing private (e.g. FedAvg): skip the state_dict() walk
            return
        sd = tensors(ctx.model)
        for k in names:
            ctx.state.private[k] = sd[k].detach().clone()

    def evaluate_client(self, ctx: ClientContext) -> dict[str, float]:
        """Test the loaded personalized model on the client's own test split (accuracy, loss,
        correct, num_test).
        """
        from rayfed.training import evaluate_data

        return evaluate_data(ctx.model, ctx.data, infos=ctx.tasks, device=ctx.device)

    has_finalize: ClassVar[bool] = False

    def finalize_client(self, ctx: ClientContext) -> dict[str, float]:
        """Optional post-training stage run once per client after the last round."""
        return {}

    # -- clients that join after training ------------------------------------------------------
    def holdout_clients(self, client_ids: Sequence[int], seed: int) -> list[int]:
        """Clients kept out of training and personalized after it (:meth:`personalize_holdout`); default none."""
        return []

    def personalize_holdout(self, state: ServerState, model: torch.nn.Module, data: ClientData,
                            train: TrainConfig, seed: int) -> dict[str, float]:
        """Personalize one held-out client from the final server state; returns its test metrics
        (``accuracy``, ``loss``, ``correct``, ``num_test`` and any others).
        """
        raise NotImplementedError(f"{type(self).__name__} does not personalize held-out clients")
