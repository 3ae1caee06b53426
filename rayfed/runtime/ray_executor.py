"""The Ray executor: a server actor and client actors that each host a cohort of clients.

Per round the server's broadcast goes into the object store once (numpy arrays: zero-copy reads in
every actor of a node); each client actor trains its sampled clients and puts each client's upload
in the object store; the driver sees only small metadata and hands the upload references, in client
order, to the server, which pulls and aggregates them one at a time (O(model) memory).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from rayfed.algorithms.base import Algorithm, ClientUpdate
from rayfed.config import FederationConfig
from rayfed.data import FederatedDataset
from rayfed.errors import ClientError
from rayfed.runtime.core import ClientCohort, ClientFailure, CohortSpec, RoundOutcome, ServerCore
from rayfed.runtime.executor import Executor, _update_row, assign_clients

__all__ = ["ClientActor", "RayExecutor", "ServerActor", "ray_session"]

log = logging.getLogger("rayfed")


@contextlib.contextmanager
def ray_session(address: Optional[str] = None, **init_kwargs: Any) -> Iterator[bool]:
    """Use the running Ray, or connect/start one; shut down only what this call started.

    Yields True when this call initialised Ray.
    """
    if ray.is_initialized():
        yield False
        return
    init_kwargs.setdefault("log_to_driver", True)
    init_kwargs.setdefault("include_dashboard", False)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=address, **init_kwargs)
    try:
        yield True
    finally:
        ray.shutdown()


class ClientActor:
    """A Ray actor hosting a :class:`ClientCohort`: its clients' data and state live here."""

    def __init__(self, spec: CohortSpec, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.cohort = ClientCohort(spec)

    def ready(self) -> list[int]:
        return sorted(self.cohort.data)

    def train(self, round: int, client_ids: list[int], broadcast, payloads) -> list:
        out = []
        for r in self.cohort.train(round, client_ids, broadcast, payloads):
            if isinstance(r, ClientFailure):
                out.append(r)
            else:  # tensors go to the object store; the driver only sees metadata and a reference
                out.append((ClientUpdate(r.client_id, r.round, r.num_samples, {}, r.metrics),
                            ray.put(r.tensors)))
        return out

    def evaluate(self, round: int, client_ids: list[int], broadcast, payloads) -> list:
        return self.cohort.evaluate(round, client_ids, broadcast, payloads)

    def finalize(self, round: int, client_ids: list[int], broadcast, payloads) -> list:
        return self.cohort.finalize(round, client_ids, broadcast, payloads)

    def save_states(self, directory: str) -> list[int]:
        return self.cohort.save_states(directory)

    def load_states(self, directory: str) -> list[int]:
        return self.cohort.load_states(directory)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


class ServerActor:
    """A Ray actor hosting the :class:`ServerCore`: shared weights, aggregator and payloads."""

    def __init__(self, *args: Any, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(threads)
        self.core = ServerCore(*args)

    def broadcast(self, round: int):
        return self.core.broadcast(round)

    def payloads(self, round: int, groups: list[list[int]]):
        per = self.core.payloads(round, [c for g in groups for c in g])
        out = [{c: per[c] for c in g if c in per} for g in groups]
        return out if len(groups) > 1 else out[0]

    def aggregate(self, round: int, items: list[tuple[ClientUpdate, ray.ObjectRef]]) -> dict:
        def stream():
            for meta, ref in items:  # one client's tensors in memory at a time
                yield ClientUpdate(meta.client_id, meta.round, meta.num_samples, ray.get(ref), meta.metrics)

        return self.core.aggregate(round, stream())

    def received_names(self) -> list[str]:
        return self.core.received_names()

    def save(self, path: str) -> None:
        self.core.save(path)

    def load(self, path: str) -> int:
        return self.core.load(path)

    def get_state(self):
        return self.core.state


RemoteClientActor = ray.remote(ClientActor)
RemoteServerActor = ray.remote(ServerActor)


def plan_resources(cfg: FederationConfig, cluster_cpus: float, num_clients: int) -> tuple[int, float]:
    """Number of client actors and CPUs per actor: by default one actor per cluster CPU (at most
    one per client), sharing what the server leaves.
    """
    rt = cfg.runtime
    n = rt.num_actors or max(1, min(num_clients, int(cluster_cpus)))
    n = min(n, num_clients)
    if rt.num_cpus_per_actor is not None:
        cpus = rt.num_cpus_per_actor
    else:
        cpus = max(0.01, math.floor(100 * (cluster_cpus - rt.server_num_cpus) / n) / 100)
    return n, cpus


class RayExecutor(Executor):
    """Server and client actors on the Ray cluster this process is connected to."""

    def __init__(self, cfg: FederationConfig, algorithm: Algorithm, dataset: FederatedDataset,
                 model_factory: Optional[Callable] = None, *, placement_group=None) -> None:
        if not ray.is_initialized():
            raise RuntimeError("RayExecutor needs a connected Ray; use rayfed.Federation, which joins or "
                               "starts one, or call ray.init() first")
        self.cfg = cfg
        rt = cfg.runtime
        ids = list(dataset.client_ids)
        cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
        if placement_group is not None:
            cluster_cpus = sum(b.get("CPU", 0) for b in placement_group.bundle_specs)
        n, cpus = plan_resources(cfg, cluster_cpus, len(ids))
        self.num_actors, self.cpus_per_actor = n, cpus
        threads = rt.torch_threads or max(1, int(cpus))
        self.groups = assign_clients(ids, n)
        self.owner = {c: i for i, g in enumerate(self.groups) for c in g}
        pg_opts = {}
        if placement_group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            pg_opts = {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group)}
        self.server = RemoteServerActor.options(num_cpus=rt.server_num_cpus, **pg_opts).remote(
            cfg, algorithm, dataset.info, dataset.client_sizes(), model_factory,
            threads=rt.torch_threads or max(1, int(rt.server_num_cpus)))
        self.actors = []
        for group in self.groups:
            opts: dict[str, Any] = {"num_cpus": cpus, "num_gpus": rt.num_gpus_per_actor,
                                    "resources": dict(rt.resources_per_actor)}
            opts.update(pg_opts or {"scheduling_strategy": "SPREAD"})
            spec = CohortSpec(cfg, algorithm, group, model_factory)
            self.actors.append(RemoteClientActor.options(**opts).remote(spec, threads))
        # surface set-up errors (data, model) now, naming a client of the failing actor
        for i, ref in enumerate([a.ready.remote() for a in self.actors]):
            try:
                ray.get(ref)
            except RayError as e:
                self.close()
                raise ClientError(self.groups[i][0], -1, "setup", _cause(e)) from e
        try:
            ray.get(self.server.received_names.remote())
        except RayError as e:
            self.close()
            raise RuntimeError(f"the server actor failed to start: {_cause(e)}") from e

    # -- helpers -------------------------------------------------------------------------------
    def _by_actor(self, client_ids: list[int]) -> list[tuple[int, list[int]]]:
        per: dict[int, list[int]] = {}
        for c in sorted(client_ids):
            per.setdefault(self.owner[c], []).append(c)
        return sorted(per.items())

    def _payload_refs(self, round: int, parts: list[tuple[int, list[int]]]):
        b = self.server.broadcast.remote(round)
        groups = [ids for _, ids in parts]
        p = self.server.payloads.options(num_returns=len(groups)).remote(round, groups)
        return b, (p if len(groups) > 1 else [p])

    def _call(self, method: str, round: int, client_ids: list[int]) -> tuple[list, list[ClientError]]:
        parts = self._by_actor(client_ids)
        b, prefs = self._payload_refs(round, parts)
        refs = [getattr(self.actors[a], method).remote(round, ids, b, prefs[i])
                for i, (a, ids) in enumerate(parts)]
        timeout = self.cfg.runtime.round_timeout_s
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        ready_set = set(ready)
        out: list = []
        failures: list[ClientError] = []
        for ref, (_, ids) in zip(refs, parts):
            if ref not in ready_set:
                failures += [ClientError(c, round, "timeout", f"not done within runtime.round_timeout_s="
                                         f"{timeout}") for c in ids]
                continue
            try:
                res = ray.get(ref)
            except (RayActorError, RayTaskError, GetTimeoutError) as e:
                failures += [ClientError(c, round, "train" if method == "train" else method, _cause(e))
                             for c in ids]
                continue
            ok, failed = self._split(res)
            out += ok
            failures += failed
        return out, failures

    # -- rounds --------------------------------------------------------------------------------
    def train_round(self, round: int, client_ids: list[int]) -> RoundOutcome:
        ok, failed = self._call("train", round, client_ids)
        self._enforce(round, client_ids, failed, "train")
        ok.sort(key=lambda item: item[0].client_id)
        server = ray.get(self.server.aggregate.remote(round, ok))
        return RoundOutcome([_update_row(meta) for meta, _ in ok], failed, server)

    def evaluate(self, round: int, client_ids: list[int]):
        ok, failed = self._call("evaluate", round, client_ids)
        self._enforce(round, client_ids, failed, "evaluate")
        return ok, failed

    def finalize(self, round: int, client_ids: list[int]):
        ok, failed = self._call("finalize", round, client_ids)
        self._enforce(round, client_ids, failed, "finalize")
        return ok, failed

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        ray.get([self.server.save.remote(str(directory / "server.pt"))]
                + [a.save_states.remote(str(directory / "clients")) for a in self.actors])

    def restore(self, directory: Path) -> int:
        ray.get([a.load_states.remote(str(directory / "clients")) for a in self.actors])
        return ray.get(self.server.load.remote(str(directory / "server.pt")))

    def received_names(self) -> list[str]:
        return ray.get(self.server.received_names.remote())

    def server_state(self):
        return ray.get(self.server.get_state.remote())

    def actor_nodes(self) -> list[str]:
        return ray.get([a.node_id.remote() for a in self.actors])

    def close(self) -> None:
        for a in [*getattr(self, "actors", []), getattr(self, "server", None)]:
            if a is not None:
                with contextlib.suppress(Exception):
                    ray.kill(a)
        self.actors = []
        self.server = None


def _cause(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        import traceback

        return "".join(traceback.format_exception(cause))
    return str(e)
