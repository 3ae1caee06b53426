"""The round loop: sampling, evaluation, checkpoints, metrics, outputs.

Example:
    >>> from rayfed import Federation, load_config
    >>> cfg = load_config(None, ["rounds=2", "runtime.executor=local", "output.plots=false"])
    >>> result = Federation(cfg).fit()            # doctest: +SKIP
    >>> result.summary["accuracy_mean"]           # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pandas as pd

from rayfed.algorithms import create
from rayfed.checkpoint import DRIVER_FILE, check_checkpoint, latest_checkpoint, write_manifest
from rayfed.config import FederationConfig, dump_config, from_dict, load_config, to_dict
from rayfed.data import DatasetInfo, FederatedDataset
from rayfed.errors import ActorError, ClientError, ConfigError, RunInterrupted, RunStopped, ServerLost
from rayfed.loggers import check_loggers, make_loggers
from rayfed.metrics import METRIC_COLUMNS, MetricsLog, eval_summary
from rayfed.models import build_model
from rayfed.plan import RunPlan, plan_run
from rayfed.registry import get_algorithm
from rayfed.safe_io import ensure_private_dir, read_state, write_state

__all__ = ["METRIC_COLUMNS", "ComparisonResult", "Federation", "FederationResult", "RunStopped", "eval_summary",
           "run_comparison"]


log = logging.getLogger("rayfed")
#: start-up stages (data built, actors ready); the CLI shows them without -v
startup_log = logging.getLogger("rayfed.startup")

ConfigLike = Union[FederationConfig, Mapping[str, Any], str, Path, None]
ModelFactory = Callable[[DatasetInfo], Any]
RoundCallback = Callable[[int, dict], None]


def _coerce(config: ConfigLike) -> FederationConfig:
    if isinstance(config, FederationConfig):
        return config
    if config is None or isinstance(config, (str, Path)):
        return load_config(config)
    return from_dict(dict(config))


@dataclass
class FederationResult:
    """What :meth:`Federation.fit` returns.

    Attributes:
        config: the resolved config.
        metrics: tidy table, one row per (round, client, stage, task, metric) (:data:`METRIC_COLUMNS`);
            client_id -1 holds round-level aggregates, task ``""`` values that are not per task.
        summary: final accuracies (weighted, per-client mean, p10, std), bytes and timings.
        run_dir: where outputs were written (None when nothing was written).
        failures: every client failure recorded (dropped clients), as :class:`ClientError`.
        server_received: every tensor name the server ever received from a client.
        server_state: the final server state (shared weights and algorithm state).
    """

    config: FederationConfig
    metrics: pd.DataFrame
    summary: dict[str, Any]
    run_dir: Optional[Path] = None
    failures: list[ClientError] = field(default_factory=list)
    server_received: list[str] = field(default_factory=list)
    server_state: Any = None
    model_factory: Any = field(default=None, repr=False)

    def export(self, out: Union[str, Path], clients: Union[str, Sequence[int]] = "all") -> dict[int, Path]:
        """Write clients' personalized models from the run's final checkpoint (see :func:`rayfed.export.export_run`)."""
        from rayfed.export import export_run

        if self.run_dir is None:
            raise RuntimeError("export needs a run directory with a final checkpoint (output.save_final: true and a "
                               "run that writes a directory)")
        return export_run(self.run_dir, out=out, clients=clients, model_factory=self.model_factory)

    def round_table(self, task: str = "") -> pd.DataFrame:
        """Round-level evaluation metrics, one row per evaluated round: over every client (and task),
        or of one ``task`` of multi-task data.
        """
        m = self.metrics
        sub = m[(m.client_id == -1) & (m.stage.isin(["eval", "final"])) & (m.task == task) & (m.exit == -1)]
        return sub.pivot_table(index=["round", "stage"], columns="metric", values="value").reset_index()


class Federation:
    """A federated run: the data plan, the algorithm and an executor, driven round by round.

    Args:
        config: a :class:`FederationConfig`, a mapping, a YAML path, or None for the defaults.
        model_factory: optional ``factory(info) -> nn.Module`` used instead of ``config.model``.
        callbacks: called after every round as ``callback(round, round_metrics)`` (e.g. Tune reports).
        run_dir: write outputs here instead of ``output.dir/<name>``; ``False`` writes nothing.

    Example:
        >>> import ray; ray.init(address="auto")              # doctest: +SKIP
        >>> result = Federation("config.yaml").fit()          # joins that cluster, leaves it running
    """

    def __init__(self, config: ConfigLike = None, *, model_factory: Optional[ModelFactory] = None,
                 callbacks: Sequence[RoundCallback] = (), run_dir: Union[str, Path, bool, None] = None,
                 placement_group: Any = None) -> None:
        self.config = _coerce(config)
        self.model_factory = model_factory
        if model_factory is not None:  # recorded, so that config.yaml does not pretend to describe the model
            qual = getattr(model_factory, "__qualname__", repr(model_factory))
            name = f"{getattr(model_factory, '__module__', '?')}:{qual}"
            self.config = from_dict({**to_dict(self.config), "model": {**to_dict(self.config)["model"],
                                                                       "factory": name}})
        self.callbacks = list(callbacks)
        self.algorithm = create(self.config.algorithm)
        self._run_dir_arg = run_dir
        self.placement_group = placement_group
        self.executor = None
        self._rounds_done = 0
        self.last_checkpoint: Optional[Path] = None
        self._validated: Optional[tuple[FederatedDataset, RunPlan]] = None

    def checkpoint(self, directory: Union[str, Path]) -> Path:
        """Save the server state, every client's state and the driver's bookkeeping into a
        checkpoint folder (callable from a round callback); the manifest is written last, so a
        folder without one is not a checkpoint (see :mod:`rayfed.checkpoint`).

        Each client actor writes its own clients' file; the driver never holds client state.
        """
        if self.executor is None:
            raise RuntimeError("checkpoint() works only while fit() runs (e.g. from a round callback)")
        d = ensure_private_dir(directory)
        self.executor.save(d, self._rounds_done)
        driver = self.executor.driver_state()
        if driver:
            write_state(d / DRIVER_FILE, driver)
        write_manifest(d, self._rounds_done, self.config)
        self.last_checkpoint = d
        return d

    # -- set-up --------------------------------------------------------------------------------
    def _validate(self) -> tuple[FederatedDataset, RunPlan]:
        """Everything that can be checked without actors: the data, the run plan, and the model of
        every client structure and of the server (built once each, with their roles).
        """
        cfg = self.config
        if cfg.model.factory and self.model_factory is None:
            raise ConfigError(f"config key 'model.factory': this config was written by a run whose model came from the "
                              f"Python model_factory {cfg.model.factory}, which its model section does not describe; "
                              "pass Federation(cfg, model_factory=...) with that factory, or set model.factory: null "
                              "to train the model the config describes")
        check_loggers(cfg.output.loggers)
        ds = FederatedDataset.from_config(cfg.data, cfg.seed)
        if ds.info.multitask and not self.algorithm.supports_multitask:
            names = [t.name for t in ds.info.task_infos()]
            raise ConfigError(f"config key 'algorithm.name': algorithm {cfg.algorithm.name!r} trains single-task "
                              f"models, but the data has tasks {names} (data.tasks); use an algorithm that trains "
                              "multi-task models (e.g. fedavg, fedper, local) or a single task")
        try:
            plan, roles = plan_run(cfg, self.algorithm, ds, self.model_factory)
        except ConfigError:
            raise
        except Exception as e:  # a user factory (or an algorithm's prepare_model) that fails
            raise ConfigError(f"could not build the model ({type(e).__name__}: {e}); check the model section, "
                              "data.tiers and data.tasks, or the model_factory") from e
        if not roles[plan.union].names():
            raise ConfigError("the model has no parameters to train")
        self.role_counts = roles[plan.union].counts()
        self._validated = (ds, plan)
        startup_log.info("data: %d clients, %d train / %d test samples, tasks %s; plan: %d training, %d held out, "
                         "%d per round, %d model structure(s)", len(ds.client_ids),
                         sum(ds.num_train(c) for c in ds.client_ids), sum(ds.num_test(c) for c in ds.client_ids),
                         [t.name for t in ds.info.task_infos()], len(plan.train_ids), len(plan.holdouts),
                         plan.clients_per_round, len(plan.structures))
        if len(plan.structures) > 1:
            counts = plan.structure_counts()
            self.structures = {s.label(): {"clients": counts[s], "roles": roles[s].counts()} for s in plan.structures}
        return ds, plan

    def _make_run_dir(self) -> Optional[Path]:
        arg = self._run_dir_arg
        if arg is False:
            return None
        if arg not in (None, True):
            d = Path(arg)
        else:
            name = self.config.output.name or \
                f"{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}-{self.config.algorithm.name}"
            d = Path(self.config.output.dir) / name
        d.mkdir(parents=True, exist_ok=True)
        dump_config(self.config, d / "config.yaml")
        return d

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, *, resume_from: Union[str, Path, None] = None) -> FederationResult:
        """Run every round; returns a :class:`FederationResult`.

        Args:
            resume_from: a run directory of an interrupted run (its latest complete checkpoint is
                used) or one of its ``checkpoints/round_N`` folders; training continues after that
                round with the saved server, client and scheduling state, and the metrics of the
                rounds before it are kept. A checkpoint written with a config that differs in what
                changes results, or with missing or corrupt files, is refused (``ConfigError``)
                before any actor starts.
        """
        from rayfed.runtime import make_executor, runtime_session

        cfg = self.config
        ckpt = None
        if resume_from is not None:
            ckpt = latest_checkpoint(resume_from)
            self._resume_round = int(check_checkpoint(ckpt, cfg)["round"])
        ds, plan = self._validated or self._validate()  # before any actor starts
        self._validated = None
        run_dir = self._make_run_dir()
        if run_dir is not None:
            _write_clients(run_dir / "clients.csv", ds, plan)
        state_dir = cfg.runtime.state_dir or (str(run_dir / "state") if run_dir is not None else None)
        trackers = make_loggers(cfg.output.loggers, run_dir, to_dict(cfg)) if run_dir is not None else []
        if cfg.output.loggers and run_dir is None:
            log.warning("output.loggers %s: this run writes no directory, so nothing is logged", cfg.output.loggers)
        callbacks = list(self.callbacks)
        self.callbacks += [t.log for t in trackers]
        try:
            with runtime_session(cfg), self._stop_on_interrupt():
                self.executor = make_executor(cfg, self.algorithm, ds, self.model_factory, plan=plan,
                                              placement_group=self.placement_group, state_dir=state_dir)
                try:
                    return self._loop(ds, plan, run_dir, ckpt)
                finally:
                    self.executor.close()
                    self.executor = None
        finally:
            self.callbacks = callbacks
            for t in trackers:
                t.close()

    @contextlib.contextmanager
    def _stop_on_interrupt(self):
        """Ctrl-C (SIGINT) asks the run to stop after the round in progress (a second one aborts at once)."""
        self._stop_requested = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            print("rayfed: stopping after the round in progress (Ctrl-C again to abort now)", file=sys.stderr,
                  flush=True)

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _stopped(self, run_dir: Optional[Path], round: int, cause: BaseException) -> RuntimeError:
        """The one-line error of a run that cannot go on, with what was kept and how to resume."""
        where = f"; metrics so far are in {run_dir / 'metrics'}" if run_dir is not None else ""
        last = self.last_checkpoint
        if last is not None and run_dir is not None:
            how = f"; resume with: rayfed run {run_dir / 'config.yaml'} --resume {run_dir}"
        elif run_dir is not None:
            how = "; no checkpoint was written (set output.checkpoint_every to resume runs like this one)"
        else:
            how = ""
        return RunStopped(f"the run stopped in round {round}: {cause}{where}"
                          f"{f'; last checkpoint: {last}' if last else ''}{how}")

    def _interrupted(self, run_dir: Optional[Path], round: int, log_: MetricsLog) -> RunInterrupted:
        """Stop after ``round`` on request: checkpoint it, write the metrics so far, say how to resume."""
        if run_dir is None:
            return RunInterrupted(f"the run was interrupted after round {round} (it writes no directory, so "
                                  "nothing was kept)")
        ckpt = self.checkpoint(run_dir / "checkpoints" / f"round_{round}")
        log_.frame().to_parquet(run_dir / "metrics.parquet", index=False)
        return RunInterrupted(f"the run was interrupted after round {round}; checkpoint {ckpt}; metrics so far in "
                              f"{run_dir / 'metrics.parquet'}; resume with: rayfed run {run_dir / 'config.yaml'} "
                              f"--resume {run_dir}")

    def _loop(self, ds: FederatedDataset, plan: RunPlan, run_dir: Optional[Path], ckpt: Optional[Path]
              ) -> FederationResult:
        cfg, ex = self.config, self.executor
        alg = cfg.algorithm.name
        held = plan.holdouts  # never trained; personalized at the end
        ids = plan.train_ids
        log_ = MetricsLog(alg, run_dir)
        failures: list[Union[ClientError, ActorError]] = []
        start = 0
        if ckpt is not None:
            ex.restore(ckpt)
            start = self._resume_round  # rounds of the run (the server's own count is of its steps)
            if (ckpt / DRIVER_FILE).exists():
                ex.load_driver_state(read_state(ckpt / DRIVER_FILE))
            self._rounds_done = start
            self.last_checkpoint = ckpt
            log.info("resumed from %s after round %d", ckpt, start)
            log_.resume(ckpt.parent.parent, start)
        add = log_.add

        progress = _progress(cfg.rounds, start, cfg.output.progress, alg)
        last_eval: dict = {}
        t_start = time.perf_counter()
        for r in range(start, cfg.rounds):
            t0 = time.perf_counter()
            sampled = plan.sampled(r)
            try:
                out = ex.train_round(r, sampled)
            except ServerLost as e:  # every complete round's metrics are already on disk
                raise self._stopped(run_dir, r + 1, e) from e
            failures += out.failures
            lost = ex.drain_actor_failures()
            for u in out.updates:
                add(r + 1, u["client_id"], "train", u)
            rnd = {"seconds": 0.0, "num_sampled": len(sampled), "num_failed": len(out.failures),
                   "bytes_up": sum(u.get("bytes_up", 0) for u in out.updates),
                   "bytes_down": sum(u.get("bytes_down", 0) for u in out.updates),
                   "train_loss": _nanmean([u["train_loss"] for u in out.updates])
                   if out.updates and all("train_loss" in u for u in out.updates) else float("nan"),
                   **{f"server_{k2}": v for k2, v in out.server.items()}}
            rnd["train_seconds"] = time.perf_counter() - t0
            is_last = r == cfg.rounds - 1
            if (r + 1) % cfg.eval_every == 0 or is_last:
                wanted = plan.eval_clients(r, cfg.eval_fraction, is_last)
                evals, efail = ex.evaluate(r, wanted)
                failures += efail
                lost += ex.drain_actor_failures()
                for e in evals:
                    add(r + 1, e["client_id"], "eval", e)
                last_eval = eval_summary(evals)
                add(r + 1, -1, "eval", last_eval)
                rnd.update({k2: v for k2, v in last_eval.items() if k2 not in ("tasks", "exits")})
                missing = len(wanted) - len(evals)
                if missing:  # said plainly: the accuracies above are over the clients evaluated only
                    rnd["clients_missing"] = missing
            if lost:
                failures += lost
                rnd["actors_lost"] = len(lost)
            rnd["seconds"] = time.perf_counter() - t0
            log.info("round %d: %d clients trained (%d failed) in %.2f s%s", r + 1, len(out.updates),
                     len(out.failures), rnd["seconds"],
                     f"; client-mean accuracy {rnd['accuracy_mean']:.4f}" if "accuracy_mean" in rnd else "")
            add(r + 1, -1, "train", {k2: v for k2, v in rnd.items() if not k2.startswith(("accuracy", "test_"))})
            self._rounds_done = r + 1
            log_.flush(r + 1)
            if run_dir is not None and cfg.output.checkpoint_every and (r + 1) % cfg.output.checkpoint_every == 0:
                self.checkpoint(run_dir / "checkpoints" / f"round_{r + 1}")
            for cb in self.callbacks:
                cb(r + 1, dict(rnd))
            if self._stop_requested and r + 1 < cfg.rounds:
                progress.close()
                raise self._interrupted(run_dir, r + 1, log_)
            progress.update(1)
            if "accuracy_mean" in rnd:
                progress.set_postfix(acc=f"{rnd['accuracy_mean']:.3f}", refresh=False)
            elif "test_loss" in rnd:
                progress.set_postfix(loss=f"{rnd['test_loss']:.4g}", refresh=False)
        progress.close()

        final = dict(last_eval)
        evaluated = len(ids) - int(rnd.get("clients_missing", 0)) if cfg.rounds > start else len(ids)
        if self.algorithm.has_finalize:
            finalized, ffail = ex.finalize(cfg.rounds, ids)
            failures += ffail
            for row in finalized:  # what the post-training stage reports (fine-tuning, distillation losses)
                add(cfg.rounds, row["client_id"], "finalize", row)
            evals, efail = ex.evaluate(cfg.rounds - 1, ids)  # after round `rounds` (runtime rounds are 0-based)
            failures += efail + ex.drain_actor_failures()
            for e in evals:
                add(cfg.rounds, e["client_id"], "final", e)
            final = eval_summary(evals)
            add(cfg.rounds, -1, "final", final)
            evaluated = len(evals)
        exported = None
        if run_dir is not None and cfg.output.export != "none":
            wanted = ids if cfg.output.export == "all" else [c for c in cfg.output.export if c in set(ids)]
            exported = run_dir / "export"
            _, xfail = ex.export(cfg.rounds - 1, wanted, exported)
            failures += xfail + ex.drain_actor_failures()
        server_state = ex.server_state()  # one fetch: for FedTP on Ray it carries the hypernetwork
        if held:
            final.update(self._personalize_holdout(ds, held, server_state, add))
        elapsed = time.perf_counter() - t_start

        metrics = log_.frame()
        received = ex.received_names()
        if run_dir is not None and cfg.output.save_final:
            self.checkpoint(run_dir / "checkpoints" / "final")
        summary = self._summary(metrics, final, elapsed, failures, run_dir)
        summary["clients_evaluated"] = evaluated
        summary["eval_fraction"] = cfg.eval_fraction  # of intermediate evaluations; the last covers everyone
        summary["clients_missing"] = len(ids) - evaluated
        if exported is not None:
            summary["export_dir"] = str(exported)
        result = FederationResult(cfg, metrics, summary, run_dir, failures, received, server_state, self.model_factory)
        if run_dir is not None:
            write_outputs(result)
        return result

    def _personalize_holdout(self, ds: FederatedDataset, held: Sequence[int], state: Any,
                             add: Callable[[int, int, str, Mapping[str, Any]], None]) -> dict[str, float]:
        """Personalize the clients kept out of training from the final server state (on the driver)."""
        cfg = self.config
        model = build_model(self.model_factory or cfg.model, ds.info, cfg.seed)
        rows = [self.algorithm.personalize_holdout(state, model, ds.client_data(c), cfg.train, cfg.seed)
                for c in held]
        for row in rows:
            add(cfg.rounds, row["client_id"], "holdout", row)
        out = {f"holdout_{k}": v for k, v in eval_summary(rows).items()}
        for key, v in rows[0].items():  # method-specific metrics (e.g. a baseline's accuracy): their mean
            if key not in ("client_id", "accuracy", "loss", "correct", "num_test") and isinstance(v, (int, float)):
                out[f"holdout_{key}"] = float(np.mean([r[key] for r in rows]))
        out["holdout_clients"] = len(rows)
        add(cfg.rounds, -1, "holdout", out)
        return out

    def _summary(self, metrics: pd.DataFrame, final: dict, elapsed: float, failures, run_dir) -> dict:
        m = metrics[(metrics.client_id == -1) & (metrics.stage == "train")]
        by = m.groupby("metric")["value"]
        sums = by.sum()
        return {
            "algorithm": self.config.algorithm.name,
            "rounds": self.config.rounds,
            "num_clients": self.config.data.num_clients,
            **{k: float(v) for k, v in final.items() if k not in ("tasks", "exits")},
            **{k: final[k] for k in ("tasks", "exits") if k in final},
            "bytes_up": float(sums.get("bytes_up", 0.0)),
            "bytes_down": float(sums.get("bytes_down", 0.0)),
            "seconds": elapsed,
            "seconds_per_round": float(by.mean().get("train_seconds", float("nan"))),
            "num_failures": len(failures),
            "roles": getattr(self, "role_counts", {}),
            **({"structures": self.structures} if getattr(self, "structures", None) else {}),
            "run_dir": str(run_dir) if run_dir else None,
        }


def _nanmean(values: list[float]) -> float:
    """Mean over the values that are not NaN; NaN (without numpy's empty-slice warning) when none are."""
    a = np.asarray(values, dtype=float)
    return float(a[~np.isnan(a)].mean()) if (~np.isnan(a)).any() else float("nan")


def _write_clients(path: Path, ds: FederatedDataset, plan: RunPlan) -> None:
    """One row per client: its sizes, natural group (partition by_column), depth tier, tasks, site and
    whether it is held out of training.
    """
    held = set(plan.holdouts)
    rows = [{"client_id": c, "num_train": ds.num_train(c), "num_test": ds.num_test(c),
             **({"group": ds.client_groups[c]} if ds.client_groups is not None else {}),
             "tier": s.tier, "tasks": "+".join(s.tasks), "site": s.site, "held_out": c in held}
            for c, s in sorted(plan.specs.items())]
    pd.DataFrame(rows).to_csv(path, index=False)


def _progress(total: int, start: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc=desc, unit="round", leave=False)


def write_outputs(result: FederationResult) -> None:
    """metrics.parquet, summary.json and plots in the run directory."""
    d = result.run_dir
    result.metrics.to_parquet(d / "metrics.parquet", index=False)
    (d / "summary.json").write_text(json.dumps(
        {**result.summary, "failures": [str(f) for f in result.failures]}, indent=2, default=str))
    if result.config.output.plots:
        _plot(result.metrics, d)


def _plot(metrics: pd.DataFrame, d: Path) -> None:
    """The accuracy plots of a run (or comparison) directory, and one pair per task of multi-task data."""
    from rayfed.plots import plot_accuracy, plot_client_accuracy, plot_exit_accuracy, tasks_of

    plot_accuracy(metrics, d / "accuracy.png")
    if (metrics.exit >= 0).any():
        plot_exit_accuracy(metrics, d / "exit_accuracy.png")
    for task in tasks_of(metrics):
        plot_accuracy(metrics, d / f"accuracy_{task}.png", task=task)
        plot_client_accuracy(metrics, d / f"client_accuracy_{task}.png", task=task)
    if not tasks_of(metrics):
        plot_client_accuracy(metrics, d / "client_accuracy.png")


@dataclass
class ComparisonResult:
    """Results of the same experiment run with several algorithms."""

    results: dict[str, FederationResult]
    run_dir: Optional[Path]
    #: per method, the ``algorithm_options`` its config has no key for (so they were not applied)
    skipped_options: dict[str, list[str]] = field(default_factory=dict)

    @property
    def metrics(self) -> pd.DataFrame:
        return pd.concat([r.metrics for r in self.results.values()], ignore_index=True)

    def table(self) -> pd.DataFrame:
        cols = ["accuracy_mean", "accuracy_weighted", "accuracy_p10", "accuracy_std", "test_loss", "bytes_up",
                "bytes_down", "seconds"]
        return pd.DataFrame([{"algorithm": n, **{c: r.summary.get(c) for c in cols}}
                             for n, r in self.results.items()])


def run_comparison(config: ConfigLike = None, algorithms: Optional[Sequence[str]] = None, *,
                   model_factory: Optional[ModelFactory] = None, callbacks: Sequence[RoundCallback] = (),
                   algorithm_options: Optional[Mapping[str, Any]] = None) -> ComparisonResult:
    """Run the same experiment (data, partition, seed, rounds) for several algorithms.

    ``algorithms`` defaults to ``config.compare`` (or just ``config.algorithm``). The configured
    algorithm keeps its options; the others run with their defaults; each gets those of
    ``algorithm_options`` (e.g. ``{"private": ["preset:head"]}``, what ``--set algorithm.private=...``
    gives on the command line) that their config has: ``ComparisonResult.skipped_options`` lists, per
    method, the options it has no such key for. Outputs go to one parent run directory with a
    subdirectory per algorithm and combined plots.
    """
    from rayfed.runtime import runtime_session, warm_actors

    cfg = _coerce(config)
    names = list(algorithms or cfg.compare or [cfg.algorithm.name])
    parent = None
    if cfg.output.dir and cfg.output.name is not False:
        name = cfg.output.name or f"{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}-compare"
        parent = Path(cfg.output.dir) / name
        parent.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, parent / "config.yaml")
    feds = []
    skipped: dict[str, list[str]] = {}
    options = dict(algorithm_options or {})
    for n in names:
        # the configured algorithm keeps its options; the others run with their defaults and the given options
        keys = {f.name for f in dataclasses.fields(get_algorithm(n).config_class)}
        skipped[n] = sorted(k for k in options if k not in keys)
        given = {k: v for k, v in options.items() if k in keys}
        if n == cfg.algorithm.name:
            d = to_dict(cfg)
            sub = from_dict({**d, "compare": [], "algorithm": {**d["algorithm"], **given}})
        else:
            sub = cfg.with_algorithm(n, given)
        feds.append(Federation(sub, model_factory=model_factory, callbacks=callbacks,
                               run_dir=(parent / n) if parent else False))
    for f in feds:  # reject every bad config before any actor starts
        f._validate()
    results: dict[str, FederationResult] = {}
    with runtime_session(cfg), warm_actors(cfg):  # one Ray; actor processes reused across methods
        for n, f in zip(names, feds):
            results[n] = f.fit()
    comp = ComparisonResult(results, parent, {n: v for n, v in skipped.items() if v})
    if parent is not None:
        comp.metrics.to_parquet(parent / "metrics.parquet", index=False)
        comp.table().to_csv(parent / "summary.csv", index=False)
        if cfg.output.plots:
            _plot(comp.metrics, parent)
    return comp


with contextlib.suppress(Exception):  # keep tqdm quiet about notebooks
    import warnings

    warnings.filterwarnings("ignore", message="IProgress not found")
