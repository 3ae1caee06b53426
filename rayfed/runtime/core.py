"""The client cohort and the server, without Ray.

:class:`ClientCohort` owns a set of clients: their data shards and private state stay in it between
rounds. :class:`ServerCore` owns the server state. The Ray actors in :mod:`rayfed.runtime.actors`
wrap these same classes, and the local executor uses them in-process, so both paths run the same
code.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from rayfed.algorithms.base import AUX, Algorithm, ClientContext, ClientState, ClientUpdate
from rayfed.config import FederationConfig
from rayfed.data import DatasetInfo, FederatedDataset
from rayfed.errors import ClientError
from rayfed.models import build_model
from rayfed.models.views import tensors
from rayfed.robust import Attack, RobustAggregator, from_update, to_update, upload_kind
from rayfed.roles import UPLOADABLE, Role, RoleMap
from rayfed.training import warm_up

__all__ = ["ClientCohort", "ClientFailure", "CohortSpec", "ServerCore", "client_seed"]

_STAGE_CODES = {"train": 1, "evaluate": 2, "finalize": 3}


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
        """The :class:`~rayfed.errors.ClientError` this failure is reported as."""
        return ClientError(self.client_id, self.round, self.stage, self.detail)


@dataclass
class CohortSpec:
    """Everything an actor needs to build its cohort (small and picklable)."""

    config: FederationConfig
    algorithm: Algorithm
    client_ids: list[int]
    model_factory: Optional[Callable[[DatasetInfo], torch.nn.Module]] = None
    dataset: Optional[FederatedDataset] = None  # local executor shares the driver's; actors rebuild
    device: Optional[str] = None


def _model_source(cfg: FederationConfig, factory):
    return factory if factory is not None else cfg.model


def _pick_device(requested: str | None) -> torch.device:
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device='cuda' but this process sees no GPU; give client actors GPUs "
                           "(runtime.num_gpus_per_actor) or set runtime.device=cpu")
    return torch.device(requested)


class ClientCohort:
    """A cohort of clients sharing one model object in one process."""

    def __init__(self, spec: CohortSpec) -> None:
        cfg = spec.config
        self.cfg = cfg
        self.algorithm = spec.algorithm
        if cfg.runtime.torch_threads:
            torch.set_num_threads(cfg.runtime.torch_threads)
        self.device = _pick_device(spec.device or cfg.runtime.device)
        ds = spec.dataset if spec.dataset is not None else FederatedDataset.from_config(cfg.data, cfg.seed)
        self.num_clients = len(ds.client_ids)
        self.data = {cid: ds.client_data(cid) for cid in spec.client_ids}
        self.model = build_model(_model_source(cfg, spec.model_factory), ds.info, cfg.seed).to(self.device)
        self.roles: RoleMap = self.algorithm.roles(self.model)
        self._initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        # frozen tensors never change, so only these can carry over from the previous client
        self._resettable = [k for k in self._initial if self.roles[k].value != "frozen"]
        self.states: dict[int, ClientState] = {}
        #: SIMULATED Byzantine behaviour (config section ``attack``); None when off
        self.attack = Attack(cfg.attack, self.num_clients, cfg.seed, ds.info.num_classes,
                             upload_kind(self.algorithm)) if cfg.attack.enabled else None
        warm_up(cfg.train)

    # -- state ---------------------------------------------------------------------------------
    def _reset_model(self, keys: Iterable[str] | None = None) -> None:
        keys = list(self._initial if keys is None else keys)
        if not keys:  # e.g. FedAvg: the broadcast covers every tensor (skip a state_dict() walk)
            return
        sd = tensors(self.model)
        with torch.no_grad():
            for k in keys:
                sd[k].copy_(self._initial[k])

    def state_of(self, cid: int) -> ClientState:
        if cid not in self.states:
            self._reset_model()
            self.states[cid] = self.algorithm.init_client(cid, self.model, self.roles)
        return self.states[cid]

    def _context(self, cid: int, round: int, stage: str, broadcast, payload,
                 seed_round: Optional[int] = None) -> ClientContext:
        state = self.state_of(cid)
        covered = set(broadcast) | set(payload) | set(state.private)
        self._reset_model([k for k in self._resettable if k not in covered])
        with warnings.catch_warnings():  # object-store numpy arrays are read-only; we only copy them
            warnings.simplefilter("ignore", UserWarning)
            self.algorithm.load_client_model(self.model, self.roles, broadcast, payload, state)
        seed = client_seed(self.cfg.seed, round if seed_round is None else seed_round, cid, stage)
        # dropout and any other global-RNG use; on CPU only the CPU generator matters, and
        # torch.manual_seed would also queue a CUDA/XPU/MTIA reseed with a stack trace (~0.2 ms)
        if self.device.type == "cpu":
            torch.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        return ClientContext(cid, round, self.model, self.roles, self.data[cid], self.cfg.train, state,
                             payload, self.device, gen, self.num_clients)

    def _check_upload(self, cid: int, tensors: Mapping[str, np.ndarray]) -> None:
        for k in tensors:
            if k.startswith(AUX):
                continue
            role = self.roles.roles.get(k)
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
        down = int(sum(v.nbytes for v in broadcast.values()))

        def one(cid: int) -> ClientUpdate:
            t0 = time.perf_counter()
            payload = payloads.get(cid, {})
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
            upd = ClientUpdate(cid, round, self.data[cid].num_train, tensors, dict(metrics))
            upd.metrics.update(bytes_up=upd.nbytes,
                               bytes_down=down + int(sum(v.nbytes for v in payload.values())),
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
            res.tensors = {k: (to_update(v, broadcast[k], "weights").astype(np.asarray(v).dtype, copy=False)
                               if k in broadcast and not k.startswith(AUX) else v) for k, v in res.tensors.items()}
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
            return {"client_id": cid, **self.algorithm.finalize_client(ctx)}

        return self._run(client_ids, round, "finalize", one)

    # -- checkpoints ---------------------------------------------------------------------------
    def save_states(self, directory: str | os.PathLike) -> list[int]:
        """Write each client's state to ``directory/client_<id>.pt``; returns the ids written."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for cid, st in self.states.items():
            cpu = ClientState(st.client_id, {k: v.detach().cpu() for k, v in st.private.items()},
                              st.extra, st.rounds_trained)
            tmp = d / f".client_{cid}.pt.tmp"
            torch.save(cpu.__dict__, tmp)
            tmp.replace(d / f"client_{cid}.pt")
        return sorted(self.states)

    def load_states(self, directory: str | os.PathLike) -> list[int]:
        """Restore the states of this cohort's clients found in ``directory``."""
        loaded = []
        for cid in self.data:
            p = Path(directory) / f"client_{cid}.pt"
            if p.exists():
                raw = torch.load(p, map_location=self.device, weights_only=False)
                self.states[cid] = ClientState(**raw)
                loaded.append(cid)
        return loaded


class ServerCore:
    """The server: shared state, aggregation and per-client payloads."""

    def __init__(self, config: FederationConfig, algorithm: Algorithm, info: DatasetInfo,
                 client_sizes: Mapping[int, int], model_factory=None) -> None:
        self.cfg = config
        self.algorithm = algorithm
        if config.runtime.torch_threads:
            torch.set_num_threads(config.runtime.torch_threads)
        model = build_model(_model_source(config, model_factory), info, config.seed)
        self.roles = algorithm.roles(model)
        self.state = algorithm.init_server(model, self.roles, dict(client_sizes), config.seed)
        warm_up(config.train)  # server optimizers (FFGG, FedTP's hypernetwork) start warm too
        #: every tensor name this server has ever received from a client (for privacy audits)
        self.received: set[str] = set()
        self.bytes_received = 0
        self._payload_seconds = 0.0
        self._steps = 0  # aggregations so far (seeds bucketing; several per round when asynchronous)

    def broadcast(self, round: int) -> dict[str, np.ndarray]:
        return self.algorithm.broadcast(self.state, round)

    def payloads(self, round: int, client_ids: list[int]) -> dict[int, dict[str, np.ndarray]]:
        t0 = time.perf_counter()
        out = self.algorithm.payloads(self.state, list(client_ids), round)
        self._payload_seconds = time.perf_counter() - t0  # reported by the next aggregate
        return out

    def aggregate(self, round: int, updates: Iterable[ClientUpdate],
                  commit: Optional[Callable[[], bool]] = None) -> dict[str, float]:
        """Feed updates one at a time (the caller may stream them) and step the server state.

        ``commit``, when given, is asked after the last update whether the round stands (e.g. the
        quorum held while updates streamed in); when it says no, the server state is left as it was
        (aggregators only change it in ``finish``) and the result has ``committed=0``.
        """
        t0 = time.perf_counter()
        agg = self.algorithm.aggregator(self.state, round)
        if self.cfg.aggregation.robust:  # buffer, then a robust consensus of the shared tensors
            agg = RobustAggregator(agg, self.state, self.cfg.aggregation, kind=upload_kind(self.algorithm),
                                   keys=self.roles.names(Role.SHARED),
                                   rng=np.random.default_rng([self.cfg.seed % 2**63, round, self._steps, 0xB0C]))
        self._steps += 1
        n = 0
        for upd in updates:
            self.received.update(upd.tensors)
            self.bytes_received += upd.nbytes
            agg.add(upd)
            n += 1
        if commit is not None and not commit():
            return {"aggregated": n, "committed": 0, "aggregate_seconds": time.perf_counter() - t0}
        self.state = agg.finish()
        out = {"aggregated": n, "aggregate_seconds": time.perf_counter() - t0,
               "payload_seconds": self._payload_seconds}
        if hasattr(agg, "metrics"):  # algorithm-specific server metrics (e.g. hypernetwork timings)
            out.update(agg.metrics())
        return out

    def apply_async(self, round: int, updates: Iterable[ClientUpdate], scales: Iterable[float]) -> dict[str, float]:
        """Apply updates that arrived asynchronously (see :meth:`ClientCohort.train_async`).

        Each update carries differences (weight uploads) or gradients; it is scaled by its factor
        (the delay-adaptive step, 1 when off), rebased on the current weights and aggregated like a
        round, so the algorithm's own aggregator (and a robust rule) applies it.
        """
        kind = upload_kind(self.algorithm)
        weights = self.state.weights

        def rebased():
            for u, a in zip(updates, scales):
                t = {}
                for k, v in u.tensors.items():
                    if k.startswith(AUX) or (kind == "weights" and k not in weights):
                        t[k] = v
                    else:
                        t[k] = from_update(float(a) * np.asarray(v, np.float64), weights.get(k), kind,
                                           np.asarray(v).dtype)
                yield dataclasses.replace(u, tensors=t)

        return self.aggregate(round, rebased())

    def received_names(self) -> list[str]:
        return sorted(self.received)

    def save(self, path: str | os.PathLike) -> None:
        tmp = Path(str(path) + ".tmp")
        torch.save({"state": self.state, "received": self.received, "bytes_received": self.bytes_received}, tmp)
        tmp.replace(path)

    def load(self, path: str | os.PathLike) -> int:
        raw = torch.load(path, weights_only=False)
        self.state = raw["state"]
        self.received = set(raw["received"])
        self.bytes_received = raw["bytes_received"]
        return self.state.round


@dataclass
class RoundOutcome:
    """What the executor reports for one round (small: metrics, never tensors)."""

    updates: list[dict] = field(default_factory=list)  # per successful client: client_id + metrics
    failures: list = field(default_factory=list)  # ClientError per failed client
    server: dict = field(default_factory=dict)
