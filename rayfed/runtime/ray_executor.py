"""The Ray executor: a server actor and client actors that each host a cohort of clients.

Per round the server's broadcast goes into the object store once (numpy arrays: zero-copy reads in
every actor of a node); each client actor trains its sampled clients and puts their uploads in the
object store as one object; the driver sees only small metadata and hands the upload references, in
client order, to the server, which pulls each object once (zero-copy) and aggregates the clients one
at a time (O(model) heap memory).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from rayfed.algorithms.base import Algorithm, ClientUpdate
from rayfed.config import FederationConfig
from rayfed.data import FederatedDataset
from rayfed.errors import ClientError
from rayfed.runtime.core import ClientCohort, ClientFailure, CohortSpec, RoundOutcome, ServerCore
from rayfed.runtime.executor import Executor, _update_row
from rayfed.runtime.placement import plan_for_bundles, plan_for_cluster

__all__ = ["ClientActor", "RayExecutor", "ServerActor", "ray_session", "warm_actors"]

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
    # Ray starts workers at niceness 15; client actors do the training, so they should not yield
    # to the driver (matters on a busy machine). Only for a Ray this call starts.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address=address, **init_kwargs)
    try:
        yield True
    finally:
        ray.shutdown()


class ClientActor:
    """A Ray actor hosting a :class:`ClientCohort`: its clients' data and state live here."""

    def __init__(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.cohort: Optional[ClientCohort] = None

    def setup(self, spec: CohortSpec) -> list[int]:
        """Build this actor's cohort (data shards, model, roles); returns its client ids."""
        self.cohort = None
        self.cohort = ClientCohort(spec)
        return sorted(self.cohort.data)

    def teardown(self) -> None:
        """Drop the cohort (back to a warm, empty process for the next federation)."""
        self.cohort = None

    def train(self, round: int, client_ids: list[int], broadcast, payloads) -> list:
        results = self.cohort.train(round, client_ids, broadcast, payloads)
        # tensors go to the object store; the driver only sees metadata and a reference. One put per
        # actor per round, not per client: a put is an IPC round trip to the store (~0.5-1 ms)
        # whatever its size; the server pulls the batch once and streams its clients out of it
        ok = [r for r in results if not isinstance(r, ClientFailure)]
        ref = ray.put(_UploadBatch({r.client_id: r.tensors for r in ok})) if ok else None
        return [r if isinstance(r, ClientFailure)
                else (ClientUpdate(r.client_id, r.round, r.num_samples, {}, r.metrics), ref) for r in results]

    def train_async(self, round: int, client_id: int, broadcast, payloads, nonce: int):
        """One client's asynchronous update (:meth:`ClientCohort.train_async`): metadata plus a reference."""
        r = self.cohort.train_async(round, client_id, broadcast, payloads, nonce=nonce)
        if isinstance(r, ClientFailure):
            return r
        return ClientUpdate(r.client_id, r.round, r.num_samples, {}, r.metrics), ray.put(r.tensors)

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

    def placement_group_id(self) -> Optional[str]:
        """Hex id of the placement group this actor was scheduled in (None outside one)."""
        return ray.get_runtime_context().get_placement_group_id()


class _UploadBatch:
    """One client actor's uploads of one round, stored as one object.

    Ray's serialiser costs per Python object and per numpy buffer, and a small model uploads
    hundreds of small tensors per round, which made the put and the get slower than the work they
    carried. So arrays under ``PACK_BELOW`` bytes are packed into one flat buffer per dtype, and the
    index (names, dtypes, offsets, shapes) is pickled into one bytes object up front. Larger arrays
    and non-array values ride as they are (packing them would only add a copy). :meth:`tensors`
    gives a client's values back, packed arrays as read-only views.
    """

    PACK_BELOW = 1 << 16

    def __init__(self, uploads: dict[int, dict[str, Any]]) -> None:
        parts: dict[str, list[np.ndarray]] = {}
        used: dict[str, int] = {}
        index: dict[int, list[tuple]] = {}
        self.loose: dict[int, dict[str, Any]] = {}
        for cid, tensors in uploads.items():
            entries = []
            for k, v in tensors.items():
                if isinstance(v, np.ndarray) and v.dtype.kind in "biufc" and v.nbytes < self.PACK_BELOW:
                    dt = v.dtype.str
                    entries.append((k, dt, used.get(dt, 0), v.shape))
                    parts.setdefault(dt, []).append(v.ravel())
                    used[dt] = used.get(dt, 0) + v.size
                else:
                    entries.append((k, None, 0, None))
                    self.loose.setdefault(cid, {})[k] = v
            index[cid] = entries
        self.packed = {dt: np.concatenate(p) for dt, p in parts.items()}
        self.index = pickle.dumps(index, protocol=pickle.HIGHEST_PROTOCOL)
        self._index: Optional[dict[int, list[tuple]]] = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_index": None}

    def client_ids(self) -> list[int]:
        return list(self._entries())

    def tensors(self, client_id: int) -> dict[str, Any]:
        loose = self.loose.get(client_id, {})
        return {k: loose[k] if dt is None else self.packed[dt][off:off + math.prod(shape)].reshape(shape)
                for k, dt, off, shape in self._entries()[client_id]}

    def _entries(self) -> dict[int, list[tuple]]:
        if self._index is None:
            self._index = pickle.loads(self.index)
        return self._index


def _pull(items: list[tuple[ClientUpdate, ray.ObjectRef]]) -> Iterator[ClientUpdate]:
    """The updates behind ``(metadata, reference)`` items, in item order, each object fetched once.

    A reference is one client's tensors or an actor's :class:`_UploadBatch`. Numpy arrays come out
    of the object store zero-copy (read-only views of shared memory), so the heap holds one
    client's converted tensors at a time, whatever the number of clients.
    """
    batches: dict[ray.ObjectRef, _UploadBatch] = {}
    for meta, ref in items:
        obj = batches.get(ref)
        if obj is None:
            obj = ray.get(ref)
            if isinstance(obj, _UploadBatch):
                batches[ref] = obj
        tensors = obj.tensors(meta.client_id) if isinstance(obj, _UploadBatch) else obj
        yield ClientUpdate(meta.client_id, meta.round, meta.num_samples, tensors, meta.metrics)


class ServerActor:
    """A Ray actor hosting the :class:`ServerCore`: shared weights, aggregator and payloads."""

    def __init__(self, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(threads)
        self.core: Optional[ServerCore] = None

    def setup(self, *args: Any) -> None:
        self.core = None
        self.core = ServerCore(*args)

    def teardown(self) -> None:
        self.core = None

    def broadcast(self, round: int):
        return self.core.broadcast(round)

    def payloads(self, round: int, groups: list[list[int]]):
        per = self.core.payloads(round, [c for g in groups for c in g])
        out = [{c: per[c] for c in g if c in per} for g in groups]
        return out if len(groups) > 1 else out[0]

    def aggregate(self, round: int, items: list[tuple[ClientUpdate, ray.ObjectRef]]) -> dict:
        return self.core.aggregate(round, _pull(items))

    def apply_async(self, round: int, items: list[tuple[ClientUpdate, ray.ObjectRef]], scales: list[float]) -> dict:
        """Apply asynchronous updates (:meth:`ServerCore.apply_async`), pulling one at a time."""
        def stream():
            for meta, ref in items:
                yield ClientUpdate(meta.client_id, meta.round, meta.num_samples, ray.get(ref), meta.metrics)

        return self.core.apply_async(round, stream(), scales)

    def received_names(self) -> list[str]:
        return self.core.received_names()

    def save(self, path: str) -> None:
        self.core.save(path)

    def load(self, path: str) -> int:
        return self.core.load(path)

    def get_state(self):
        return self.core.state

    def placement_group_id(self) -> Optional[str]:
        return ray.get_runtime_context().get_placement_group_id()


RemoteClientActor = ray.remote(ClientActor)
RemoteServerActor = ray.remote(ServerActor)


class _ActorPool:
    """Idle actor processes kept warm between federations (imports and start-up paid once)."""

    def __init__(self) -> None:
        self.idle: dict[tuple, list] = {}

    def take(self, key: tuple):
        lst = self.idle.get(key)
        return lst.pop() if lst else None

    def give(self, key: tuple, handle) -> None:
        self.idle.setdefault(key, []).append(handle)

    def kill_all(self) -> None:
        for handles in self.idle.values():
            for h in handles:
                with contextlib.suppress(Exception):
                    ray.kill(h)
        self.idle.clear()


_POOL: Optional[_ActorPool] = None


@contextlib.contextmanager
def warm_actors() -> Iterator[None]:
    """Within the block, federations hand their actors back to a pool instead of killing them, and
    later federations with the same resource shape reuse them (e.g. the methods of a comparison).
    Pooled actors keep their CPU reservation until the block ends, when they are killed.
    """
    global _POOL
    if _POOL is not None:
        yield
        return
    _POOL = _ActorPool()
    try:
        yield
    finally:
        pool, _POOL = _POOL, None
        pool.kill_all()


def _acquire(remote_cls, key: Optional[tuple], options: dict, *args: Any, **kwargs: Any):
    handle = _POOL.take(key) if (_POOL is not None and key is not None) else None
    return handle if handle is not None else remote_cls.options(**options).remote(*args, **kwargs)


class RayExecutor(Executor):
    """Server and client actors on the Ray cluster this process is connected to."""

    def __init__(self, cfg: FederationConfig, algorithm: Algorithm, dataset: FederatedDataset,
                 model_factory: Optional[Callable] = None, *, placement_group=None) -> None:
        if not ray.is_initialized():
            raise RuntimeError("RayExecutor needs a connected Ray; use rayfed.Federation, which joins or "
                               "starts one, or call ray.init() first")
        self.cfg = cfg
        # the base hook sends nothing: skip that server call (it sits on every round's critical path)
        self._has_payloads = type(algorithm).payloads is not Algorithm.payloads
        rt = cfg.runtime
        ids = list(dataset.client_ids)
        if placement_group is not None:  # a Tune trial's group: bundle 0 hosts the trial itself
            current = ray.util.get_current_placement_group()
            plan = plan_for_bundles(cfg, ids, placement_group.bundle_specs,
                                    first_is_taken=current is not None and current.id == placement_group.id)
        else:
            plan = plan_for_cluster(cfg, ids, float(ray.cluster_resources().get("CPU", 1.0)))
        self.plan = plan
        self.num_actors = len(plan.actors)
        self.cpus_per_actor = min(a.num_cpus for a in plan.actors)
        self.groups = [a.clients for a in plan.actors]
        self.owner = {c: i for i, g in enumerate(self.groups) for c in g}

        def where(bundle_index: Optional[int], default: Any) -> dict[str, Any]:
            if placement_group is None:
                return {"scheduling_strategy": default} if default else {}
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group, placement_group_bundle_index=bundle_index)}

        # warm-pool reuse only outside placement groups (a pool outlives any one group)
        self._poolable = placement_group is None
        server_threads = rt.torch_threads or max(1, int(rt.server_num_cpus))
        self._keys: dict[int, tuple] = {}
        skey = ("server", rt.server_num_cpus, server_threads)
        self.server = _acquire(RemoteServerActor, skey if self._poolable else None,
                               {"num_cpus": rt.server_num_cpus, **where(plan.server_bundle_index, None)},
                               threads=server_threads)
        self._server_key = skey
        self.actors = []
        for a in plan.actors:
            opts: dict[str, Any] = {"num_cpus": a.num_cpus, "num_gpus": a.num_gpus, "resources": dict(a.resources),
                                    **where(a.bundle_index, "SPREAD")}
            threads = rt.torch_threads or max(1, int(a.num_cpus))
            key = ("client", a.num_cpus, a.num_gpus, tuple(sorted(dict(a.resources).items())), threads)
            self.actors.append(_acquire(RemoteClientActor, key if self._poolable else None, opts, threads))
            self._keys[len(self.actors) - 1] = key
        server_ready = self.server.setup.remote(cfg, algorithm, dataset.info, dataset.client_sizes(),
                                                model_factory)
        setups = [actor.setup.remote(CohortSpec(cfg, algorithm, a.clients, model_factory))
                  for actor, a in zip(self.actors, plan.actors)]
        # surface set-up errors (data, model) now, naming a client of the failing actor
        for i, ref in enumerate(setups):
            try:
                ray.get(ref)
            except RayError as e:
                self.close(reuse=False)
                raise ClientError(self.groups[i][0], -1, "setup", _cause(e)) from e
        try:
            ray.get(server_ready)
        except RayError as e:
            self.close(reuse=False)
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
        if not self._has_payloads:
            return b, [{}] * len(groups)
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
        # results in client order whatever the actor layout (tables and aggregation are deterministic)
        out.sort(key=lambda r: r[0].client_id if isinstance(r, tuple) else r["client_id"])
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

    def close(self, reuse: bool = True) -> None:
        """Kill the actors, or hand them back to the warm pool when one is active."""
        keys = getattr(self, "_keys", {})
        pairs = [(a, keys.get(i)) for i, a in enumerate(getattr(self, "actors", []))]
        if getattr(self, "server", None) is not None:
            pairs.append((self.server, getattr(self, "_server_key", None)))
        keep = reuse and _POOL is not None and getattr(self, "_poolable", False)
        if keep:
            try:
                ray.get([a.teardown.remote() for a, _ in pairs])
            except RayError:
                keep = False
        for a, key in pairs:
            if keep and key is not None:
                _POOL.give(key, a)
            else:
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
