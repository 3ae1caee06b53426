"""Byzantine robustness for every algorithm: robust server aggregation and SIMULATED attacks.

The maths lives in :mod:`rayfed.robust_rules` (coordinate median, trimmed mean, Krum / multi-Krum,
centered clipping, bucketing). This module wires it between the runtime and any algorithm:

* :class:`RobustAggregator` wraps an algorithm's own aggregator. It buffers the round's updates
  (robust rules cannot stream), turns each client's shared tensors into an *update* (client weights
  minus the current server weights when the algorithm uploads weights; the tensors as sent when
  it uploads gradients, see :attr:`rayfed.algorithms.Algorithm.upload_kind`), computes one robust
  consensus, and feeds the wrapped aggregator every client's update with its shared tensors
  replaced by that consensus. Any mean-like aggregator therefore applies exactly the consensus,
  with its own server learning rate, momentum or optimizer, and per-client entries it also needs
  (``aux/`` tensors, generated tensors) still arrive client by client.
* :class:`Attack` simulates Byzantine behaviour for experiments (``attack`` config section), in
  two styles:

  - *replace-style* (``sign_flip``, ``noise``, ``scale``, ``label_flip``): a seeded set of
    ``fraction`` of the clients send a perturbed version of their own update *instead of* it
    (or train on flipped labels); the other clients' updates are honest.
  - *message-adding* (``extra_sign_flip``, the attack of the FFGG paper's official code,
    Rustem-Islamov/FL_representations, "FL representations Byzantine.ipynb"): every client is
    honest, and the adversary *adds* ``floor(B f / (1 - f))`` messages to each aggregation of
    ``B`` honest updates (``f = fraction``; the official ``f = 0.25`` gives ``floor(B / 3)``),
    each ``-scale`` times the update of a different honest client of that aggregation, drawn
    with a seeded generator (``scale = 1`` in the official code). The notebook negates the exact
    gradient ``grad_x f_m(x, y_m*(x))`` of clients drawn from all ``M`` clients with every client
    taking part (``batch_size = M``); here the negated update is what the drawn client actually
    sent this round (its gradient after its own private fine-tuning), which is the same thing
    under full participation and exact local computation. :class:`AddedMessages` is the
    aggregator wrapper that adds them, ahead of a robust rule.

References:
    Blanchard, El Mhamdi, Guerraoui, Stainer. *Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent.* NeurIPS 2017 (Krum).
    Karimireddy, He, Jaggi. *Learning from History for Byzantine Robust Optimization.* ICML 2021
    (centered clipping); *Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing.*
    ICLR 2022.
    Mishchenko, Islamov, Gorbunov, Horváth. *Partially Personalized Federated Learning: Breaking
    the Curse of Data Heterogeneity.* TMLR 2025, arXiv 2305.18285 (robust FFGG).

Example:
    >>> from rayfed.config import AggregationConfig
    >>> from rayfed.algorithms.base import ClientUpdate, MeanAggregator, ServerState
    >>> state = ServerState({"w": np.zeros(1, np.float32)})
    >>> agg = RobustAggregator(MeanAggregator(state), state, AggregationConfig(rule="median"),
    ...                        kind="weights", keys=["w"], rng=np.random.default_rng(0))
    >>> for v in (1.0, 2.0, 100.0):
    ...     agg.add(ClientUpdate(0, 0, 10, {"w": np.array([v], np.float32)}))
    >>> agg.finish().weights["w"]
    array([2.], dtype=float32)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from fractions import Fraction
from typing import Any

import numpy as np

from rayfed.algorithms.base import AUX, Aggregator, ClientUpdate, ServerState
from rayfed.config import AggregationConfig, AttackConfig
from rayfed.data.info import ClientData
from rayfed.errors import ConfigError
from rayfed.robust_rules import robust_aggregate
from rayfed.tensors import is_sparse

log = logging.getLogger("rayfed")

__all__ = ["MESSAGE_ADDING_KINDS", "AddedMessages", "Attack", "RobustAggregator", "byzantine_clients", "from_update",
           "to_update", "upload_kind"]

#: attack kinds that add messages on the server instead of changing some clients' own uploads
MESSAGE_ADDING_KINDS = frozenset({"extra_sign_flip"})


def upload_kind(algorithm: Any) -> str:
    """``"weights"`` or ``"gradient"``: what an algorithm's uploaded shared tensors are."""
    kind = getattr(algorithm, "upload_kind", "weights")
    if kind not in ("weights", "gradient"):
        raise ValueError(f"{type(algorithm).__name__}.upload_kind must be 'weights' or 'gradient', got {kind!r}")
    return kind


def to_update(value: np.ndarray, base: np.ndarray | None, kind: str) -> np.ndarray:
    """The update a client's tensor stands for: ``value - base`` for weights, ``value`` otherwise
    (float64; also ``value`` when there is no base, e.g. a key the server does not hold).
    """
    v = np.asarray(value, dtype=np.float64)
    return v - np.asarray(base, dtype=np.float64) if kind == "weights" and base is not None else v


def from_update(update: np.ndarray, base: np.ndarray | None, kind: str, dtype: np.dtype) -> np.ndarray:
    """Inverse of :func:`to_update`, cast to ``dtype``."""
    u = np.asarray(update, dtype=np.float64)
    out = np.asarray(base, dtype=np.float64) + u if kind == "weights" and base is not None else u
    return out.astype(dtype, copy=False)


class RobustAggregator:
    """Buffer a round's updates, replace their shared tensors by a robust consensus, then let the
    algorithm's own aggregator finish the step (see the module docstring).

    Args:
        inner: the algorithm's aggregator for this round.
        state: the server state the round started from (its weights are the base of updates; its
            ``device`` is where the rule runs).
        cfg: the ``aggregation`` section (rule, bucketing and the rule's options).
        kind: the algorithm's :attr:`~rayfed.algorithms.Algorithm.upload_kind`.
        keys: names of the tensors aggregated robustly (the shared ones); other uploaded entries
            (``aux/``, generated, partially held keys) pass through per client.
        rng: seeded generator for bucketing.
    """

    def __init__(self, inner: Aggregator, state: ServerState, cfg: AggregationConfig, *, kind: str,
                 keys: Iterable[str], rng: np.random.Generator) -> None:
        self.inner, self.state, self.cfg, self.kind, self.rng = inner, state, cfg, kind, rng
        self.keys = list(keys)
        self.updates: list[ClientUpdate] = []
        self._warned = False

    def add(self, update: ClientUpdate) -> None:
        self.updates.append(update)

    def consensus(self) -> dict[str, np.ndarray]:
        """The robust aggregate of the buffered updates over the keys every one of them holds, computed
        on the server's device (``ServerState.device``, i.e. ``runtime.server_device``).
        """
        ups = self.updates
        # sparse (masked) tensors differ in support between clients, so whole-vector rules do not apply
        # to them: they pass through to the inner aggregator (a per-coordinate holder mean)
        sparse = {k for u in ups for k, v in u.tensors.items() if is_sparse(v)}
        if sparse and not self._warned:
            log.warning("aggregation.rule=%r: the masked (sparse) tensors %s are averaged over their holders, not "
                        "robustly; the dense shared tensors are aggregated robustly", self.cfg.rule, sorted(sparse)[:3])
            self._warned = True
        keys = [k for k in self.keys if not k.startswith(AUX) and k not in sparse and all(k in u.tensors for u in ups)]
        if not ups or not keys:
            return {}
        base = self.state.weights
        vectors = [{k: to_update(u.tensors[k], base.get(k), self.kind) for k in keys} for u in ups]
        c = self.cfg
        trim: float | int = int(c.trim) if c.trim >= 1 else float(c.trim)
        try:
            return robust_aggregate(vectors, c.rule, trim=trim, num_byzantine=c.num_byzantine, multi=c.multi,
                                    tau=c.tau, iters=c.iters, bucket_size=c.bucket_size, rng=self.rng,
                                    device=self.state.device)
        except ValueError as e:
            raise ValueError(f"aggregation.rule={c.rule!r} (bucket_size={c.bucket_size}) failed on {len(ups)} "
                             f"updates: {e}") from e

    def finish(self) -> ServerState:
        agreed = self.consensus()
        base = self.state.weights
        for u in self.updates:
            tensors = dict(u.tensors)
            for k, v in agreed.items():
                tensors[k] = from_update(v, base.get(k), self.kind, np.asarray(u.tensors[k]).dtype)
            self.inner.add(replace(u, tensors=tensors))
        return self.inner.finish()

    def metrics(self) -> dict[str, float]:
        """The wrapped aggregator's server metrics, if it reports any."""
        inner = getattr(self.inner, "metrics", None)
        return dict(inner()) if callable(inner) else {}


class AddedMessages:
    """Aggregator wrapper for a message-adding attack: buffers the honest updates, then feeds
    ``inner`` (a :class:`RobustAggregator` or the algorithm's own aggregator) those updates
    followed by the adversary's messages (:meth:`Attack.added_messages`).

    Args:
        inner: the aggregator the messages reach (put this wrapper outside a robust rule).
        attack: the attack (``adds_messages`` must be true).
        state: the server state the round started from (the base of weight updates).
        keys: the tensors attacked (the shared ones).
        round: the round.
        step: the server's aggregation counter.

    Example:
        >>> from rayfed.algorithms.base import MeanAggregator
        >>> state = ServerState({"w": np.zeros(1, np.float32)})
        >>> attack = Attack(AttackConfig(fraction=0.25, kind="extra_sign_flip"), 3, 0, 2, "gradient", on_server=True)
        >>> agg = AddedMessages(MeanAggregator(state), attack, state, keys=["w"], round=0, step=0)
        >>> for i, v in enumerate((1.0, 2.0, 3.0)):
        ...     agg.add(ClientUpdate(i, 0, 1, {"w": np.array([v], np.float32)}))
        >>> agg.finish().weights["w"]   # (1 + 2 + 3 - 1) / 4: client 0's update came back negated
        array([1.25], dtype=float32)
    """

    def __init__(self, inner: Aggregator, attack: Attack, state: ServerState, *, keys: Iterable[str], round: int,
                 step: int) -> None:
        if not attack.adds_messages:
            raise ValueError(f"attack.kind {attack.cfg.kind!r} does not add messages")
        self.inner, self.attack, self.state = inner, attack, state
        self.keys, self.round, self.step = list(keys), round, step
        self.updates: list[ClientUpdate] = []
        self.added = 0

    def add(self, update: ClientUpdate) -> None:
        self.updates.append(update)

    def finish(self) -> ServerState:
        extra = self.attack.added_messages(self.updates, self.state.weights, self.keys, self.round, self.step)
        self.added = len(extra)
        for u in [*self.updates, *extra]:
            self.inner.add(u)
        return self.inner.finish()

    def metrics(self) -> dict[str, float]:
        """The inner aggregator's server metrics and ``byzantine_messages`` (messages added)."""
        inner = getattr(self.inner, "metrics", None)
        return {**(dict(inner()) if callable(inner) else {}), "byzantine_messages": float(self.added)}


def byzantine_clients(num_clients: int, cfg: AttackConfig, seed: int) -> frozenset[int]:
    """The simulated Byzantine clients: ``cfg.clients`` when given, else a seeded choice of
    ``round(fraction * num_clients)`` clients (at least one when ``fraction > 0``). None for a
    message-adding attack (:data:`MESSAGE_ADDING_KINDS`): its clients are all honest.
    """
    if cfg.kind in MESSAGE_ADDING_KINDS:
        if cfg.clients:
            raise ConfigError(f"config key 'attack.clients': attack.kind {cfg.kind!r} adds messages and makes no "
                              f"client Byzantine, got clients {list(cfg.clients)}; set attack.fraction (the share "
                              "of Byzantine messages, 0.25 = floor(B/3) extra per B honest updates) instead")
        return frozenset()
    if cfg.clients:
        return frozenset(int(c) for c in cfg.clients)
    if cfg.fraction <= 0:
        return frozenset()
    m = min(num_clients, max(1, math.floor(cfg.fraction * num_clients + 0.5)))
    rng = np.random.default_rng([seed % 2**63, 0xBAD])
    return frozenset(int(c) for c in rng.choice(num_clients, size=m, replace=False))


class Attack:
    """SIMULATED Byzantine behaviour of some clients (for robustness experiments only).

    Args:
        cfg: the ``attack`` section.
        num_clients: number of clients in the federation.
        seed: the run's seed (chooses the Byzantine clients and the noise).
        num_classes: classes of the task (labels flip to ``num_classes - 1 - y``).
        kind: the algorithm's upload kind (the attack perturbs the update, not raw weights).
        task_classes: classes of each task, for data with several tasks.
        on_server: the instance the server uses for a message-adding kind (:data:`MESSAGE_ADDING_KINDS`);
            a client-side instance of such a kind is refused.
    """

    def __init__(self, cfg: AttackConfig, num_clients: int, seed: int, num_classes: int, kind: str,
                 task_classes: Mapping[str, int] | None = None, *, on_server: bool = False) -> None:
        if cfg.kind in MESSAGE_ADDING_KINDS and not on_server:
            # the messages are added where the updates meet (AddedMessages around the server's aggregator);
            # a client cohort asked to run this attack would silently run none
            raise ConfigError(f"config key 'attack.kind': {cfg.kind!r} adds messages on the server, and a client-side "
                              "Attack was built for it; a runtime must skip message-adding kinds on its clients and "
                              "wrap the server's aggregator with rayfed.robust.AddedMessages (Attack(..., "
                              "on_server=True)), as rayfed.runtime.core does")
        self.cfg, self.seed, self.num_classes, self.kind = cfg, seed, num_classes, kind
        self.task_classes = dict(task_classes or {})
        self.byzantine = byzantine_clients(num_clients, cfg, seed)

    def is_byzantine(self, client_id: int) -> bool:
        """Whether ``client_id`` attacks."""
        return client_id in self.byzantine

    @property
    def adds_messages(self) -> bool:
        """Whether this attack adds messages on the server (:data:`MESSAGE_ADDING_KINDS`)."""
        return self.cfg.kind in MESSAGE_ADDING_KINDS

    def num_added(self, honest: int) -> int:
        """Messages added to an aggregation of ``honest`` updates: ``floor(honest * f / (1 - f))``
        (exact rational arithmetic: ``f = 0.25`` gives ``floor(honest / 3)``).
        """
        f = Fraction(self.cfg.fraction).limit_denominator(10**6)
        return math.floor(honest * f / (1 - f)) if self.adds_messages else 0

    def added_messages(self, updates: Sequence[ClientUpdate], base: Mapping[str, np.ndarray], keys: Iterable[str],
                       round: int, step: int) -> list[ClientUpdate]:
        """The adversary's messages for one aggregation of the honest ``updates``.

        Each is ``-scale`` times the update of a different honest client (drawn without
        replacement while there are enough, seeded by the run's seed, ``round`` and ``step``;
        clients in id order, so the draw does not depend on the order of arrival), over the tensors
        of ``keys`` that client sent densely; it carries that client's id and sample count.

        Args:
            updates: the honest updates of this aggregation.
            base: the server weights the updates are relative to (weight uploads).
            keys: the tensors attacked (the shared ones).
            round: the round.
            step: the server's aggregation counter (several per round when asynchronous).
        """
        count = self.num_added(len(updates))
        if not count or not updates:
            return []
        keys = set(keys)
        ordered = sorted(updates, key=lambda u: u.client_id)
        rng = np.random.default_rng([self.seed % 2**63, max(round, 0), step, 0xF11B])
        picks = rng.choice(len(ordered), size=count, replace=count > len(ordered))
        out = []
        for i in picks:
            u = ordered[int(i)]
            tensors = {}
            for k, v in u.tensors.items():
                if k in keys and not k.startswith(AUX) and not is_sparse(v):
                    b = base.get(k)
                    tensors[k] = from_update(-self.cfg.scale * to_update(v, b, self.kind), b, self.kind,
                                             np.asarray(v).dtype)
            out.append(ClientUpdate(u.client_id, u.round, u.num_samples, tensors, {"byzantine": 1.0}))
        return out

    def poison_data(self, client_id: int, data: ClientData) -> ClientData:
        """The training data a client uses: labels flipped for a label-flipping attacker (in every
        task: class ``C-1-y`` of the task's ``C`` classes, negated float targets).
        """
        if self.cfg.kind != "label_flip" or not self.is_byzantine(client_id):
            return data
        for name, task in data.tasks.items():
            y = task.y_train
            classes = self.num_classes if len(data.tasks) == 1 else int(self.task_classes.get(name, y.max() + 1))
            flipped = -y if np.issubdtype(y.dtype, np.floating) else (classes - 1 - y).astype(y.dtype)
            data = data.with_task(name, y_train=flipped)
        return data

    def poison_upload(self, client_id: int, round: int, tensors: Mapping[str, np.ndarray],
                      broadcast: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What an attacker sends instead of ``tensors`` (unchanged for honest clients).

        ``sign_flip`` sends ``-scale * update``, ``scale`` sends ``scale * update`` and ``noise``
        sends ``update + N(0, noise_std^2)``, where the update is relative to the weights the
        client received (or the gradient itself for gradient uploads). ``aux/`` entries and
        tensors that were not broadcast (for weight uploads) are left alone.
        """
        kind, c = self.cfg.kind, self.cfg
        if kind == "label_flip" or not self.is_byzantine(client_id):
            return dict(tensors)
        rng = np.random.default_rng([self.seed % 2**63, max(round, 0), client_id, 0xA77])
        out = dict(tensors)
        for k in sorted(tensors):
            if k.startswith(AUX) or (self.kind == "weights" and k not in broadcast):
                continue
            base = broadcast.get(k)
            u = to_update(tensors[k], base, self.kind)
            if kind == "sign_flip":
                u = -c.scale * u
            elif kind == "scale":
                u = c.scale * u
            else:
                u = u + c.noise_std * rng.standard_normal(u.shape)
            out[k] = from_update(u, base, self.kind, np.asarray(tensors[k]).dtype)
        return out

