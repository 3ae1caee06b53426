"""Executors run one round: broadcast, local updates, collect, aggregate.

:class:`LocalExecutor` runs the server and one client cohort in this process (no Ray: fast tests,
easy debugging). :class:`RayExecutor` runs a :class:`~rayfed.runtime.actors.ServerActor` and
client actors, each hosting a cohort of clients. Both drive the same
:class:`~rayfed.runtime.core.ClientCohort` and :class:`~rayfed.runtime.core.ServerCore` code, so a
seed gives identical results on either.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from rayfed.algorithms.base import Algorithm, ClientUpdate
from rayfed.config import FederationConfig
from rayfed.data import FederatedDataset
from rayfed.errors import ClientError
from rayfed.runtime.core import ClientCohort, ClientFailure, CohortSpec, RoundOutcome, ServerCore

__all__ = ["Executor", "LocalExecutor", "make_executor", "round_survives"]

log = logging.getLogger("rayfed")


def _error(f: ClientFailure) -> ClientError:
    return ClientError(f.client_id, f.round, f.stage, f.detail)


def round_survives(cfg: FederationConfig, num_sampled: int, num_failed: int) -> bool:
    """Whether a round with ``num_failed`` of ``num_sampled`` clients failed may go on (be aggregated)
    under ``runtime.on_client_failure`` and ``runtime.min_quorum``.
    """
    if num_failed == 0:
        return True
    if cfg.runtime.on_client_failure == "raise":
        return False
    return num_sampled - num_failed >= math.ceil(cfg.runtime.min_quorum * num_sampled)


class Executor:
    """Shared round logic; subclasses move the data."""

    cfg: FederationConfig

    def _split(self, results: Sequence[Any]) -> tuple[list[Any], list[ClientError]]:
        ok, failed = [], []
        for r in results:
            (failed.append(_error(r)) if isinstance(r, ClientFailure) else ok.append(r))
        return ok, failed

    def _enforce(self, round: int, sampled: Sequence[int], failures: list[ClientError], stage: str) -> None:
        """Raise per the failure policy: any failure with ``raise``; a lost quorum always."""
        if not failures:
            return
        for f in failures:
            log.warning("%s", f)
        if self.cfg.runtime.on_client_failure == "raise":
            raise failures[0]
        needed = math.ceil(self.cfg.runtime.min_quorum * len(sampled))
        if not round_survives(self.cfg, len(sampled), len(failures)):
            first = failures[0]
            raise ClientError(first.client_id, first.round, first.stage,
                              f"{first.detail}\n{len(failures)} of {len(sampled)} clients failed in {stage}; "
                              f"the quorum runtime.min_quorum={self.cfg.runtime.min_quorum} needs {needed}") \
                from first

    def train_round(self, round: int, client_ids: list[int]) -> RoundOutcome:
        raise NotImplementedError

    def evaluate(self, round: int, client_ids: list[int]) -> tuple[list[dict], list[ClientError]]:
        raise NotImplementedError

    def finalize(self, round: int, client_ids: list[int]) -> tuple[list[dict], list[ClientError]]:
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        raise NotImplementedError

    def restore(self, directory: Path) -> int:
        raise NotImplementedError

    def received_names(self) -> list[str]:
        raise NotImplementedError

    def server_state(self):
        raise NotImplementedError

    def close(self) -> None:
        pass


def _update_row(u: ClientUpdate) -> dict:
    return {"client_id": u.client_id, **u.metrics}


class LocalExecutor(Executor):
    """Everything in this process: one server, one cohort holding every client."""

    def __init__(self, cfg: FederationConfig, algorithm: Algorithm, dataset: FederatedDataset,
                 model_factory: Optional[Callable] = None) -> None:
        self.cfg = cfg
        self.server = ServerCore(cfg, algorithm, dataset.info, dataset.client_sizes(), model_factory)
        self.cohort = ClientCohort(CohortSpec(cfg, algorithm, list(dataset.client_ids), model_factory,
                                              dataset=dataset))

    def _payload(self, round: int, ids: list[int]):
        return self.server.broadcast(round), self.server.payloads(round, ids)

    def train_round(self, round: int, client_ids: list[int]) -> RoundOutcome:
        b, p = self._payload(round, client_ids)
        ok, failed = self._split(self.cohort.train(round, client_ids, b, p))
        self._enforce(round, client_ids, failed, "train")
        server = self.server.aggregate(round, sorted(ok, key=lambda u: u.client_id))
        return RoundOutcome([_update_row(u) for u in ok], failed, server)

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

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.server.save(directory / "server.pt")
        self.cohort.save_states(directory / "clients")

    def restore(self, directory: Path) -> int:
        r = self.server.load(directory / "server.pt")
        self.cohort.load_states(directory / "clients")
        return r

    def received_names(self) -> list[str]:
        return self.server.received_names()

    def server_state(self):
        return self.server.state


def make_executor(cfg: FederationConfig, algorithm: Algorithm, dataset: FederatedDataset,
                  model_factory: Optional[Callable] = None, *, placement_group: Any = None) -> Executor:
    """The executor named by ``cfg.runtime.executor`` (a placement group applies to Ray only),
    wrapped in an :class:`~rayfed.runtime.asynchronous.AsyncDriver` when ``runtime.mode`` is async.
    """
    if cfg.runtime.executor == "local":
        ex: Executor = LocalExecutor(cfg, algorithm, dataset, model_factory)
    else:
        from rayfed.runtime.ray_executor import RayExecutor

        ex = RayExecutor(cfg, algorithm, dataset, model_factory, placement_group=placement_group)
    if cfg.runtime.mode == "async":
        from rayfed.runtime.asynchronous import AsyncDriver

        return AsyncDriver.wrap(ex, cfg, dataset.client_ids)
    return ex


def __getattr__(name: str):  # RayExecutor without importing ray for local runs
    if name == "RayExecutor":
        from rayfed.runtime.ray_executor import RayExecutor

        return RayExecutor
    raise AttributeError(name)
