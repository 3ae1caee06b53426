"""The run plan: everything about a federation decided once, on the driver, before any actor starts.

Which clients exist and how they differ (:class:`~rayfed.clients.ClientSpec`), which are held out
of training, who is sampled in each round, what each client's work costs, and which model
structures exist (and so which tensors only some clients hold). The round loop, the executors
and placement all read this one plan instead of recomputing parts of it.

Example:
    >>> from rayfed.config import load_config
    >>> from rayfed.algorithms import create
    >>> from rayfed.data import FederatedDataset
    >>> cfg = load_config(None, ["data.num_clients=6", "sample_count=2"])
    >>> ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    >>> plan = make_plan(cfg, create(cfg.algorithm), ds)
    >>> len(plan.sampled(0)), plan.union.tier
    (2, None)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np

from rayfed.clients import ClientSpec, Structure, describe_clients
from rayfed.sampling import client_cost, sample_clients, sampling_schedule

if TYPE_CHECKING:
    from rayfed.algorithms.base import Algorithm
    from rayfed.config import FederationConfig
    from rayfed.data import FederatedDataset
    from rayfed.roles import RoleMap

__all__ = ["RunPlan", "make_plan", "plan_run"]


def round_half(x: float) -> int:
    """``x`` rounded half up (not to even)."""
    return int(np.floor(x + 0.5))


@dataclass
class RunPlan:
    """A federation's clients, rounds and structures (see the module docstring).

    Attributes:
        specs: every client's description, by id.
        holdouts: clients kept out of training (personalized after it by the algorithm).
        train_ids: the clients that train, ascending.
        clients_per_round: clients sampled each round.
        schedule: the clients sampled in the first rounds (at most
            :data:`rayfed.sampling.SCHEDULE_ROUNDS`), computed once; later rounds are sampled on demand.
        cost: each client's work per round (local steps scaled by its share of the model's depth).
        structures: the distinct model structures of the clients, sorted.
        union: the structure of the server's model (the union of ``structures``).
        partial_keys: tensors held by some structures only (tiered: averaged over their holders);
            filled by whoever builds the structures' models (:func:`rayfed.models.prepare.structure_keys`).
    """

    specs: dict[int, ClientSpec]
    holdouts: list[int]
    train_ids: list[int]
    clients_per_round: int
    seed: int
    rounds: int
    schedule: list[list[int]]
    cost: dict[int, float]
    structures: list[Structure]
    union: Structure
    partial_keys: frozenset[str] = field(default_factory=frozenset)
    #: per structure, the tensors its clients upload (checked by the server); filled like partial_keys
    upload_keys: dict[Structure, frozenset[str]] = field(default_factory=dict)
    #: ``key -> (shape, dtype)`` of every tensor any client uploads; filled like partial_keys
    upload_shapes: dict[str, tuple] = field(default_factory=dict)

    def expected_uploads(self) -> dict[int, frozenset[str]]:
        """The tensors each client's updates must hold (those of its structure)."""
        return {c: self.upload_keys.get(s.structure, frozenset()) for c, s in self.specs.items()}

    def sampled(self, round: int) -> list[int]:
        """The clients trained in ``round`` (seeded by the seed and the round only)."""
        if round < len(self.schedule):
            return list(self.schedule[round])
        return sample_clients(self.train_ids, self.clients_per_round, self.seed, round)

    def eval_clients(self, round: int, fraction: float, last: bool) -> list[int]:
        """The clients evaluated after ``round``: every one after the last round, else a seeded sample
        of ``fraction`` of them (``eval_fraction``).
        """
        if last or fraction >= 1.0:
            return list(self.train_ids)
        k = max(1, int(round_half(fraction * len(self.train_ids))))
        rng = np.random.default_rng([self.seed % 2**63, round, 0xE7A1])
        return sorted(int(c) for c in rng.choice(np.asarray(self.train_ids), size=k, replace=False))

    def specs_of(self, client_ids: Sequence[int]) -> dict[int, ClientSpec]:
        """The descriptions of ``client_ids``."""
        return {c: self.specs[c] for c in client_ids}

    def structure_counts(self) -> dict[Structure, int]:
        """Clients per structure."""
        out: dict[Structure, int] = {}
        for s in self.specs.values():
            out[s.structure] = out.get(s.structure, 0) + 1
        return out


def _depth_share(specs: Mapping[int, ClientSpec], union: Structure) -> dict[int, float]:
    if union.tier is None:
        return {c: 1.0 for c in specs}
    return {c: (s.tier if s.tier is not None else union.tier) / union.tier for c, s in specs.items()}


def make_plan(cfg: FederationConfig, algorithm: Algorithm, dataset: FederatedDataset) -> RunPlan:
    """Plan a federation: describe the clients (:func:`~rayfed.clients.describe_clients`, then the
    algorithm's :meth:`~rayfed.algorithms.Algorithm.client_specs`), hold some out, sample the rounds.
    """
    specs = algorithm.client_specs(describe_clients(cfg, dataset), cfg.seed)
    ids = sorted(specs)
    held = sorted(algorithm.holdout_clients(ids, cfg.seed))
    held_set = set(held)
    train_ids = [c for c in ids if c not in held_set]
    k = min(cfg.clients_per_round(), len(train_ids))
    schedule = [] if cfg.runtime.mode != "sync" else sampling_schedule(train_ids, k, cfg.seed, cfg.rounds)
    structures = sorted({s.structure for s in specs.values()}, key=repr)
    union = Structure.union(structures)
    t = cfg.train
    steps = client_cost(dataset.client_sizes(), t.batch_size, t.local_epochs, t.max_steps)
    share = _depth_share(specs, union)
    cost = {c: steps[c] * share[c] for c in ids}
    return RunPlan(specs, held, train_ids, k, cfg.seed, cfg.rounds, schedule, cost, structures, union)


def plan_run(cfg: FederationConfig, algorithm: Algorithm, dataset: FederatedDataset,
             model_factory: Optional[Callable] = None) -> tuple[RunPlan, dict[Structure, RoleMap]]:
    """:func:`make_plan`, then build and check every model structure once
    (:func:`rayfed.models.prepare.check_structures`, which also fills ``plan.partial_keys``).

    Returns:
        The plan, and the role map of each structure and of the server's (union) model.
    """
    from rayfed.models.prepare import check_structures

    plan = make_plan(cfg, algorithm, dataset)
    source = model_factory if model_factory is not None else cfg.model
    roles = check_structures(plan, source, dataset.info, cfg.seed, algorithm,
                             peft=cfg.model.peft if cfg.model.peft.enabled else None)
    return plan, roles
