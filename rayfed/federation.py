"""The round loop: sampling, evaluation, checkpoints, metrics, outputs.

Example:
    >>> from rayfed import Federation, load_config
    >>> cfg = load_config(None, ["rounds=2", "runtime.executor=local", "output.plots=false"])
    >>> result = Federation(cfg).fit()            # doctest: +SKIP
    >>> result.summary["accuracy_mean"]           # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pandas as pd

from rayfed.algorithms import create
from rayfed.config import FederationConfig, dump_config, from_dict, load_config, to_dict
from rayfed.data import DatasetInfo, FederatedDataset
from rayfed.errors import ClientError, ConfigError
from rayfed.models import build_model
from rayfed.plan import RunPlan, plan_run

__all__ = ["METRIC_COLUMNS", "ComparisonResult", "Federation", "FederationResult", "eval_summary", "run_comparison"]

#: columns of the tidy metrics table: one row per (round, client, stage, task, exit, metric); client_id
#: -1 holds round-level aggregates, task "" client-level (or, for single-task data, the only task's)
#: values, exit -1 values that are not of one early exit (anytime models report each exit they have)
METRIC_COLUMNS = ["algorithm", "round", "client_id", "stage", "task", "exit", "metric", "value"]

log = logging.getLogger("rayfed")

ConfigLike = Union[FederationConfig, Mapping[str, Any], str, Path, None]
ModelFactory = Callable[[DatasetInfo], Any]
RoundCallback = Callable[[int, dict], None]


def _coerce(config: ConfigLike) -> FederationConfig:
    if isinstance(config, FederationConfig):
        return config
    if config is None or isinstance(config, (str, Path)):
        return load_config(config)
    return from_dict(dict(config))


def _p10(values: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), 10)) if len(values) else float("nan")


def _summary_of(rows: Sequence[dict]) -> dict[str, float]:
    """Sample-weighted, per-client mean, 10th-percentile and spread of the rows' accuracies (rows
    without one, e.g. regression or generation, count only towards the loss).
    """
    n = sum(r["num_test"] for r in rows)
    out = {"test_loss": float(np.average([r["loss"] for r in rows], weights=[r["num_test"] for r in rows]))
           if n else float("nan")}
    scored = [r for r in rows if "accuracy" in r]
    if rows and not scored:
        losses = np.asarray([r["loss"] for r in rows], dtype=float)
        out.update(test_loss_mean=float(losses.mean()), test_loss_p90=float(np.percentile(losses, 90)),
                   test_loss_max=float(losses.max()))
        return out
    acc = [r["accuracy"] for r in scored]
    total = sum(r.get("num_scored", r["num_test"]) for r in scored)
    return {
        "accuracy_weighted": sum(r["correct"] for r in scored) / max(total, 1),
        "accuracy_mean": float(np.mean(acc)) if acc else float("nan"),
        "accuracy_p10": _p10(acc),
        "accuracy_std": float(np.std(acc)) if acc else float("nan"),
        **out,
    }


def eval_summary(rows: Sequence[dict]) -> dict[str, Any]:
    """Sample-weighted, per-client mean, 10th-percentile and spread of client accuracies.

    Rows without ``accuracy`` (regression) give only the loss: sample-weighted ``test_loss``, and
    the per-client mean, 90th percentile and maximum of the loss. Rows of clients with several
    tasks (``{"tasks": {name: metrics}}``) give the same summary over every (client, task) pair,
    and each task's own summary under ``tasks``. Rows with per-exit metrics (``{"exits": {depth:
    metrics}, ...}``, anytime models) are summarised by their own top-level metrics, and each exit
    over the clients that have it under ``exits``.
    """
    if any("exits" in r for r in rows):
        per_exit: dict[int, list[dict]] = {}
        for r in rows:
            for e, m in r.get("exits", {}).items():
                per_exit.setdefault(int(e), []).append(m)
        out = eval_summary([{k: v for k, v in r.items() if k != "exits"} for r in rows])
        out["exits"] = {e: _summary_of(ms) for e, ms in sorted(per_exit.items())}
        return out
    if not any("tasks" in r for r in rows):
        return _summary_of(rows)
    per_task: dict[str, list[dict]] = {}
    for r in rows:
        for t, m in r.get("tasks", {}).items():
            per_task.setdefault(t, []).append(m)
    out: dict[str, Any] = _summary_of([m for ms in per_task.values() for m in ms])
    out["tasks"] = {t: _summary_of(ms) for t, ms in per_task.items()}
    return out


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
        self.callbacks = list(callbacks)
        self.algorithm = create(self.config.algorithm)
        self._run_dir_arg = run_dir
        self.placement_group = placement_group
        self.executor = None
        self._rounds_done = 0
        self._validated: Optional[tuple[FederatedDataset, RunPlan]] = None

    def checkpoint(self, directory: Union[str, Path]) -> Path:
        """Save the server state and every client's private state (callable from a round callback).

        Each client actor writes its own clients' files; the driver never holds client state.
        """
        if self.executor is None:
            raise RuntimeError("checkpoint() works only while fit() runs (e.g. from a round callback)")
        d = Path(directory)
        self.executor.save(d)
        _write_checkpoint_meta(d, self._rounds_done, self.config)
        return d

    # -- set-up --------------------------------------------------------------------------------
    def _validate(self) -> tuple[FederatedDataset, RunPlan]:
        """Everything that can be checked without actors: the data, the run plan, and the model of
        every client structure and of the server (built once each, with their roles).
        """
        cfg = self.config
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
            resume_from: a checkpoint directory written by an earlier run (``checkpoints/round_N``);
                training continues after that round with the saved server and client states.
        """
        from rayfed.runtime import make_executor, runtime_session

        cfg = self.config
        ds, plan = self._validated or self._validate()  # before any actor starts
        self._validated = None
        run_dir = self._make_run_dir()
        with runtime_session(cfg):
            self.executor = make_executor(cfg, self.algorithm, ds, self.model_factory, plan=plan,
                                          placement_group=self.placement_group)
            try:
                return self._loop(ds, plan, run_dir, resume_from)
            finally:
                self.executor.close()
                self.executor = None

    def _loop(self, ds: FederatedDataset, plan: RunPlan, run_dir: Optional[Path], resume_from) -> FederationResult:
        cfg, ex = self.config, self.executor
        alg = cfg.algorithm.name
        held = plan.holdouts  # never trained; personalized at the end
        ids = plan.train_ids
        rows: list[dict] = []
        failures: list[ClientError] = []
        start = 0
        if resume_from is not None:
            start = ex.restore(Path(resume_from))
            start = _read_checkpoint_meta(Path(resume_from), cfg, start)
            log.info("resumed from %s after round %d", resume_from, start)
            prev = Path(resume_from).parent.parent / "metrics.parquet"
            if prev.exists():
                old = pd.read_parquet(prev)
                for col, fill in (("task", ""), ("exit", -1)):  # written before metrics had these columns
                    if col not in old.columns:
                        old.insert(METRIC_COLUMNS.index(col), col, fill)
                rows = old[old["round"] <= start].to_dict("records")

        def add(r: int, cid: int, stage: str, metrics: Mapping[str, Any], task: str = "", exit: int = -1) -> None:
            for name, v in metrics.items():
                if name == "tasks" and isinstance(v, Mapping):  # per-task metrics: rows of their task
                    for t, tm in v.items():
                        add(r, cid, stage, tm, t, exit)
                elif name == "exits" and isinstance(v, Mapping):  # per-exit metrics: rows of their exit
                    for e, em in v.items():
                        add(r, cid, stage, em, task, int(e))
                elif name != "client_id" and isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
                    rows.append({"algorithm": alg, "round": r, "client_id": cid, "stage": stage, "task": task,
                                 "exit": exit, "metric": name, "value": float(v)})

        progress = _progress(cfg.rounds, start, cfg.output.progress, alg)
        last_eval: dict = {}
        t_start = time.perf_counter()
        for r in range(start, cfg.rounds):
            t0 = time.perf_counter()
            sampled = plan.sampled(r)
            out = ex.train_round(r, sampled)
            failures += out.failures
            for u in out.updates:
                add(r + 1, u["client_id"], "train", u)
            rnd = {"seconds": 0.0, "num_sampled": len(sampled), "num_failed": len(out.failures),
                   "bytes_up": sum(u.get("bytes_up", 0) for u in out.updates),
                   "bytes_down": sum(u.get("bytes_down", 0) for u in out.updates),
                   "train_loss": float(np.nanmean([u["train_loss"] for u in out.updates]))
                   if out.updates and all("train_loss" in u for u in out.updates) else float("nan"),
                   **{f"server_{k2}": v for k2, v in out.server.items()}}
            rnd["train_seconds"] = time.perf_counter() - t0
            is_last = r == cfg.rounds - 1
            if (r + 1) % cfg.eval_every == 0 or is_last:
                evals, efail = ex.evaluate(r, ids)
                failures += efail
                for e in evals:
                    add(r + 1, e["client_id"], "eval", e)
                last_eval = eval_summary(evals)
                add(r + 1, -1, "eval", last_eval)
                rnd.update({k2: v for k2, v in last_eval.items() if k2 not in ("tasks", "exits")})
            rnd["seconds"] = time.perf_counter() - t0
            add(r + 1, -1, "train", {k2: v for k2, v in rnd.items() if not k2.startswith(("accuracy", "test_"))})
            self._rounds_done = r + 1
            if run_dir is not None and cfg.output.checkpoint_every and (r + 1) % cfg.output.checkpoint_every == 0:
                self.checkpoint(run_dir / "checkpoints" / f"round_{r + 1}")
            for cb in self.callbacks:
                cb(r + 1, dict(rnd))
            progress.update(1)
            if "accuracy_mean" in rnd:
                progress.set_postfix(acc=f"{rnd['accuracy_mean']:.3f}", refresh=False)
            elif "test_loss" in rnd:
                progress.set_postfix(loss=f"{rnd['test_loss']:.4g}", refresh=False)
        progress.close()

        final = dict(last_eval)
        if self.algorithm.has_finalize:
            _, ffail = ex.finalize(cfg.rounds, ids)
            failures += ffail
            evals, efail = ex.evaluate(cfg.rounds, ids)
            failures += efail
            for e in evals:
                add(cfg.rounds, e["client_id"], "final", e)
            final = eval_summary(evals)
            add(cfg.rounds, -1, "final", final)
        exported = None
        if run_dir is not None and cfg.output.export != "none":
            wanted = ids if cfg.output.export == "all" else [c for c in cfg.output.export if c in set(ids)]
            exported = run_dir / "export"
            _, xfail = ex.export(cfg.rounds, wanted, exported)
            failures += xfail
        server_state = ex.server_state()  # one fetch: for FedTP on Ray it carries the hypernetwork
        if held:
            final.update(self._personalize_holdout(ds, held, server_state, add))
        elapsed = time.perf_counter() - t_start

        metrics = pd.DataFrame(rows, columns=METRIC_COLUMNS)
        received = ex.received_names()
        if run_dir is not None and cfg.output.save_final:
            ex.save(run_dir / "checkpoints" / "final")
        summary = self._summary(metrics, final, elapsed, failures, run_dir)
        if exported is not None:
            summary["export_dir"] = str(exported)
        result = FederationResult(cfg, metrics, summary, run_dir, failures, received, server_state)
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


CHECKPOINT_META = "rayfed_checkpoint.json"


def _write_checkpoint_meta(directory: Path, rounds_done: int, cfg: FederationConfig) -> None:
    """Record which round a checkpoint follows (and its algorithm) next to the saved states."""
    (directory / CHECKPOINT_META).write_text(json.dumps(
        {"round": rounds_done, "algorithm": cfg.algorithm.name, "num_clients": cfg.data.num_clients}))


def _read_checkpoint_meta(directory: Path, cfg: FederationConfig, restored_round: int) -> int:
    """The round to resume after: from the checkpoint's record when present (checked against ``cfg``)."""
    p = directory / CHECKPOINT_META
    if not p.exists():  # written by an older version: trust the server state's round
        return restored_round
    meta = json.loads(p.read_text())
    for key, mine in (("algorithm", cfg.algorithm.name), ("num_clients", cfg.data.num_clients)):
        if meta.get(key) is not None and meta[key] != mine:
            cfg_key = "algorithm.name" if key == "algorithm" else "data.num_clients"
            raise ConfigError(f"config key '{cfg_key}': the checkpoint {str(directory)!r} was written with "
                              f"{key}={meta[key]!r} but this run has {mine!r}; resume with the same setting")
    return int(meta["round"])


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

    @property
    def metrics(self) -> pd.DataFrame:
        return pd.concat([r.metrics for r in self.results.values()], ignore_index=True)

    def table(self) -> pd.DataFrame:
        cols = ["accuracy_mean", "accuracy_weighted", "accuracy_p10", "accuracy_std", "test_loss", "bytes_up",
                "bytes_down", "seconds"]
        return pd.DataFrame([{"algorithm": n, **{c: r.summary.get(c) for c in cols}}
                             for n, r in self.results.items()])


def run_comparison(config: ConfigLike = None, algorithms: Optional[Sequence[str]] = None, *,
                   model_factory: Optional[ModelFactory] = None,
                   callbacks: Sequence[RoundCallback] = ()) -> ComparisonResult:
    """Run the same experiment (data, partition, seed, rounds) for several algorithms.

    ``algorithms`` defaults to ``config.compare`` (or just ``config.algorithm``). Outputs go to one
    parent run directory with a subdirectory per algorithm and combined plots.
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
    for n in names:
        # the configured algorithm keeps its options; the others run with their defaults
        sub = from_dict({**to_dict(cfg), "compare": []}) if n == cfg.algorithm.name else cfg.with_algorithm(n)
        feds.append(Federation(sub, model_factory=model_factory, callbacks=callbacks,
                               run_dir=(parent / n) if parent else False))
    for f in feds:  # reject every bad config before any actor starts
        f._validate()
    results: dict[str, FederationResult] = {}
    with runtime_session(cfg), warm_actors(cfg):  # one Ray; actor processes reused across methods
        for n, f in zip(names, feds):
            results[n] = f.fit()
    comp = ComparisonResult(results, parent)
    if parent is not None:
        comp.metrics.to_parquet(parent / "metrics.parquet", index=False)
        comp.table().to_csv(parent / "summary.csv", index=False)
        if cfg.output.plots:
            _plot(comp.metrics, parent)
    return comp


with contextlib.suppress(Exception):  # keep tqdm quiet about notebooks
    import warnings

    warnings.filterwarnings("ignore", message="IProgress not found")
