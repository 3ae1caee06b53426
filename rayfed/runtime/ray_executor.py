"""The Ray executor: a server actor and client actors that each host a cohort of clients.

A training round is one pipeline with a single wait on the driver:

- the shared weights for the round are already in the object store (the previous round's
  aggregation returned them as a second value, so no broadcast call sits on the critical path);
  numpy arrays, read zero-copy by every actor of a node;
- each client actor trains its sampled clients in a few chunks (one call each, queued back to back),
  and returns each chunk's uploads as one packed object (:class:`_UploadBatch`);
- the server's ``train_round`` call starts at once with the chunks' references and pulls each chunk
  as it is ready, aggregating client by client (in client order, so any actor layout gives the same
  floats) while the actors train the next chunk; O(model) heap memory;
- the server checks the failure policy before it commits the new state, and returns the round's
  metrics and failures plus the next broadcast.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np
import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayError

from rayfed.aggregate import PackedTensors
from rayfed.algorithms.base import Algorithm, ClientUpdate
from rayfed.checkpoint import CLIENTS_DIR, SERVER_FILE
from rayfed.config import FederationConfig
from rayfed.data import FederatedDataset
from rayfed.errors import ActorError, ClientError, ConfigError, ServerLost
from rayfed.plan import RunPlan, plan_run
from rayfed.runtime.core import ClientCohort, ClientFailure, CohortSpec, RoundOutcome, ServerCore
from rayfed.runtime.executor import Executor
from rayfed.runtime.placement import Workload, plan_for_bundles, plan_for_cluster
from rayfed.runtime.policy import FailurePolicy
from rayfed.safe_io import ensure_private_dir, write_atomic
from rayfed.tensors import wire_nbytes

__all__ = ["ClientActor", "RayExecutor", "ServerActor", "cause_text", "ray_session", "warm_actors"]

log = logging.getLogger("rayfed")
startup_log = logging.getLogger("rayfed.startup")  # shown by the CLI without -v


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


def _unpacked(broadcast: Any) -> Mapping[str, Any]:
    """The broadcast as a mapping (the server sends it packed, see :class:`_UploadBatch`)."""
    return broadcast.tensors(0) if isinstance(broadcast, _UploadBatch) else broadcast


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

    def train(self, round: int, client_ids: list[int], broadcast, payloads) -> tuple[list, Optional[_UploadBatch]]:
        """Train a chunk of this actor's clients: their metadata (or failures) and one packed batch of
        their uploads, returned as one object that the server pulls (the driver never fetches it).
        One object per chunk, not per client: each object costs a store round trip whatever its size.
        """
        results = self.cohort.train(round, client_ids, _unpacked(broadcast), payloads)
        ok = [r for r in results if not isinstance(r, ClientFailure)]
        batch = _UploadBatch({r.client_id: r.tensors for r in ok}) if ok else None
        return [r if isinstance(r, ClientFailure)
                else ClientUpdate(r.client_id, r.round, r.num_samples, {}, r.metrics) for r in results], batch

    def train_async(self, round: int, client_id: int, broadcast, payloads, nonce: int):
        """One client's asynchronous update (:meth:`ClientCohort.train_async`): metadata plus a reference."""
        r = self.cohort.train_async(round, client_id, _unpacked(broadcast), payloads, nonce=nonce)
        if isinstance(r, ClientFailure):
            return r
        return ClientUpdate(r.client_id, r.round, r.num_samples, {}, r.metrics), ray.put(r.tensors)

    def evaluate(self, round: int, client_ids: list[int], broadcast, payloads) -> list:
        return self.cohort.evaluate(round, client_ids, _unpacked(broadcast), payloads)

    def finalize(self, round: int, client_ids: list[int], broadcast, payloads) -> list:
        return self.cohort.finalize(round, client_ids, _unpacked(broadcast), payloads)

    def export(self, round: int, client_ids: list[int], broadcast, payloads, directory: str) -> list:
        """Write these clients' personalized models under ``directory`` (on this actor's node)."""
        return self.cohort.export(round, client_ids, _unpacked(broadcast), payloads, directory)

    def save_states(self, directory: str, round: int = -1) -> list[int]:
        return self.cohort.save_states(directory, round)

    def persist_states(self, directory: str, round: int) -> None:
        """Save the states changed since the last call under ``directory`` (on this actor's node)."""
        self.cohort.persist_states(directory, round)

    def state_files(self, round: int) -> list[tuple[str, bytes]]:
        """Every client state of this actor as safe files (``(name, bytes)``), for a checkpoint."""
        with tempfile.TemporaryDirectory() as d:
            self.cohort.save_states(d, round)
            return [(p.name, p.read_bytes()) for p in sorted(Path(d).iterdir())]

    def load_state_files(self, files: list[tuple[str, bytes]]) -> list[int]:
        """Load this actor's clients' states from checkpoint files (``(name, bytes)``)."""
        with tempfile.TemporaryDirectory() as d:
            for name, data in files:
                (Path(d) / Path(name).name).write_bytes(data)
            return self.cohort.load_states(d)

    def data_nbytes(self) -> int:
        """Bytes of the data this actor holds (its clients' shards only)."""
        return self.cohort.data_nbytes()

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
    carried. So an upload that is already one buffer (a :class:`~rayfed.aggregate.PackedTensors`,
    what :meth:`Algorithm.upload` makes) rides as that buffer; otherwise arrays under
    ``PACK_BELOW`` bytes are packed into one flat buffer per dtype. The index (names, dtypes,
    offsets, shapes) is pickled into one bytes object up front. Larger arrays and non-array values
    ride as they are (packing them would only add a copy). :meth:`tensors` gives a client's values
    back, packed arrays as read-only views. The server's broadcast travels the same way (as client 0).
    """

    PACK_BELOW = 1 << 16

    def __init__(self, uploads: Mapping[int, Mapping[str, Any]]) -> None:
        parts: dict[str, list[np.ndarray]] = {}
        used: dict[str, int] = {}
        index: dict[int, Any] = {}
        self.loose: dict[int, dict[str, Any]] = {}
        self.whole: dict[int, np.ndarray] = {}
        for cid, tensors in uploads.items():
            if isinstance(tensors, PackedTensors):
                self.whole[cid] = tensors.flat
                index[cid] = tensors.layout
                continue
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
        self._index: Optional[dict[int, Any]] = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_index": None}

    def client_ids(self) -> list[int]:
        return list(self._entries())

    def tensors(self, client_id: int) -> Mapping[str, Any]:
        """A client's uploads: a :class:`~rayfed.aggregate.PackedTensors` over its stretch of the
        packed buffer when all of it is packed in one dtype (the usual case), else a dict.
        """
        entries = self._entries()[client_id]
        if client_id in self.whole:
            return PackedTensors(self.whole[client_id], entries)
        if entries and client_id not in self.loose and len({dt for _, dt, _, _ in entries}) == 1:
            dt, start = entries[0][1], entries[0][2]
            end = entries[-1][2] + math.prod(entries[-1][3])
            return PackedTensors(self.packed[dt][start:end], tuple((k, off - start, shape)
                                                                   for k, _, off, shape in entries))
        loose = self.loose.get(client_id, {})
        return {k: loose[k] if dt is None else self.packed[dt][off:off + math.prod(shape)].reshape(shape)
                for k, dt, off, shape in entries}

    def _entries(self) -> dict[int, Any]:
        if self._index is None:
            self._index = pickle.loads(self.index)
        return self._index


def short_cause(e: BaseException) -> str:
    """One line for a Ray error (the last line of the remote traceback, or the message's first)."""
    text = cause_text(e).strip().splitlines()
    last = text[-1] if text else type(e).__name__
    return last if len(last) <= 300 else last[:297] + "..."


class _ChunkStream:
    """A round's updates in client order, pulled from the client actors' chunks as they are ready.

    ``chunks`` are ``(actor index, client_ids, reference)`` triples (:meth:`ClientActor.train`
    results). Each chunk is fetched once, when its first client is due, and dropped after its last;
    numpy arrays come out of the object store zero-copy, so the heap holds about one client's
    converted tensors at a time. A chunk whose actor died or missed the deadline records the actor
    as *lost* (once, with a one-line cause); its clients are failures of the round unless the
    executor will rerun the round (``recover``). A chunk that failed otherwise fails its clients.
    Metadata of the updates and the failures are collected for the driver.
    """

    def __init__(self, round: int, chunks: list[tuple[int, list[int], ray.ObjectRef]], timeout_s: Optional[float],
                 recover: bool = False):
        self.round = round
        self.chunks = chunks
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self.recover = recover
        self.metas: list[ClientUpdate] = []
        self.failures: list[ClientFailure] = []
        self.lost: dict[int, str] = {}  # actor index -> one-line cause
        self.wait_seconds = 0.0  # blocked on chunks still training (not aggregation work)

    def _fetch(self, i: int) -> tuple[dict[int, Any], Optional[_UploadBatch]]:
        actor, ids, ref = self.chunks[i]
        t0 = time.perf_counter()
        try:
            wait = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
            results, batch = ray.get(ref, timeout=wait)
        except (GetTimeoutError, RayActorError) as e:
            if isinstance(e, GetTimeoutError):
                cause = f"not done within the round deadline (runtime.round_timeout_s={self.timeout_s:.4g})"
            else:
                cause = short_cause(e)
            self.lost.setdefault(actor, cause)
            if self.recover:
                return {}, None
            stage = "timeout" if isinstance(e, GetTimeoutError) else "train"
            detail = f"client actor {actor} lost: {self.lost[actor]}"
            return {c: ClientFailure(c, self.round, stage, detail) for c in ids}, None
        except RayError as e:  # the call failed outside the clients' own code
            detail = cause_text(e)
            return {c: ClientFailure(c, self.round, "train", detail) for c in ids}, None
        finally:
            self.wait_seconds += time.perf_counter() - t0
        return {r.client_id: r for r in results}, batch

    def __iter__(self) -> Iterator[ClientUpdate]:
        where = {c: i for i, (_, ids, _) in enumerate(self.chunks) for c in ids}
        left = [len(ids) for _, ids, _ in self.chunks]
        held: dict[int, tuple[dict[int, Any], Optional[_UploadBatch]]] = {}
        for c in sorted(where):
            i = where[c]
            if i not in held:
                held[i] = self._fetch(i)
            results, batch = held[i]
            r = results.get(c)
            left[i] -= 1
            if left[i] == 0:
                del held[i]
            if r is None:  # its actor is lost and the round will be rerun
                continue
            if isinstance(r, ClientFailure):
                self.failures.append(r)
                continue
            self.metas.append(r)
            yield ClientUpdate(r.client_id, r.round, r.num_samples, batch.tensors(c), r.metrics)


class ServerActor:
    """A Ray actor hosting the :class:`ServerCore`: shared weights, aggregator and payloads."""

    def __init__(self, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(threads)
        self.core: Optional[ServerCore] = None

    def setup(self, *args: Any, payload_probe: Optional[int] = None, **kwargs: Any) -> tuple[int, int]:
        """Build the server state (arguments of :class:`ServerCore`). Returns the bytes of the first
        broadcast (an upload-size estimate) and of client ``payload_probe``'s payload (0 when None),
        which size the executor's calls.
        """
        self.core = None
        self.core = ServerCore(*args, **kwargs)
        self.policy = FailurePolicy(self.core.cfg.runtime)
        probe = self.core.payloads(0, [payload_probe]).get(payload_probe, {}) if payload_probe is not None else {}
        return wire_nbytes(self.core.broadcast(0)), wire_nbytes(probe)

    def teardown(self) -> None:
        self.core = None

    def broadcast(self, round: int) -> _UploadBatch:
        """The round's broadcast, packed (one buffer per dtype: cheap to store and to read)."""
        return _UploadBatch({0: self.core.broadcast(round)})

    def payloads(self, round: int, groups: list[list[int]]):
        per = self.core.payloads(round, [c for g in groups for c in g])
        out = [{c: per[c] for c in g if c in per} for g in groups]
        return out if len(groups) > 1 else out[0]

    def train_round(self, round: int, chunks: list[tuple[int, list[int], ray.ObjectRef]], num_sampled: int,
                    timeout_s: Optional[float], recover: bool = False) -> tuple[dict, dict]:
        """Aggregate a round as its chunks arrive; commit unless the failure policy says otherwise,
        or (``recover``) a client actor was lost, in which case the driver reruns the round.

        ``chunks`` holds references nested in a list, so this call starts at once and overlaps the
        aggregation of early chunks with the training of later ones. Returns ``(report, broadcast)``:
        the report holds the updates' metadata, the failures, the lost actors and the server
        metrics; the broadcast is the next round's (called with ``num_returns=2``, it goes straight
        to the object store).
        """
        stream = _ChunkStream(round, chunks, timeout_s, recover)

        def commit(refused: int) -> bool:
            return not (recover and stream.lost) and self.policy.survives(num_sampled,
                                                                          len(stream.failures) + refused)

        server = self.core.aggregate(round, stream, commit=commit)
        refused = server.pop("rejected")
        # aggregate_seconds: the server's own work, without the time it waited for chunks to train
        server["aggregate_seconds"] = max(0.0, server["aggregate_seconds"] - stream.wait_seconds)
        server["wait_seconds"] = stream.wait_seconds
        gone = {f.client_id for f in refused}
        report = {"metas": [m for m in stream.metas if m.client_id not in gone],
                  "failures": sorted(stream.failures + refused, key=lambda f: f.client_id), "lost": stream.lost,
                  "server": server}
        return report, self.broadcast(round + 1)

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

    def state_bytes(self) -> bytes:
        """The server state as the bytes of its safe file (for a checkpoint on the driver)."""
        with tempfile.TemporaryDirectory() as d:
            self.core.save(Path(d) / SERVER_FILE)
            return (Path(d) / SERVER_FILE).read_bytes()

    def load_bytes(self, data: bytes) -> int:
        """Restore the server state from the bytes of its safe file; returns its round."""
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / SERVER_FILE).write_bytes(data)
            return self.core.load(Path(d) / SERVER_FILE)

    def state(self):
        """The server state, its torch objects on the host (the driver may have no GPU)."""
        return self.core.host_state()

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
                 model_factory: Optional[Callable] = None, *, plan: Optional[RunPlan] = None,
                 placement_group=None, state_dir: Optional[str] = None) -> None:
        if not ray.is_initialized():
            raise RuntimeError("RayExecutor needs a connected Ray; use rayfed.Federation, which joins or "
                               "starts one, or call ray.init() first")
        self.cfg = cfg
        self.policy = FailurePolicy(cfg.runtime)
        self.run_plan = run = plan if plan is not None else plan_run(cfg, algorithm, dataset, model_factory)[0]
        # the base hook sends nothing: skip that server call (it sits on every round's critical path)
        self._has_payloads = type(algorithm).payloads is not Algorithm.payloads
        # the base broadcast is the server weights whatever the round: one object serves every call
        # until the state changes (train_round returns the next one)
        self._broadcast_any_round = type(algorithm).broadcast is Algorithm.broadcast
        self._bcast: Optional[tuple[int, ray.ObjectRef]] = None
        self._bytes_per_client = 0.0  # largest upload of a client in the last round
        self._payload_bytes = 0.0  # one client's payload (FedTP's generated tensors), measured at set-up
        self._agg_per_client = 0.0  # the server's aggregation seconds per client in the last round
        rt = cfg.runtime
        #: where actors save their clients' states after each round (for recovery; see runtime.recovery)
        self.state_dir = state_dir or rt.state_dir or tempfile.mkdtemp(prefix="rayfed-state-")
        self._durations: dict[str, float] = {}  # slowest call of each kind so far (automatic deadlines)
        self._persisting: list[ray.ObjectRef] = []
        self._actor_failures: list[ActorError] = []
        ids = list(dataset.client_ids)
        work = _workload(cfg, run)
        if placement_group is not None:  # a Tune trial's group: bundle 0 hosts the trial itself
            current = ray.util.get_current_placement_group()
            placed = plan_for_bundles(cfg, ids, placement_group.bundle_specs,
                                      first_is_taken=current is not None and current.id == placement_group.id,
                                      work=work)
        else:
            placed = plan_for_cluster(cfg, ids, float(ray.cluster_resources().get("CPU", 1.0)), work)
        #: where the actors go and which clients each hosts
        self.placement = placed
        self.num_actors = len(placed.actors)
        self.cpus_per_actor = min(a.num_cpus for a in placed.actors)
        self.groups = [a.clients for a in placed.actors]
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
        skey = ("server", rt.server_num_cpus, rt.server_num_gpus, server_threads)
        self.server = _acquire(RemoteServerActor, skey if self._poolable else None,
                               {"num_cpus": rt.server_num_cpus, "num_gpus": rt.server_num_gpus,
                                **where(placed.server_bundle_index, None)},
                               threads=server_threads)
        self._server_key = skey
        self.actors = []
        for a in placed.actors:
            opts: dict[str, Any] = {"num_cpus": a.num_cpus, "num_gpus": a.num_gpus, "resources": dict(a.resources),
                                    "max_restarts": -1 if rt.recovery != "none" else 0,
                                    **where(a.bundle_index, "SPREAD")}
            threads = rt.torch_threads or max(1, int(a.num_cpus))
            key = ("client", a.num_cpus, a.num_gpus, tuple(sorted(dict(a.resources).items())), threads)
            self.actors.append(_acquire(RemoteClientActor, key if self._poolable else None, opts, threads))
            self._keys[len(self.actors) - 1] = key
        server_ready = self.server.setup.remote(cfg, algorithm, dataset.info, dataset.client_sizes(), model_factory,
                                                plan=run, payload_probe=ids[0] if self._has_payloads else None)
        # each actor receives only its own clients' shards
        self._specs = [CohortSpec(cfg, algorithm, a.clients, dataset.subset(a.clients), run.specs_of(a.clients),
                                  run.partial_keys, model_factory, owner=f"actor_{i}", state_dir=self.state_dir)
                       for i, a in enumerate(placed.actors)]
        setups = [actor.setup.remote(spec) for actor, spec in zip(self.actors, self._specs)]
        self._await_placement(setups + [server_ready], placed)
        # surface set-up errors (data, model) now, naming a client of the failing actor
        for i, ref in enumerate(setups):
            try:
                ray.get(ref)
            except RayError as e:
                self.close(reuse=False)
                raise ClientError(self.groups[i][0], -1, "setup", cause_text(e)) from e
        try:
            self._bytes_per_client, self._payload_bytes = map(float, ray.get(server_ready))
        except RayError as e:
            self.close(reuse=False)
            raise RuntimeError(f"the server actor failed to start: {cause_text(e)}") from e

    # -- helpers -------------------------------------------------------------------------------
    def _by_actor(self, client_ids: list[int]) -> list[tuple[int, list[int]]]:
        per: dict[int, list[int]] = {}
        for c in sorted(client_ids):
            per.setdefault(self.owner[c], []).append(c)
        return sorted(per.items())

    def _broadcast_ref(self, round: int) -> ray.ObjectRef:
        if self._bcast is not None and (self._broadcast_any_round or self._bcast[0] == round):
            return self._bcast[1]
        b = self.server.broadcast.remote(round)
        self._bcast = (round, b)
        return b

    def forget_broadcast(self) -> None:
        """The server state changed outside :meth:`train_round` (asynchronous updates, a restore)."""
        self._bcast = None

    def _chunks(self, ids: list[int]) -> list[list[int]]:
        """An actor's clients of a round, split into training calls.

        Each extra call costs the actor a few milliseconds (return, store, next dispatch), and
        what a split buys is the server aggregating the early clients while the actor trains the
        last ones. So, from the previous round's measurements: one call unless aggregating the
        clients would take the server longer than :data:`SPLIT_WORTH_S`; then the last clients
        (about :data:`SPLIT_WORTH_S` of aggregation) go in a call of their own. Either way no call
        returns more than :data:`CHUNK_BYTES` of uploads (before the first round: the size of the
        broadcast), which bounds the object-store memory of a round.
        """
        split = len(ids)
        if self._agg_per_client * len(ids) > SPLIT_WORTH_S:
            split = len(ids) - max(1, int(SPLIT_WORTH_S // self._agg_per_client))
        return [c for p in (ids[:split], ids[split:]) for c in _capped(p, self._bytes_per_client)]

    def _payload_refs(self, round: int, parts: list[tuple[int, list[int]]]):
        b = self._broadcast_ref(round)
        groups = [ids for _, ids in parts]
        if not self._has_payloads:
            return b, [{}] * len(groups)
        p = self.server.payloads.options(num_returns=len(groups)).remote(round, groups)
        return b, (p if len(groups) > 1 else [p])

    def _waves(self, ids: list[int]) -> list[list[int]]:
        """An actor's clients in calls of at most :data:`CHUNK_BYTES` of payloads (one call without)."""
        return _capped(ids, self._payload_bytes if self._has_payloads else 0.0)

    def _call(self, method: str, round: int, client_ids: list[int], *extra: Any) -> tuple[list, list[ClientError]]:
        """Evaluate, finalize or export ``client_ids`` on their actors (every actor at once; ``extra``
        arguments follow the payloads).

        With per-client payloads (FedTP's generated tensors), an actor's clients go in calls of at
        most :data:`CHUNK_BYTES` of payloads, each actor's next call submitted when its last one is
        done, so a round over every client holds at most one call's payloads per actor in the
        object store, however many clients there are (at ViT-Base size one client's generated Q/K/V
        is about 80 MB).
        """
        t0 = time.monotonic()
        b = self._broadcast_ref(round)
        by_actor = dict(self._by_actor(client_ids))
        queues = {a: self._waves(ids) for a, ids in by_actor.items()}
        inflight: dict[ray.ObjectRef, list[int]] = {}
        owner: dict[ray.ObjectRef, int] = {}
        results: dict[int, list] = {a: [] for a in by_actor}  # per actor: its results so far
        failures: dict[int, list[ClientError]] = {a: [] for a in by_actor}
        retried: set[int] = set()

        def submit(a: int) -> None:
            ids = queues[a].pop(0)
            payload = self.server.payloads.remote(round, [ids]) if self._has_payloads else {}
            ref = getattr(self.actors[a], method).remote(round, ids, b, payload, *extra)
            inflight[ref], owner[ref] = ids, a

        def lose(actors: list[int], cause: str) -> list[int]:
            """Record lost actors; restart and requeue (all their clients, once) those that may retry."""
            again = [a for a in actors if self.cfg.runtime.recovery != "none" and a not in retried]
            self._lost([ActorError(a, by_actor[a], round + 1, method, cause, recovered=a in again) for a in actors])
            for ref in [r for r, a in owner.items() if a in actors]:
                del inflight[ref], owner[ref]
            if self.cfg.runtime.recovery != "none":
                self._restart(actors)
            for a in actors:
                results[a] = []
                if a in again:
                    retried.add(a)
                    failures[a] = []
                    queues[a] = self._waves(by_actor[a])
                else:
                    queues[a] = []
                    failures[a] = [ClientFailure(c, round, method, f"client actor {a} lost: {cause}").to_error()
                                   for c in by_actor[a]]
            return again

        for a in queues:
            submit(a)
        deadline_s = self._deadline(method)
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        while inflight:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=wait)
            if not ready:  # past the deadline: the actors still busy are treated as lost
                late = sorted(set(owner.values()))
                for a in lose(late, f"not done within the deadline (runtime.round_timeout_s={deadline_s:.4g})"):
                    submit(a)
                deadline = None if deadline_s is None else time.monotonic() + deadline_s
                continue
            ref = ready[0]
            ids, a = inflight.pop(ref), owner.pop(ref)
            try:
                res = ray.get(ref)
            except RayActorError as e:
                if lose([a], short_cause(e)):
                    submit(a)
                continue
            except RayError as e:
                failures[a] += [ClientFailure(c, round, method, cause_text(e)).to_error() for c in ids]
            else:
                ok, failed = self._split(res)
                results[a] += ok
                failures[a] += failed
            if queues[a]:
                submit(a)
        self._took(method, time.monotonic() - t0)
        # results in client order whatever the actor layout (tables and aggregation are deterministic)
        out = sorted((r for rs in results.values() for r in rs), key=lambda r: r["client_id"])
        return out, sorted((f for fs in failures.values() for f in fs), key=lambda f: f.client_id)

    def _await_placement(self, refs: list[ray.ObjectRef], placed: Any) -> None:
        """Wait for the actors to start and set up, printing progress; actors that Ray cannot place
        within ``runtime.placement_timeout_s`` are an error naming what was asked and what the cluster has.
        """
        rt = self.cfg.runtime
        start, pending = time.monotonic(), list(refs)
        shown = -1
        while pending:
            left = None if rt.placement_timeout_s is None else rt.placement_timeout_s - (time.monotonic() - start)
            if left is not None and left <= 0:
                self.close(reuse=False)
                asked = [{"CPU": a.num_cpus, "GPU": a.num_gpus, **dict(a.resources)} for a in placed.actors]
                total = {k: sum(d.get(k, 0) for d in asked) for k in {k for d in asked for k in d}}
                for k, v in placed.server_resources().items():
                    total[k] = total.get(k, 0) + v
                raise ConfigError(
                    f"{len(pending)} of {len(refs)} actors (server and client actors) did not start within "
                    f"runtime.placement_timeout_s={rt.placement_timeout_s}: the run asks for {len(asked)} client "
                    f"actors of {asked[0]} and a server of {placed.server_resources()} ({total} in all); the "
                    f"cluster has {ray.cluster_resources()}, of which {ray.available_resources()} is free. Lower "
                    "runtime.num_actors / num_cpus_per_actor / num_gpus_per_actor / server_num_gpus, or add nodes")
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=min(2.0, left) if left else 2.0)
            done = len(refs) - len(pending)
            if done != shown:
                startup_log.info("actors ready: %d of %d", done, len(refs))
                shown = done

    # -- deadlines and recovery ----------------------------------------------------------------
    def _deadline(self, kind: str) -> Optional[float]:
        """Seconds a call of ``kind`` (train, evaluate, save...) may take (``runtime.round_timeout_s``)."""
        rt = self.cfg.runtime
        if rt.round_timeout_s is None:
            return None
        if kind == "setup":  # (re)starting an actor: building models and loading states, not a round's work
            return 5 * rt.min_timeout_s
        if rt.round_timeout_s != "auto":
            return float(rt.round_timeout_s)
        slowest = self._durations.get(kind)
        return 5 * rt.min_timeout_s if slowest is None else max(rt.min_timeout_s, 10 * slowest)

    def _took(self, kind: str, seconds: float) -> None:
        self._durations[kind] = max(self._durations.get(kind, 0.0), seconds)

    def drain_actor_failures(self) -> list[ActorError]:
        out, self._actor_failures = self._actor_failures, []
        return out

    def _lost(self, events: list[ActorError]) -> None:
        for e in events:
            log.warning("%s", e)
        self._actor_failures += events

    def _restart(self, actors: list[int]) -> None:
        """Restart client actors (killing one that stopped responding; Ray starts it again), build
        their cohorts again and load their clients' states saved after the last complete round.
        """
        for a in actors:
            with contextlib.suppress(Exception):
                ray.kill(self.actors[a], no_restart=False)
        wait = self._deadline("setup")
        until = None if wait is None else time.monotonic() + wait
        for a in actors:
            pause = 0.2
            while True:  # calls fail while Ray restarts the process; the first one after it succeeds
                try:
                    left = None if until is None else max(1.0, until - time.monotonic())
                    ray.get(self.actors[a].setup.remote(self._specs[a]), timeout=left)
                    ray.get(self.actors[a].load_states.remote(self.state_dir), timeout=left)
                    break
                except (RayActorError, GetTimeoutError) as e:
                    gone = isinstance(e, ActorDiedError) and "restart" not in str(e).lower()
                    if gone or (until is not None and time.monotonic() > until):
                        raise RuntimeError(f"client actor {a} could not be restarted after it was lost: "
                                           f"{short_cause(e)}") from e
                    time.sleep(pause)
                    pause = min(2.0, pause * 2)

    def _rollback(self, actors: Iterable[int]) -> None:
        """Reload the clients' states saved after the last complete round (undo a round's training)."""
        ray.get([self.actors[a].load_states.remote(self.state_dir) for a in actors], timeout=self._deadline("setup"))

    def _persist(self, round: int, actors: Iterable[int]) -> None:
        """Queue each actor's save of the states its training of ``round`` changed (awaited before the
        next round).
        """
        if self.cfg.runtime.recovery == "none":
            return
        self._persisting = [self.actors[a].persist_states.remote(self.state_dir, round + 1) for a in actors]

    def _await_persisted(self) -> None:
        refs, self._persisting = self._persisting, []
        if refs:
            ray.get(refs, timeout=self._deadline("save"))

    # -- rounds --------------------------------------------------------------------------------
    def train_round(self, round: int, client_ids: list[int], *, _rerun: bool = False) -> RoundOutcome:
        self._await_persisted()
        t0 = time.monotonic()
        parts = self._by_actor(client_ids)
        b, prefs = self._payload_refs(round, parts)
        chunks = [(a, ids, self.actors[a].train.remote(round, ids, b, prefs[i]))
                  for i, (a, group) in enumerate(parts) for ids in self._chunks(group)]
        recover = self.cfg.runtime.recovery == "exact" and not _rerun
        report_ref, next_b = self.server.train_round.options(num_returns=2).remote(
            round, chunks, len(client_ids), self._deadline("train"), recover)
        try:
            report = ray.get(report_ref)
        except RayError as e:
            self._bcast = None
            raise ServerLost(f"the server actor failed in round {round + 1} (stage aggregate): "
                             f"{short_cause(e)}") from e
        self._bcast = (round + 1, next_b)
        lost: dict[int, str] = report["lost"]
        if lost:
            groups = dict(parts)
            self._lost([ActorError(a, groups[a], round + 1, "train", cause, recovered=recover)
                        for a, cause in sorted(lost.items())])
            if self.cfg.runtime.recovery != "none":
                self._restart(sorted(lost))
            if recover:  # the server did not commit: roll every client back and run the round again
                self._rollback([a for a, _ in parts if a not in lost])
                return self.train_round(round, client_ids, _rerun=True)
        metas: list[ClientUpdate] = report["metas"]
        failed = [f.to_error() for f in report["failures"]]
        self._enforce(round, client_ids, failed, "train")  # the server did not commit if this raises
        if metas:
            self._bytes_per_client = max(m.metrics.get("bytes_up", 0) for m in metas)
            self._agg_per_client = report["server"].get("aggregate_seconds", 0.0) / len(metas)
        self._took("train", time.monotonic() - t0)
        self._persist(round, [a for a, _ in parts if a not in lost])
        return RoundOutcome([m.report() for m in metas], failed, report["server"])

    def evaluate(self, round: int, client_ids: list[int]):
        ok, failed = self._call("evaluate", round, client_ids)
        self._enforce(round, client_ids, failed, "evaluate")
        return ok, failed

    def finalize(self, round: int, client_ids: list[int]):
        ok, failed = self._call("finalize", round, client_ids)
        self._enforce(round, client_ids, failed, "finalize")
        return ok, failed

    def export(self, round: int, client_ids: list[int], directory: Path):
        ok, failed = self._call("export", round, client_ids, str(directory))
        self._enforce(round, client_ids, failed, "export")
        return ok, failed

    def save(self, directory: Path, round: int = -1) -> None:
        """Write a checkpoint into ``directory`` on the driver's machine: every actor sends its state
        files (written where it runs) and the server its state, so the cluster needs no shared
        storage. An actor that does not answer in time is restarted (from its clients' states saved
        after the last round, which are what it holds) and asked again once.
        """
        self._await_persisted()
        wait = self._deadline("save")
        server = self.server.state_bytes.remote()
        calls = {i: a.state_files.remote(round) for i, a in enumerate(self.actors)}
        clients = ensure_private_dir(directory / CLIENTS_DIR)
        for i, ref in calls.items():
            try:
                files = ray.get(ref, timeout=wait)
            except (RayActorError, GetTimeoutError) as e:
                cause = "not done within the deadline" if isinstance(e, GetTimeoutError) else short_cause(e)
                self._lost([ActorError(i, self.groups[i], round, "save", cause, recovered=True)])
                self._restart([i])
                files = ray.get(self.actors[i].state_files.remote(round), timeout=wait)
            for name, data in files:
                write_atomic(clients / name, data)
        try:
            write_atomic(directory / SERVER_FILE, ray.get(server, timeout=wait))
        except (RayError, GetTimeoutError) as e:
            raise ServerLost(f"the server actor failed while saving a checkpoint to {str(directory)!r}: "
                             f"{short_cause(e)}") from e

    def restore(self, directory: Path) -> int:
        """Send every actor the checkpoint's client state files (each keeps its own clients') and the
        server its state.
        """
        self.forget_broadcast()
        files = ray.put([(p.name, p.read_bytes()) for p in sorted((directory / CLIENTS_DIR).glob("*.safetensors"))])
        ray.get([a.load_state_files.remote(files) for a in self.actors])
        return ray.get(self.server.load_bytes.remote((directory / SERVER_FILE).read_bytes()))

    def received_names(self) -> list[str]:
        return ray.get(self.server.received_names.remote())

    def server_state(self):
        return ray.get(self.server.state.remote())

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


#: most bytes of uploads one training call of a client actor returns (see RayExecutor._chunks)
CHUNK_BYTES = 256 * 1024 * 1024
#: server aggregation time worth an extra training call per actor (see RayExecutor._chunks)
SPLIT_WORTH_S = 0.02


def _capped(ids: list[int], bytes_per_client: float) -> list[list[int]]:
    """``ids`` in consecutive calls of at most :data:`CHUNK_BYTES` (one call when the size is unknown)."""
    per = max(1, int(CHUNK_BYTES // bytes_per_client)) if bytes_per_client else max(1, len(ids))
    return [ids[i:i + per] for i in range(0, len(ids), per)]


def _workload(cfg: FederationConfig, run: RunPlan) -> Optional[Workload]:
    """The rounds' sampled clients and each client's work, for placement to balance (one round of
    everyone under full participation); None in asynchronous mode (no rounds to balance).
    """
    if cfg.runtime.mode != "sync":
        return None
    full = run.clients_per_round >= len(run.train_ids)
    return Workload([list(run.train_ids)] if full else run.schedule, run.cost)


def cause_text(e: BaseException) -> str:
    """The remote traceback behind a Ray error (the cause raised in the actor), else its message."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        import traceback

        return "".join(traceback.format_exception(cause))
    return str(e)
