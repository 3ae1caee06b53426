"""Executors run one round: broadcast, local updates, collect, aggregate.

:class:`LocalExecutor` runs the server and one client cohort in this process (no Ray: fast tests,
easy debugging). :class:`RayExecutor` runs a :class:`~rayfed.runtime.actors.ServerActor` and
client actors, each hosting a cohort of clients. Both drive the same
:class:`~rayfed.runtime.core.ClientCohort` and :class:`~rayfed.runtime.core.ServerCore` code, so a
seed gives identical results on either.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from rayfed.algorithms.base import Algorithm
from rayfed.checkpoint import CLIENTS_DIR, SERVER_FILE
from rayfed.config import FederationConfig
from rayfed.data import FederatedDataset
from rayfed.errors import ClientError
from rayfed.plan import RunPlan, plan_run
from rayfed.runtime.core import ClientCohort, ClientFailure, CohortSpec, RoundOutcome, ServerCore
from rayfed.runtime.policy import FailurePolicy

__all__ = ["Executor", "LocalExecutor", "make_executor"]


class Executor:
    """Shared round logic; subclasses move the data."""

    cfg: FederationConfig
    policy: FailurePolicy

    def _split(self, results: Sequence[Any]) -> tuple[list[Any], list[ClientError]]:
        ok, failed = [], []
        for r in results:
            (failed.append(r.to_error()) if isinstance(r, ClientFailure) else ok.append(r))
        return ok, failed

    def _enforce(self, round: int, sampled: Sequence[int], failures: list[ClientError], stage: str) -> None:
        self.policy.enforce(len(sampled), failures, stage)

    def train_round(self, round: int, client_ids: list[int]) -> RoundOutcome:
        raise NotImplementedError

    def evaluate(self, round: int, client_ids: list[int]) -> tuple[list[dict], list[ClientError]]:
        raise NotImplementedError

    def finalize(self, round: int, client_ids: list[int]) -> tuple[list[dict], list[ClientError]]:
        raise NotImplementedError

    def export(self, round: int, client_ids: list[int], directory: Path) -> tuple[list[dict], list[ClientError]]:
        """Write the clients' personalized models (see :meth:`ClientCohort.export`)."""
        raise NotImplementedError

    def save(self, directory: Path, round: int = -1) -> None:
        """Write the server state and every client's state into a checkpoint folder."""
        raise NotImplementedError

    def restore(self, directory: Path) -> int:
        raise NotImplementedError

    def received_names(self) -> list[str]:
        raise NotImplementedError

    def server_state(self):
        raise NotImplementedError

    def driver_state(self) -> dict:
        """The driver's own bookkeeping a checkpoint must hold (asynchronous scheduling); default none."""
        return {}

    def load_driver_state(self, tree: dict) -> None:
        """Restore :meth:`driver_state` after :meth:`restore`."""

    def drain_actor_failures(self) -> list:
        """The :class:`~rayfed.errors.ActorError` records since the last call (Ray: lost client actors)."""
        return []

    def close(self) -> None:
        pass


class LocalExecutor(Executor):
    """Everything in this process: one server, one cohort holding every client."""

    def __init__(self, cfg: FederationConfig, algorithm: Algorithm, dataset: FederatedDataset,
                 model_factory: Optional[Callable] = None, *, plan: Optional[RunPlan] = None,
                 state_dir: Optional[str] = None) -> None:
        self.cfg = cfg
        if cfg.runtime.torch_threads is None:  # torch's default (every core) slows a busy machine badly
            torch.set_num_threads(default_threads())
        self.policy = FailurePolicy(cfg.runtime)
        self.plan = plan if plan is not None else plan_run(cfg, algorithm, dataset, model_factory)[0]
        self.server = ServerCore(cfg, algorithm, dataset.info, dataset.client_sizes(), model_factory, plan=self.plan)
        self.cohort = ClientCohort(CohortSpec(cfg, algorithm, list(dataset.client_ids), dataset, self.plan.specs,
                                              self.plan.partial_keys, model_factory, owner="local",
                                              state_dir=state_dir))

    def _payload(self, round: int, ids: list[int]):
        return self.server.broadcast(round), self.server.payloads(round, ids)

    def train_round(self, round: int, client_ids: list[int]) -> RoundOutcome:
        b, p = self._payload(round, client_ids)
        ok, failed = self._split(self.cohort.train(round, client_ids, b, p))
        server = self.server.aggregate(round, sorted(ok, key=lambda u: u.client_id),
                                       commit=lambda refused: self.policy.survives(len(client_ids),
                                                                                   len(failed) + refused))
        refused = [f.to_error() for f in server.pop("rejected")]
        failed = sorted(failed + refused, key=lambda f: f.client_id)
        self._enforce(round, client_ids, failed, "train")  # the server did not commit if this raises
        gone = {f.client_id for f in refused}
        return RoundOutcome([u.report() for u in ok if u.client_id not in gone], failed, server)

    def evaluate(self, round: int, client_ids: list[int]):
        b, p = self._payload(round, client_ids)
        ok, failed = self._split(self.cohort.evaluate(round, client_ids, b, p))
        self._enforce(round, client_ids, failed, "evaluate")
        return ok, failed

    def finalize(self, round: int, client_ids: list[int]):
        b, p = self._payload(round, client_ids)
        ok, failed = self._split(self.cohort.finalize(round, client_ids, b, p))
        self._enforce(round, client_ids, failed, "finalize")
        return ok, failed

    def export(self, round: int, client_ids: list[int], directory: Path):
        b, p = self._payload(round, client_ids)
        ok, failed = self._split(self.cohort.export(round, client_ids, b, p, str(directory)))
        self._enforce(round, client_ids, failed, "export")
        return ok, failed

    def save(self, directory: Path, round: int = -1) -> None:
        self.server.save(directory / SERVER_FILE)
        self.cohort.save_states(directory / CLIENTS_DIR, round)

    def restore(self, directory: Path) -> int:
        r = self.server.load(directory / SERVER_FILE)
        self.cohort.load_states(directory / CLIENTS_DIR)
        return r

    def received_names(self) -> list[str]:
        return self.server.received_names()

    def server_state(self):
        return self.server.state


def default_threads() -> int:
    """Torch threads of the local executor when ``runtime.torch_threads`` is not set: half the cores."""
    return max(1, (os.cpu_count() or 2) // 2)


def make_executor(cfg: FederationConfig, algorithm: Algorithm, dataset: FederatedDataset,
                  model_factory: Optional[Callable] = None, *, plan: Optional[RunPlan] = None,
                  placement_group: Any = None, state_dir: Optional[str] = None) -> Executor:
    """The executor named by ``cfg.runtime.executor`` (a placement group applies to Ray only),
    wrapped in an :class:`~rayfed.runtime.asynchronous.AsyncDriver` when ``runtime.mode`` is async.

    ``plan`` is the run's :class:`~rayfed.plan.RunPlan` (made here with
    :func:`rayfed.plan.plan_run` when not given); ``state_dir`` is where Ray client actors save their
    clients' states every round, for recovery (``runtime.state_dir``; a temporary folder by default).
    """
    if plan is None:
        plan = plan_run(cfg, algorithm, dataset, model_factory)[0]
    if cfg.runtime.executor == "local":
        ex: Executor = LocalExecutor(cfg, algorithm, dataset, model_factory, plan=plan, state_dir=state_dir)
    else:
        from rayfed.runtime.ray_executor import RayExecutor

        ex = RayExecutor(cfg, algorithm, dataset, model_factory, plan=plan, placement_group=placement_group,
                         state_dir=state_dir)
    if cfg.runtime.mode == "async":
        from rayfed.runtime.asynchronous import AsyncDriver

        return AsyncDriver.wrap(ex, cfg, plan.train_ids)
    return ex


def __getattr__(name: str):  # RayExecutor without importing ray for local runs
    if name == "RayExecutor":
        from rayfed.runtime.ray_executor import RayExecutor

        return RayExecutor
    raise AttributeError(name)
