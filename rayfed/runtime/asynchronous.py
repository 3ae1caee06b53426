"""Asynchronous training for every algorithm (``runtime.mode: async``).

The server applies each client update when it arrives instead of waiting for a round's barrier:
``max_in_flight`` clients train at once; when one finishes, its update is applied (or buffered
until ``buffer_size`` have arrived, FedBuff-style: Nguyen et al., *Federated Learning with
Buffered Asynchronous Aggregation*, AISTATS 2022) and a new idle client, drawn with a seeded
generator, starts from the current server state. An update's *staleness* is the number of server
steps taken since its client started; with ``staleness_scaling`` its step is multiplied by
``n / max(n, staleness)`` with ``n = max_in_flight`` (the delay-adaptive step of asynchronous FFGG:
Mishchenko, Islamov, Gorbunov, Horváth, *Partially Personalized Federated Learning: Breaking the
Curse of Data Heterogeneity*, TMLR 2025, arXiv 2305.18285; Koloskova, Stich, Jaggi, NeurIPS 2022).

Uploaded weights are sent as differences to the weights the client started from (see
:meth:`~rayfed.runtime.core.ClientCohort.train_async`) and rebased on the current server weights
when applied (:meth:`~rayfed.runtime.core.ServerCore.apply_async`), so stale FedAvg-style updates
move the model by what the client learned, not back to an old model. Gradient uploads (FFGG) are
applied as sent.

:class:`AsyncDriver` wraps an executor and keeps its interface: ``train_round(r, sampled)`` runs
until ``clients_per_round`` more updates have arrived (``sampled`` is ignored), so one *round* of
the metrics table is ``clients_per_round`` received updates and evaluation, checkpoints, callbacks
and Tune reports work unchanged. Two orders of arrival:

* ``delays: simulated`` (default): client ``c`` has a mean duration ``exp(delay_spread * z_c)``
  (``z_c ~ N(0, 1)`` from the seed) and each task takes that mean times ``lognormal(0,
  delay_jitter)``; updates are applied in order of virtual finish time. The same seed gives the
  same run on the local executor and on Ray, whatever the real timings.
* ``delays: real`` (Ray only): updates are applied in the order Ray tasks finish (``ray.wait``);
  fastest, not reproducible.

Evaluation sees clients that are still in flight with the private state of their last finished
local work (in the local executor and in Ray, client work queued before an evaluation runs
first). A checkpoint holds the in-flight work (finished or not: it is awaited), the buffer, the
counters and the generators (:meth:`AsyncDriver.driver_state`), so a resumed run is exactly the
uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import numpy as np

from rayfed.algorithms.base import ClientUpdate
from rayfed.config import FederationConfig
from rayfed.errors import ClientError
from rayfed.runtime.core import ClientFailure, RoundOutcome
from rayfed.runtime.executor import Executor, LocalExecutor
from rayfed.runtime.policy import FailurePolicy
from rayfed.tensors import SparseTensor, is_sparse

__all__ = ["AsyncBackend", "AsyncDriver", "LocalAsyncBackend", "staleness_scale", "update_from_tree", "update_tree"]


def staleness_scale(staleness: int, n: int) -> float:
    """The delay-adaptive step factor ``n / max(n, staleness)`` (1 for updates at most ``n`` stale)."""
    return n / max(n, staleness, 1)


class AsyncBackend(Protocol):
    """What :class:`AsyncDriver` needs from an executor (one implementation per executor)."""

    def dispatch(self, round: int, client_id: int, nonce: int) -> Any:
        """Start one client's local work on the current server state; returns a token."""

    def wait_any(self, tokens: Sequence[Any]) -> Any:
        """Block until one of ``tokens`` is done and return it (real delays only)."""

    def collect(self, token: Any, client_id: int, round: int) -> tuple[ClientUpdate | ClientError, Any]:
        """The finished work of ``token``: ``(metadata, handle)`` or ``(ClientError, None)``."""

    def apply(self, round: int, handles: list[Any], scales: list[float]) -> dict[str, float]:
        """Apply arrived updates on the server (one server step); returns server metrics."""

    def result_of(self, token: Any) -> ClientUpdate | ClientFailure:
        """The work of an in-flight ``token``, finished (waiting for it), without collecting it."""

    def update_of(self, handle: Any) -> ClientUpdate:
        """The update behind a buffered handle (from :meth:`collect`)."""

    def adopt(self, nonce: int, work: ClientUpdate | ClientFailure) -> Any:
        """A token for restored in-flight work (a resumed run)."""

    def adopt_handle(self, update: ClientUpdate) -> Any:
        """A buffer handle for a restored update (a resumed run)."""


class LocalAsyncBackend:
    """In-process backend: a client's work runs when it is dispatched, on the server state of that
    moment, and waits until the driver decides it has arrived (simulated delays only).
    """

    def __init__(self, executor: LocalExecutor) -> None:
        self.ex = executor
        self._done: dict[int, ClientUpdate | ClientFailure] = {}

    def dispatch(self, round: int, client_id: int, nonce: int) -> int:
        s = self.ex.server
        self._done[nonce] = self.ex.cohort.train_async(round, client_id, s.broadcast(round),
                                                       s.payloads(round, [client_id]), nonce=nonce)
        return nonce

    def wait_any(self, tokens: Sequence[Any]) -> Any:  # pragma: no cover - rejected by the config
        raise RuntimeError("the local executor has no real completion order; use delays=simulated")

    def collect(self, token: int, client_id: int, round: int) -> tuple[ClientUpdate | ClientError, Any]:
        res = self._done.pop(token)
        if isinstance(res, ClientFailure):
            return res.to_error(), None
        return res, res

    def apply(self, round: int, handles: list[Any], scales: list[float]) -> dict[str, float]:
        return self.ex.server.apply_async(round, handles, scales)

    def result_of(self, token: int) -> ClientUpdate | ClientFailure:
        return self._done[token]

    def update_of(self, handle: ClientUpdate) -> ClientUpdate:
        return handle

    def adopt(self, nonce: int, work: ClientUpdate | ClientFailure) -> int:
        self._done[nonce] = work
        return nonce

    def adopt_handle(self, update: ClientUpdate) -> ClientUpdate:
        return update


def update_tree(u: ClientUpdate | ClientFailure) -> dict:
    """A client update (or failure) as a tree of arrays and numbers that :mod:`rayfed.safe_io` stores."""
    if isinstance(u, ClientFailure):
        return {"failure": [u.client_id, u.round, u.stage, u.detail]}
    tensors = {}
    for k, v in u.tensors.items():
        if is_sparse(v):
            tensors[k] = {"sparse": [list(v.shape), v.values, v.index, v.encoding]}
        else:
            tensors[k] = {"dense": np.asarray(v)}
    return {"client_id": u.client_id, "round": u.round, "num_samples": u.num_samples, "tensors": tensors,
            "metrics": dict(u.metrics)}


def update_from_tree(t: dict) -> ClientUpdate | ClientFailure:
    """Inverse of :func:`update_tree`."""
    if "failure" in t:
        return ClientFailure(*t["failure"])
    tensors = {}
    for k, v in t["tensors"].items():
        if "sparse" in v:
            shape, values, index, encoding = v["sparse"]
            tensors[k] = SparseTensor(tuple(shape), values, index, encoding)
        else:
            tensors[k] = v["dense"]
    return ClientUpdate(int(t["client_id"]), int(t["round"]), int(t["num_samples"]), tensors, dict(t["metrics"]))


@dataclass
class _Job:
    token: Any
    client_id: int
    nonce: int
    version: int  # server steps applied when the client started
    finish: float  # virtual finish time (simulated delays)


class AsyncDriver(Executor):
    """Asynchronous rounds over any executor (see the module docstring).

    Args:
        inner: the executor that hosts the server and the clients.
        backend: its :class:`AsyncBackend`.
        cfg: the run's config (``runtime.asynchronous`` and the seed).
        client_ids: every client of the federation.
    """

    def __init__(self, inner: Executor, backend: AsyncBackend, cfg: FederationConfig,
                 client_ids: Sequence[int]) -> None:
        self.inner, self.backend, self.cfg = inner, backend, cfg
        self.policy = FailurePolicy(cfg.runtime)
        a = cfg.runtime.asynchronous
        self.opts = a
        self.k = cfg.clients_per_round()
        self.ids = sorted(int(c) for c in client_ids)
        self.max_in_flight = min(a.max_in_flight or self.k, len(self.ids))
        self.budget = cfg.total_updates()
        z = np.random.default_rng([cfg.seed % 2**63, 0xA5C, 0]).standard_normal(len(self.ids))
        self.mean_duration = {c: float(np.exp(a.delay_spread * zc)) for c, zc in zip(self.ids, z)}
        self.in_flight: dict[int, _Job] = {}
        self.buffer: list[tuple[Any, float]] = []
        self.refused: list[ClientError] = []  # updates the server refused (validation), reported with the round
        self.received = 0
        self.version = 0
        self.nonce = 0
        self.clock = 0.0
        self._started: Optional[int] = None

    @classmethod
    def wrap(cls, executor: Executor, cfg: FederationConfig, client_ids: Sequence[int]) -> AsyncDriver:
        """The driver for ``executor`` (a :class:`LocalExecutor` or a ``RayExecutor``)."""
        if isinstance(executor, LocalExecutor):
            return cls(executor, LocalAsyncBackend(executor), cfg, client_ids)
        from rayfed.runtime.ray_async import RayAsyncBackend

        return cls(executor, RayAsyncBackend(executor), cfg, client_ids)

    # -- scheduling ----------------------------------------------------------------------------
    def _start(self, round: int) -> None:
        """Seed the schedule for a run starting (or resuming) at ``round``."""
        self._started = round
        self.received = min(self.budget, round * self.k)
        self._pick = np.random.default_rng([self.cfg.seed % 2**63, 0xA5C, 1, round])
        self._duration = np.random.default_rng([self.cfg.seed % 2**63, 0xA5C, 2, round])

    def _fill(self, round: int) -> None:
        while len(self.in_flight) < self.max_in_flight and self.received + len(self.in_flight) < self.budget:
            busy = {j.client_id for j in self.in_flight.values()}
            idle = [c for c in self.ids if c not in busy]
            cid = int(self._pick.choice(idle))
            took = self.mean_duration[cid] * float(self._duration.lognormal(0.0, self.opts.delay_jitter))
            token = self.backend.dispatch(round, cid, self.nonce)
            self.in_flight[self.nonce] = _Job(token, cid, self.nonce, self.version, self.clock + took)
            self.nonce += 1

    def _next(self) -> _Job:
        if self.opts.delays == "simulated":
            job = min(self.in_flight.values(), key=lambda j: (j.finish, j.nonce))
            self.clock = job.finish
        else:
            by_token = {j.token: j for j in self.in_flight.values()}
            job = by_token[self.backend.wait_any(list(by_token))]
        del self.in_flight[job.nonce]
        return job

    def _apply(self, round: int) -> dict[str, float]:
        handles, scales = [h for h, _ in self.buffer], [s for _, s in self.buffer]
        self.buffer = []
        out = self.backend.apply(round, handles, scales)
        self.refused += [f.to_error() for f in out.pop("rejected", [])]
        self.version += 1
        return out

    # -- the executor interface ------------------------------------------------------------------
    def train_round(self, round: int, client_ids: list[int]) -> RoundOutcome:
        """Run until ``clients_per_round`` more updates arrived (``client_ids`` is not used: the
        driver picks clients as slots free up).
        """
        if self._started is None:
            self._start(round)
        target = min(self.budget, (round + 1) * self.k)
        t0 = time.perf_counter()
        rows: list[dict] = []
        failures: list[ClientError] = []
        staleness: list[int] = []
        steps, agg_seconds = 0, 0.0
        server: dict[str, float] = {}
        while self.received < target:
            self._fill(round)
            job = self._next()
            meta, handle = self.backend.collect(job.token, job.client_id, round)
            if isinstance(meta, ClientError):
                failures.append(meta)
                attempts = len(rows) + len(failures)
                # raise at once, or when a round's worth of attempts already lost the quorum (failed
                # clients are replaced by new ones, so without this a run whose clients all fail never ends)
                if self.policy.mode == "raise" or (attempts >= self.k and
                                                   not self.policy.survives(attempts, len(failures))):
                    self.policy.enforce(attempts, failures, "train")
                continue
            self.received += 1
            stale = self.version - job.version
            scale = staleness_scale(stale, self.max_in_flight) if self.opts.staleness_scaling else 1.0
            staleness.append(stale)
            meta.metrics.update(staleness=float(stale), step_scale=scale,
                                arrival_time=self.clock if self.opts.delays == "simulated"
                                else time.perf_counter() - t0)
            rows.append(meta.report())
            self.buffer.append((handle, scale))
            if len(self.buffer) >= self.opts.buffer_size or self.received >= self.budget:
                server = self._apply(round)
                steps += 1
                agg_seconds += float(server.get("aggregate_seconds", 0.0))
        refused, self.refused = self.refused, []
        failures += refused  # arrived (counted in rows), but refused by the server's checks
        self.policy.enforce(len(rows) + len(failures) - len(refused), failures, "train")
        elapsed = time.perf_counter() - t0
        metrics = {**server, "aggregate_seconds": agg_seconds, "updates": float(len(rows)), "steps": float(steps),
                   "staleness_mean": float(np.mean(staleness)) if staleness else float("nan"),
                   "staleness_max": float(max(staleness)) if staleness else float("nan"),
                   "buffered": float(len(self.buffer)), "in_flight": float(len(self.in_flight)),
                   "updates_per_second": len(rows) / elapsed if elapsed > 0 else float("nan")}
        if self.opts.delays == "simulated":
            metrics["virtual_time"] = self.clock
        return RoundOutcome(rows, failures, metrics)

    def evaluate(self, round: int, client_ids: list[int]):
        return self.inner.evaluate(round, client_ids)

    def finalize(self, round: int, client_ids: list[int]):
        return self.inner.finalize(round, client_ids)

    def export(self, round: int, client_ids: list[int], directory):
        return self.inner.export(round, client_ids, directory)

    def save(self, directory, round: int = -1) -> None:
        self.inner.save(directory, round)

    def restore(self, directory) -> int:
        r = self.inner.restore(directory)
        self._started = None  # the schedule restarts at the round the loop resumes from, unless
        return r              # load_driver_state restores it exactly

    def driver_state(self) -> dict:
        """Everything the asynchronous schedule holds between rounds, for a checkpoint: the
        clients in flight with their finished work, the buffered updates, the counters and the
        seeded generators, so a resumed run continues exactly where this one stopped.
        """
        if self._started is None:
            return {}
        jobs = [{"client_id": j.client_id, "nonce": j.nonce, "version": j.version, "finish": j.finish,
                 "work": update_tree(self.backend.result_of(j.token))} for j in self.in_flight.values()]
        return {"jobs": jobs, "buffer": [[update_tree(self.backend.update_of(h)), float(a)] for h, a in self.buffer],
                "received": self.received, "version": self.version, "nonce": self.nonce, "clock": self.clock,
                "started": self._started, "pick": self._pick.bit_generator.state,
                "duration": self._duration.bit_generator.state}

    def load_driver_state(self, tree: dict) -> None:
        """Restore :meth:`driver_state` (after :meth:`restore`); an empty tree keeps the fresh schedule."""
        if not tree:
            return
        self._started = int(tree["started"])
        self.received, self.version, self.nonce = int(tree["received"]), int(tree["version"]), int(tree["nonce"])
        self.clock = float(tree["clock"])
        self._pick = np.random.default_rng()
        self._pick.bit_generator.state = tree["pick"]
        self._duration = np.random.default_rng()
        self._duration.bit_generator.state = tree["duration"]
        self.in_flight = {}
        for j in tree["jobs"]:
            token = self.backend.adopt(int(j["nonce"]), update_from_tree(j["work"]))
            self.in_flight[int(j["nonce"])] = _Job(token, int(j["client_id"]), int(j["nonce"]), int(j["version"]),
                                                   float(j["finish"]))
        self.buffer = [(self.backend.adopt_handle(update_from_tree(u)), float(a)) for u, a in tree["buffer"]]

    def received_names(self) -> list[str]:
        return self.inner.received_names()

    def drain_actor_failures(self) -> list:
        return self.inner.drain_actor_failures()

    def server_state(self):
        return self.inner.server_state()

    def close(self, *args: Any, **kwargs: Any) -> None:
        self.in_flight.clear()
        self.inner.close(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # anything else the wrapped executor offers
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
