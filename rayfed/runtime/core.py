"""The client cohort and the server, without Ray.

:class:`ClientCohort` owns a set of clients: their data shards and private state stay in it between
rounds. :class:`ServerCore` owns the server state. The Ray actors in :mod:`rayfed.runtime.actors`
wrap these same classes, and the local executor uses them in-process, so both paths run the same
code.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from rayfed.algorithms.base import AUX, Algorithm, ClientContext, ClientState, ClientUpdate, ServerState
from rayfed.clients import ClientSpec, Structure
from rayfed.config import FederationConfig
from rayfed.data import DatasetInfo, FederatedDataset
from rayfed.errors import ClientError
from rayfed.models.prepare import build_structure
from rayfed.models.views import tensors
from rayfed.plan import RunPlan
from rayfed.robust import (
    MESSAGE_ADDING_KINDS,
    AddedMessages,
    Attack,
    RobustAggregator,
    from_update,
    to_update,
    upload_kind,
)
from rayfed.roles import SERVER_HELD, UPLOADABLE, Role, RoleMap
from rayfed.runtime.state_store import ClientStateStore
from rayfed.runtime.validation import UpdateValidator
from rayfed.safe_io import read_state, write_state
from rayfed.tensors import SparseTensor, is_sparse, wire_nbytes
from rayfed.training import resolve_device, warm_up

__all__ = ["ClientCohort", "ClientFailure", "CohortSpec", "ServerCore", "client_seed"]

_STAGE_CODES = {"train": 1, "evaluate": 2, "finalize": 3, "export": 4}


def client_seed(seed: int, round: int, client_id: int, stage: str) -> int:
    """The seed of one client's work in one round: independent of which actor runs it."""
    ss = np.random.SeedSequence([seed, max(round, 0), client_id, _STAGE_CODES.get(stage, 0)])
    return int(ss.generate_state(1, dtype=np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF)


@dataclass
class ClientFailure:
    """A client's exception, carried back as data so one client cannot fail its cohort."""

    client_id: int
    round: int
    stage: str
    detail: str

    def to_error(self) -> ClientError:
        """The :class:`~rayfed.errors.ClientError` this failure is reported as, numbering rounds as the
        metrics table does (from 1; ``round`` here is the runtime's 0-based round of the work, and
        the post-training stage runs at ``rounds``).
        """
        shown = self.round if self.stage == "finalize" or self.round < 0 else self.round + 1
        return ClientError(self.client_id, shown, self.stage, self.detail)


@dataclass
class CohortSpec:
    """Everything an actor needs to build its cohort (small and picklable).

    Attributes:
        config: the run's config.
        algorithm: the algorithm object.
        client_ids: the cohort's clients.
        dataset: their shards (:meth:`~rayfed.data.FederatedDataset.subset`; the local executor
            passes the driver's whole dataset).
        specs: each client's description (depth tier, tasks...), from the run plan.
        partial_keys: tensors only some structures hold (``RunPlan.partial_keys``).
        model_factory: the user's ``factory(info)``, if any.
        device: the torch device (default ``runtime.device``).
        owner: the name of the cohort's state file (one per actor).
        state_dir: the folder of its per-round state files and spilled states (node-local).
    """

    config: FederationConfig
    algorithm: Algorithm
    client_ids: list[int]
    dataset: FederatedDataset
    specs: Mapping[int, ClientSpec]
    partial_keys: frozenset = frozenset()
    model_factory: Optional[Callable[[DatasetInfo], torch.nn.Module]] = None
    device: Optional[str] = None
    owner: str = "cohort"
    state_dir: Optional[str] = None


def _model_source(cfg: FederationConfig, factory):
    return factory if factory is not None else cfg.model


def _peft(cfg: FederationConfig):
    """``model.peft`` when set (it applies to a ``model_factory``'s model too)."""
    return cfg.model.peft if cfg.model.peft.enabled else None


def _to_host(x: Any) -> Any:
    if isinstance(x, torch.nn.Module):
        return copy.deepcopy(x).to("cpu")
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu")
    if isinstance(x, dict):
        return {k: _to_host(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_host(v) for v in x)
    return x


class _Built:
    """One structure's model in a cohort: the model object its clients share, roles, initial values."""

    def __init__(self, model: torch.nn.Module, roles: RoleMap, partial: frozenset) -> None:
        self.model, self.roles = model, roles
        self.initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        # frozen tensors never change, so only these can carry over from the previous client
        self.resettable = [k for k in self.initial if roles[k] != Role.FROZEN]
        #: server-held tensors that only some structures hold, and this one does not (not sent to it)
        self.absent = frozenset(k for k in partial if k not in roles)
        self._view: Optional[tuple[int, Mapping, Mapping, int]] = None

    def broadcast_view(self, broadcast: Mapping) -> tuple[Mapping, int]:
        """The part of ``broadcast`` this structure holds, and its bytes (cached per broadcast)."""
        if self._view is not None and self._view[0] == id(broadcast) and self._view[1] is broadcast:
            return self._view[2], self._view[3]
        view = broadcast if not self.absent else {k: v for k, v in broadcast.items() if k not in self.absent}
        out = (id(broadcast), broadcast, view, wire_nbytes(view))
        self._view = out
        return out[2], out[3]


class ClientCohort:
    """A cohort of clients in one process: one model object per distinct structure among them."""

    def __init__(self, spec: CohortSpec) -> None:
        cfg = spec.config
        self.cfg = cfg
        self.algorithm = spec.algorithm
        if cfg.runtime.torch_threads:
            torch.set_num_threads(cfg.runtime.torch_threads)
        self.device = resolve_device(spec.device or cfg.runtime.device)
        ds = spec.dataset
        self.num_clients = ds.num_clients
        self.info = ds.info
        self.tasks = {t.name: t for t in ds.info.task_infos()}
        self.data = {cid: ds.client_data(cid) for cid in spec.client_ids}
        self.specs = {cid: spec.specs[cid] for cid in spec.client_ids}
        self.built: dict[Structure, _Built] = {}
        for structure in sorted({s.structure for s in self.specs.values()}, key=repr):
            model, roles = build_structure(_model_source(cfg, spec.model_factory), ds.info, cfg.seed, self.algorithm,
                                           structure, peft=_peft(cfg),
                                           partial_keys=spec.partial_keys)
            self.built[structure] = _Built(model.to(self.device), roles, spec.partial_keys)
        self.owner = spec.owner
        budget = cfg.runtime.state_memory_mb
        spill = Path(spec.state_dir or tempfile.mkdtemp(prefix="rayfed-spill-")) / "spill" / spec.owner
        #: every client's state (private tensors, masks, extras): in memory up to runtime.state_memory_mb,
        #: spilled to owner-only files beyond it; saved to safe files
        self.states = ClientStateStore(budget_bytes=None if budget is None else int(budget * 2**20),
                                       spill_dir=spill if budget is not None else None, template=self._fresh_state)
        #: SIMULATED Byzantine clients (config section ``attack``); None when off or when the attack adds
        #: messages on the server instead (ServerCore.attack)
        self.attack = Attack(cfg.attack, self.num_clients, cfg.seed, ds.info.num_classes, upload_kind(self.algorithm),
                             {t.name: t.num_outputs for t in ds.info.task_infos()}) \
            if cfg.attack.enabled and cfg.attack.kind not in MESSAGE_ADDING_KINDS else None
        warm_up(cfg.train)

    @property
    def model(self) -> torch.nn.Module:
        """The model of the cohort's only structure (an error when its clients differ)."""
        return self._only().model

    @property
    def roles(self) -> RoleMap:
        """The role map of the cohort's only structure (an error when its clients differ)."""
        return self._only().roles

    def _only(self) -> _Built:
        if len(self.built) != 1:
            raise RuntimeError(f"this cohort's clients have {len(self.built)} model structures; use "
                               "built[spec.structure]")
        return next(iter(self.built.values()))

    def structure_of(self, cid: int) -> _Built:
        """The built model, roles and initial values of client ``cid``'s structure."""
        return self.built[self.specs[cid].structure]

    # -- state ---------------------------------------------------------------------------------
    @staticmethod
    def _reset_model(b: _Built, keys: Iterable[str] | None = None) -> None:
        keys = list(b.initial if keys is None else keys)
        if not keys:  # e.g. FedAvg: the broadcast covers every tensor (skip a state_dict() walk)
            return
        sd = tensors(b.model)
        with torch.no_grad():
            for k in keys:
                sd[k].copy_(b.initial[k])

    def state_of(self, cid: int) -> ClientState:
        if cid not in self.states:
            self.states[cid] = self._fresh_state(cid)
        return self.states[cid]

    def _context(self, cid: int, round: int, stage: str, broadcast, payload,
                 seed_round: Optional[int] = None) -> ClientContext:
        state = self.state_of(cid)
        b = self.structure_of(cid)
        broadcast, _ = b.broadcast_view(broadcast)
        covered = set(broadcast) | set(payload) | set(state.private)
        self._reset_model(b, [k for k in b.resettable if k not in covered])
        with warnings.catch_warnings():  # object-store numpy arrays are read-only; we only copy them
            warnings.simplefilter("ignore", UserWarning)
            self.algorithm.load_client_model(b.model, b.roles, broadcast, payload, state)
        seed = client_seed(self.cfg.seed, round if seed_round is None else seed_round, cid, stage)
        # dropout and any other global-RNG use; on CPU only the CPU generator matters, and
        # torch.manual_seed would also queue a CUDA/XPU/MTIA reseed with a stack trace (~0.2 ms)
        if self.device.type == "cpu":
            torch.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        return ClientContext(cid, round, b.model, b.roles, self.data[cid], self.cfg.train, state,
                             payload, self.device, gen, self.num_clients, self.specs[cid], self.tasks,
                             self.cfg.rounds)

    def _check_upload(self, cid: int, tensors: Mapping[str, np.ndarray]) -> None:
        roles = self.structure_of(cid).roles
        for k in tensors:
            if k.startswith(AUX):
                if k[len(AUX):] not in self.algorithm.aux_uploads:
                    raise RuntimeError(f"{type(self.algorithm).__name__}.local_update tried to upload {k!r}, an "
                                       "'aux/' entry the algorithm does not declare in aux_uploads")
                continue
            role = roles.roles.get(k)
            if role not in UPLOADABLE:
                raise RuntimeError(f"{type(self.algorithm).__name__}.local_update tried to upload {k!r} "
                                   f"whose role is {role.value if role else 'unknown'}; only "
                                   f"{sorted(r.value for r in UPLOADABLE)} tensors (or 'aux/' entries) "
                                   "may leave a client")

    # -- work ----------------------------------------------------------------------------------
    def _run(self, cids: Iterable[int], round: int, stage: str, fn: Callable[[int], Any]) -> list[Any]:
        out = []
        for cid in cids:
            try:
                out.append(fn(cid))
            except Exception:  # noqa: BLE001 - reported per client, never swallowed
                out.append(ClientFailure(cid, round, stage, traceback.format_exc()))
        return out

    def train(self, round: int, client_ids: list[int], broadcast: Mapping[str, np.ndarray],
              payloads: Mapping[int, Mapping[str, np.ndarray]], *,
              seed_round: Optional[int] = None) -> list[ClientUpdate | ClientFailure]:
        """Train ``client_ids`` (``seed_round`` replaces ``round`` in their seeds: asynchronous runs
        pass a dispatch counter so that repeated work of a client in one round differs).
        """
        def one(cid: int) -> ClientUpdate:
            t0 = time.perf_counter()
            payload = payloads.get(cid, {})
            _, down = self.structure_of(cid).broadcast_view(broadcast)
            ctx = self._context(cid, round, "train", broadcast, payload, seed_round)
            if self.attack is not None:
                ctx.data = self.attack.poison_data(cid, ctx.data)
            tensors, metrics = self.algorithm.local_update(ctx)
            if self.attack is not None:
                tensors = self.attack.poison_upload(cid, round if seed_round is None else seed_round,
                                                    tensors, broadcast)
                metrics = {**metrics, "byzantine": float(self.attack.is_byzantine(cid))}
            self._check_upload(cid, tensors)
            self.algorithm.save_client_state(ctx)
            ctx.state.rounds_trained += 1
            self.states.touch(cid)
            upd = ClientUpdate(cid, round, self.data[cid].num_train, tensors, dict(metrics))
            upd.metrics.update(bytes_up=upd.nbytes,
                               bytes_down=down + wire_nbytes(payload),
                               train_seconds=time.perf_counter() - t0, num_samples=upd.num_samples)
            return upd

        return self._run(client_ids, round, "train", one)

    def train_async(self, round: int, client_id: int, broadcast: Mapping[str, np.ndarray],
                    payloads: Mapping[int, Mapping[str, np.ndarray]], *, nonce: int) -> ClientUpdate | ClientFailure:
        """One client's asynchronous update, trained like :meth:`train` with seeds from ``nonce``.

        The server will have moved on when the update arrives, so uploaded *weights* are sent as
        differences to the weights this client started from (``broadcast``); gradients go as is.
        """
        (res,) = self.train(round, [client_id], broadcast, payloads, seed_round=nonce)
        if isinstance(res, ClientUpdate) and upload_kind(self.algorithm) == "weights":
            held = set(self.structure_of(client_id).roles.names(*SERVER_HELD))
            start = {**payloads.get(client_id, {}), **broadcast}  # what the client started from
            res.tensors = {k: (difference(v, start[k]) if k in held and k in start else v)
                           for k, v in res.tensors.items()}
        return res

    def evaluate(self, round: int, client_ids: list[int], broadcast: Mapping[str, np.ndarray],
                 payloads: Mapping[int, Mapping[str, np.ndarray]]) -> list[dict | ClientFailure]:
        def one(cid: int) -> dict:
            ctx = self._context(cid, round, "evaluate", broadcast, payloads.get(cid, {}))
            return {"client_id": cid, **self.algorithm.evaluate_client(ctx)}

        return self._run(client_ids, round, "evaluate", one)

    def finalize(self, round: int, client_ids: list[int], broadcast: Mapping[str, np.ndarray],
                 payloads: Mapping[int, Mapping[str, np.ndarray]]) -> list[dict | ClientFailure]:
        def one(cid: int) -> dict:
            ctx = self._context(cid, round, "finalize", broadcast, payloads.get(cid, {}))
            out = {"client_id": cid, **self.algorithm.finalize_client(ctx)}
            self.states.touch(cid)
            return out

        return self._run(client_ids, round, "finalize", one)

    def export(self, round: int, client_ids: list[int], broadcast: Mapping[str, np.ndarray],
               payloads: Mapping[int, Mapping[str, np.ndarray]], directory: str) -> list[dict | ClientFailure]:
        """Write each client's personalized model (as evaluated) to ``directory/client_<id>``
        (:func:`rayfed.models.export.export_model`: a PEFT adapter folder, a Hugging Face
        ``save_pretrained`` folder, or a state dict in safetensors).
        """
        from rayfed.models.export import export_model

        def one(cid: int) -> dict:
            ctx = self._context(cid, round, "export", broadcast, payloads.get(cid, {}))
            spec = self.specs[cid]
            path = export_model(ctx.model, Path(directory) / f"client_{cid}",
                                meta={"client_id": cid, "round": round + 1, "algorithm": self.cfg.algorithm.name,
                                      "tier": spec.tier, "tasks": list(spec.tasks)})
            return {"client_id": cid, "path": str(path)}

        return self._run(client_ids, round, "export", one)

    # -- checkpoints ---------------------------------------------------------------------------
    def _fresh_state(self, cid: int) -> ClientState:
        b = self.structure_of(cid)
        self._reset_model(b)
        return self.algorithm.init_client(cid, b.model, b.roles)

    def save_states(self, directory: str | os.PathLike, round: int = -1) -> list[int]:
        """Write every client state of this cohort to ``directory/<owner>.safetensors`` (one file,
        atomic, owner-only; see :mod:`rayfed.runtime.state_store`); returns the ids written.
        """
        self.states.save(directory, self.owner, round=round)
        return self.states.ids()

    def data_nbytes(self) -> int:
        """Bytes of the clients' data this cohort holds."""
        return sum(d.nbytes() for d in self.data.values())

    def persist_states(self, directory: str | os.PathLike, round: int) -> None:
        """Save the states changed since the last call (incrementally; see :meth:`ClientStateStore.persist`)."""
        self.states.persist(directory, self.owner, round=round)

    def load_states(self, directory: str | os.PathLike) -> list[int]:
        """Restore this cohort's clients' states from ``directory`` (any actor layout wrote it);
        returns the ids found. Clients without a saved state start fresh.
        """
        return self.states.load(directory, sorted(self.data), device=self.device, template=self._fresh_state)


def difference(value: Any, start: Any) -> Any:
    """``value - start`` (an asynchronous weight upload relative to what the client started from),
    keeping ``value``'s form: a sparse upload gives a sparse difference at its own positions (a
    sparse ``start`` counts as zero off its positions).
    """
    base = start.to_dense() if is_sparse(start) else np.asarray(start)
    if is_sparse(value):
        vals = (value.values.astype(np.float64) - base.reshape(-1)[value.positions()]).astype(value.dtype)
        return SparseTensor(value.shape, vals, value.index, value.encoding)
    return to_update(value, base, "weights").astype(np.asarray(value).dtype, copy=False)


class ServerCore:
    """The server: shared state, aggregation and per-client payloads.

    Its model is the ``union`` structure (``RunPlan.union``: the deepest tier, every task), so it
    holds every tensor any client holds; each is aggregated over the clients that hold it.
    """

    def __init__(self, config: FederationConfig, algorithm: Algorithm, info: DatasetInfo,
                 client_sizes: Mapping[int, int], model_factory=None, *, plan: RunPlan) -> None:
        self.cfg = config
        self.algorithm = algorithm
        if config.runtime.torch_threads:
            torch.set_num_threads(config.runtime.torch_threads)
        model, self.roles = build_structure(_model_source(config, model_factory), info, config.seed, algorithm,
                                            plan.union, peft=_peft(config), partial_keys=plan.partial_keys)
        #: refuses updates with names the roles do not allow, missing tensors, bad shapes, NaN/Inf
        self.validator = UpdateValidator(plan.upload_shapes, plan.expected_uploads(), algorithm.aux_uploads)
        rt = config.runtime
        #: where the server's torch work runs (``ServerState.device``: an algorithm moves its server
        #: modules there when it uses them)
        self.device = resolve_device(rt.server_device, key="runtime.server_device", gpus="runtime.server_num_gpus",
                                   auto_cuda=rt.server_num_gpus > 0)
        self.state = algorithm.init_server(model, self.roles, dict(client_sizes), config.seed)
        warm_up(config.train)  # server optimizers (FFGG, FedTP's hypernetwork) start warm too
        #: every tensor name this server has ever received from a client (for privacy audits)
        self.received: set[str] = set()
        self.bytes_received = 0
        self._payload_seconds = 0.0
        self._steps = 0  # aggregations so far (seeds bucketing; several per round when asynchronous)
        #: a SIMULATED message-adding attack (``attack.kind`` in MESSAGE_ADDING_KINDS): the adversary's
        #: messages join each aggregation ahead of the robust rule; None otherwise
        self.attack = Attack(config.attack, len(client_sizes), config.seed, info.num_classes, upload_kind(algorithm),
                             on_server=True) \
            if config.attack.enabled and config.attack.kind in MESSAGE_ADDING_KINDS else None

    @property
    def state(self) -> ServerState:
        """The server state; every state the algorithm returns carries this server's device."""
        return self._state

    @state.setter
    def state(self, value: ServerState) -> None:
        value.device = str(self.device)
        self._state = value

    def host_state(self) -> ServerState:
        """The state with every torch module and tensor in it copied to the CPU (for a process
        without this server's GPU); the state itself when the server runs on the CPU.
        """
        if self.device.type == "cpu":
            return self.state
        s = self.state
        return ServerState(dict(s.weights), _to_host(s.extra), s.round, "cpu")

    def broadcast(self, round: int) -> dict[str, np.ndarray]:
        return self.algorithm.broadcast(self.state, round)

    def payloads(self, round: int, client_ids: list[int]) -> dict[int, dict[str, np.ndarray]]:
        t0 = time.perf_counter()
        out = self.algorithm.payloads(self.state, list(client_ids), round)
        self._payload_seconds = time.perf_counter() - t0  # reported by the next aggregate
        return out

    def aggregate(self, round: int, updates: Iterable[ClientUpdate],
                  commit: Optional[Callable[[int], bool]] = None) -> dict[str, Any]:
        """Feed updates one at a time (the caller may stream them) and step the server state.

        Each update is checked first (:class:`~rayfed.runtime.validation.UpdateValidator`); a refused
        one never reaches the aggregator and is returned under ``rejected`` (a
        :class:`ClientFailure` with the reason). ``commit``, when given, is asked after the last
        update, with the number refused, whether the round stands (e.g. the quorum held while updates
        streamed in); when it says no, the server state is left as it was (aggregators only change
        it in ``finish``) and the result has ``committed=0``.
        """
        t0 = time.perf_counter()
        agg = self.algorithm.aggregator(self.state, round)
        if self.cfg.aggregation.robust:  # buffer, then a robust consensus of the shared tensors
            agg = RobustAggregator(agg, self.state, self.cfg.aggregation, kind=upload_kind(self.algorithm),
                                   keys=self.roles.names(Role.SHARED),
                                   rng=np.random.default_rng([self.cfg.seed % 2**63, round, self._steps, 0xB0C]))
        if self.attack is not None:  # outside the robust rule: the added messages reach it like honest ones
            agg = AddedMessages(agg, self.attack, self.state, keys=self.roles.names(Role.SHARED), round=round,
                                step=self._steps)
        n = 0
        rejected: list[ClientFailure] = []
        for upd in updates:
            self.received.update(upd.tensors)
            self.bytes_received += upd.nbytes
            reason = self.validator.check(upd)
            if reason is not None:
                rejected.append(ClientFailure(upd.client_id, round, "validate", f"update refused: {reason}"))
                continue
            agg.add(upd)
            n += 1
        if commit is not None and not commit(len(rejected)):
            return {"aggregated": n, "committed": 0, "aggregate_seconds": time.perf_counter() - t0,
                    "rejected": rejected}
        self.state = agg.finish()
        self._steps += 1  # only committed steps count: a rerun round draws the same bucketing as the first try
        out = {"aggregated": n, "aggregate_seconds": time.perf_counter() - t0,
               "payload_seconds": self._payload_seconds, "rejected": rejected}
        if hasattr(agg, "metrics"):  # algorithm-specific server metrics (e.g. hypernetwork timings)
            out.update(agg.metrics())
        return out

    def apply_async(self, round: int, updates: Iterable[ClientUpdate], scales: Iterable[float]) -> dict[str, float]:
        """Apply updates that arrived asynchronously (see :meth:`ClientCohort.train_async`).

        Each update carries differences (weight uploads) or gradients; it is scaled by its factor
        (the delay-adaptive step, 1 when off), rebased on the current weights and aggregated like a
        round, so the algorithm's own aggregator (and a robust rule) applies it. The factor is also
        in each update's metrics (``step_scale``), for entries an aggregator applies itself (e.g.
        tensors the server does not hold, which pass through unscaled).
        """
        kind = upload_kind(self.algorithm)
        weights = self.state.weights

        def rebased():
            for u, a in zip(updates, scales):
                t = {}
                for k, v in u.tensors.items():
                    if k.startswith(AUX) or (kind == "weights" and k not in weights):
                        t[k] = v
                    elif is_sparse(v):  # a difference at the client's positions, rebased there
                        base = weights[k].reshape(-1)[v.positions()] if kind == "weights" else 0.0
                        vals = (base + float(a) * v.values.astype(np.float64)).astype(v.dtype)
                        t[k] = SparseTensor(v.shape, vals, v.index, v.encoding)
                    else:
                        t[k] = from_update(float(a) * np.asarray(v, np.float64), weights.get(k), kind,
                                           np.asarray(v).dtype)
                yield dataclasses.replace(u, tensors=t, metrics={**u.metrics, "step_scale": float(a)})

        return self.aggregate(round, rebased())

    def received_names(self) -> list[str]:
        return sorted(self.received)

    def save(self, path: str | os.PathLike) -> None:
        """Write the server state, its step counter and privacy record to one safe file (atomic, 0600)."""
        write_state(path, self._tree())

    def _tree(self) -> dict:
        st = self.state
        return {"weights": dict(st.weights), "extra": st.extra, "round": st.round, "received": sorted(self.received),
                "bytes_received": self.bytes_received, "steps": self._steps}

    def load(self, path: str | os.PathLike) -> int:
        """Restore what :meth:`save` wrote; modules in the algorithm state (e.g. FedTP's hypernetwork)
        load into this server's freshly initialised ones. Returns the round it was saved after.
        """
        raw = read_state(path, self._tree())
        self.state = ServerState(raw["weights"], raw["extra"], int(raw["round"]))
        self.received = set(raw["received"])
        self.bytes_received = int(raw["bytes_received"])
        self._steps = int(raw["steps"])
        return self.state.round


@dataclass
class RoundOutcome:
    """What the executor reports for one round (small: metrics, never tensors)."""

    updates: list[dict] = field(default_factory=list)  # per successful client: client_id + metrics
    failures: list = field(default_factory=list)  # ClientError per failed client
    server: dict = field(default_factory=dict)

