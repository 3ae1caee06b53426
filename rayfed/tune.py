"""Ray Tune sweeps over federations: one trial = one :class:`~rayfed.Federation`.

A *search space file* (``tune_spaces/<method>.yaml``, format in ``tune_spaces/README.md``) names the
method, the metric, the scheduler and the sampled keys (dotted config keys mapped to Tune sample
types written as data). :func:`load_space` reads and checks one; :func:`make_tuner` turns it and a
base config into a configured :class:`ray.tune.Tuner`; :func:`trainable` is the trial function,
already wrapped with the placement group the federation needs (:func:`trial_resources`):

- bundle 0 hosts the trial (the process driving the rounds), then one bundle for the server actor
  and one per client actor, sized from ``runtime.*``; the executor places every actor in its
  bundle (:func:`rayfed.runtime.placement.plan_for_bundles`), so concurrent trials never compete
  for CPUs;
- every round is reported with :func:`ray.tune.report` (the last evaluation is carried forward on
  rounds without one, so schedulers always see the metric); every ``checkpoint_every`` rounds the
  server state and every client's private state go into a :class:`ray.tune.Checkpoint`;
- a restarted trial (failure with ``max_failures > 0``, or a PBT exploit) resumes from
  :func:`ray.tune.get_checkpoint` through ``Federation.fit(resume_from=...)``.

Schedulers: ASHA (Li et al., *A System for Massively Parallel Hyperparameter Tuning*, MLSys 2020,
arXiv 1810.05934), PBT (Jaderberg et al., *Population Based Training of Neural Networks*, 2017,
arXiv 1711.09846) and FIFO. Search: Tune's random/grid variant generator, or Optuna's TPE
(Akiba et al., KDD 2019) when ``optuna`` is installed.

Example:
    >>> from rayfed.tune import make_tuner
    >>> tuner = make_tuner("tune_spaces/fedper.yaml", base_config="my.yaml", num_samples=8)  # doctest: +SKIP
    >>> results = tuner.fit()                                                               # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import os
import shutil
import tempfile
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import yaml

from rayfed.config import (
    FederationConfig,
    apply_overrides,
    default_config_path,
    dump_config,
    from_dict,
    read_config_file,
    set_key,
    to_dict,
)
from rayfed.errors import ConfigError, did_you_mean

__all__ = [
    "SAMPLERS",
    "SCHEDULERS",
    "TUNE_METRICS",
    "SearchSpace",
    "best_config",
    "load_space",
    "make_tuner",
    "run_sweep",
    "trainable",
    "trial_resources",
    "write_results",
]

#: top-level keys of a search space file
SPACE_KEYS = ("algorithm", "description", "metric", "mode", "num_samples", "scheduler", "fixed", "space")

#: sampler name -> (argument description, Tune constructor name)
SAMPLERS: dict[str, str] = {
    "choice": "[v1, v2, ...]: one of the values, sampled uniformly",
    "grid": "[v1, v2, ...]: every value (grid search; multiplies the trials, random search only)",
    "uniform": "[low, high]: float uniform in [low, high)",
    "quniform": "[low, high, q]: uniform rounded to a multiple of q",
    "loguniform": "[low, high]: float log-uniform in [low, high), low > 0",
    "qloguniform": "[low, high, q]: log-uniform rounded to a multiple of q",
    "randint": "[low, high]: integer in [low, high) (high exclusive, as in Tune)",
    "qrandint": "[low, high, q]: integer in [low, high] (inclusive) that is a multiple of q",
    "lograndint": "[low, high]: integer log-uniform in [low, high) (high exclusive)",
    "randn": "[mean, sd]: float from a normal distribution",
}

#: scheduler name -> options allowed in the file's ``scheduler`` mapping
SCHEDULERS: dict[str, tuple[str, ...]] = {
    "asha": ("grace_period", "reduction_factor", "max_t", "brackets"),
    "fifo": (),
    "pbt": ("perturbation_interval", "quantile_fraction", "resample_probability", "burn_in_period", "synchronous"),
}

#: round-level metrics a trial reports (any can be the sweep's metric)
TUNE_METRICS = ("accuracy_mean", "accuracy_weighted", "accuracy_p10", "accuracy_std", "test_loss", "train_loss",
                "test_loss_mean", "test_loss_p90", "test_loss_max", "bytes_up", "bytes_down", "seconds")


def _native(v: Any) -> Any:
    """Numpy scalars (what Tune samples) -> Python values, recursively."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_native(x) for x in v]
    if isinstance(v, dict):
        return {k: _native(x) for k, x in v.items()}
    return v


# ---------------------------------------------------------------------------------------------
# search space files
# ---------------------------------------------------------------------------------------------


@dataclass
class SearchSpace:
    """A parsed search space file (see ``tune_spaces/README.md``).

    Attributes:
        algorithm: registered method every trial runs.
        space: dotted config key -> ``{sampler: args}`` (data, not Tune objects).
        metric: the metric to optimise (one of :data:`TUNE_METRICS`).
        mode: ``max`` or ``min``.
        scheduler: ``{"name": asha|fifo|pbt, **options}``.
        num_samples: trials to sample (each grid point is run this many times).
        fixed: dotted config key -> value applied to the base config of every trial.
        description: free text.
        source: where it was read from.
    """

    algorithm: str
    space: dict[str, dict[str, Any]]
    metric: str = "accuracy_mean"
    mode: str = "max"
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "asha"})
    num_samples: int = 8
    fixed: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    source: Optional[str] = None

    def where(self, key: str) -> str:
        return f"{self.source}: '{key}'" if self.source else f"'{key}'"

    def param_space(self) -> dict[str, Any]:
        """Tune's ``param_space``: dotted key -> Tune domain (or ``{"grid_search": [...]}``)."""
        return {k: _domain(k, spec) for k, spec in self.space.items()}

    def grid_keys(self) -> list[str]:
        return [k for k, spec in self.space.items() if next(iter(spec)) == "grid"]

    def sample(self, n: int, seed: int = 0) -> list[dict[str, Any]]:
        """``n`` sampled trial parameter sets (grid keys pick one value at random), as Python values."""
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            params = {}
            for k, dom in self.param_space().items():
                if isinstance(dom, dict):  # grid
                    vals = dom["grid_search"]
                    params[k] = vals[int(rng.integers(len(vals)))]
                else:
                    params[k] = dom.sample(random_state=np.random.RandomState(int(rng.integers(2**31))))
            out.append(_native(params))
        return out

    def base_mapping(self, base_config: Union[FederationConfig, Mapping, str, Path, None] = None,
                     overrides: Optional[list[str]] = None) -> dict:
        """The config mapping every trial starts from: the base config, ``overrides``, this method,
        ``fixed``; trials write no run directory, plots or progress bars.
        """
        data = apply_overrides(_base_data(base_config), overrides)
        alg = data.get("algorithm") or {}
        if not isinstance(alg, dict) or alg.get("name", "fedavg") != self.algorithm:
            data["algorithm"] = {"name": self.algorithm}  # options of another method do not apply
        data["compare"] = []
        for k, v in self.fixed.items():
            set_key(data, k, copy.deepcopy(v))
        out = data.setdefault("output", {})
        out.update(plots=False, progress=False)
        from_dict(data)  # fail before any trial starts
        return data


def _base_data(base_config: Union[FederationConfig, Mapping, str, Path, None]) -> dict:
    if isinstance(base_config, FederationConfig):
        return to_dict(base_config)
    if isinstance(base_config, Mapping):
        return copy.deepcopy(dict(base_config))
    if base_config is None:  # the built-in experiment, evaluated every round so schedulers can compare
        data = read_config_file(default_config_path())
        data["eval_every"] = 1
        return data
    return read_config_file(base_config)


def _num(key: str, v: Any, what: str = "a number") -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"search space key '{key}': expected {what}, got {v!r}")
    return v


def _domain(key: str, spec: Mapping[str, Any]) -> Any:
    """One sampler written as data -> a Tune domain (checks the arguments)."""
    from ray import tune

    (name, args), = spec.items()
    if name in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"search space key '{key}': {name} needs a non-empty list of values, got {args!r}")
        return tune.choice(args) if name == "choice" else tune.grid_search(args)
    n_args = {"quniform": 3, "qloguniform": 3, "qrandint": 3}.get(name, 2)
    if not isinstance(args, list) or len(args) != n_args:
        raise ConfigError(f"search space key '{key}': {name} takes {SAMPLERS[name].split(':')[0]}, got {args!r}")
    if name == "randn":
        mean, sd = _num(key, args[0]), _num(key, args[1], "a standard deviation > 0")
        if sd <= 0:
            raise ConfigError(f"search space key '{key}': randn needs sd > 0, got {sd!r}")
        return tune.randn(mean, sd)
    integer = name in ("randint", "qrandint", "lograndint")
    lo, hi = (_num(key, a, "an integer" if integer else "a number") for a in args[:2])
    if integer and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"search space key '{key}': {name} needs integers, got {args!r}")
    if not lo < hi:
        raise ConfigError(f"search space key '{key}': {name} needs low < high, got {args!r}")
    if name in ("loguniform", "qloguniform", "lograndint") and lo <= 0:
        raise ConfigError(f"search space key '{key}': {name} needs low > 0, got {args!r}")
    if n_args == 3 and _num(key, args[2], "a step q > 0") <= 0:
        raise ConfigError(f"search space key '{key}': {name} needs q > 0, got {args!r}")
    return getattr(tune, name)(*args)


def _candidates(spec: Mapping[str, Any]) -> list[Any]:
    """Values that stand for a sampler's whole range when validating: choices, or both ends."""
    (name, args), = spec.items()
    if name in ("choice", "grid"):
        return list(args)
    if name == "randn":
        return [args[0]]
    if name in ("randint", "lograndint"):
        return [args[0], args[1] - 1]
    if name == "qrandint":
        q = args[2]
        return [int(math.ceil(args[0] / q) * q), int(math.floor(args[1] / q) * q)]
    if name in ("quniform", "qloguniform"):
        q = args[2]
        return [float(math.ceil(args[0] / q) * q), float(math.floor(args[1] / q) * q)]
    lo, hi = args
    return [float(lo), float(hi) - 1e-12 * max(1.0, abs(hi))]


def _check_key(key: str, algorithm: str, where: str) -> None:
    """``key`` must name a config field of this method (or an entry under a mapping field)."""
    from rayfed.algorithms import get_algorithm

    if key in ("algorithm.name", "compare", "algorithm", "output") or key.startswith("output."):
        raise ConfigError(f"{where}: this key cannot be swept; the method is the file's 'algorithm' and trials "
                          "write no outputs")
    cls: Any = FederationConfig
    parts = key.split(".")
    path = []
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            hint = did_you_mean(".".join([*path, part]), [".".join([*path, f]) for f in fields])
            raise ConfigError(f"{where}: unknown config key{hint}; valid keys under "
                              f"'{'.'.join(path) or 'the top level'}': {', '.join(fields)}")
        path.append(part)
        tp = typing.get_type_hints(cls)[part]
        if ".".join(path) == "algorithm":
            tp = get_algorithm(algorithm).config_class
        origin = typing.get_origin(tp)
        if origin is Union or type(tp).__name__ == "UnionType":
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
            origin = typing.get_origin(tp)
        if i == len(parts) - 1:
            return
        if dataclasses.is_dataclass(tp):
            cls = tp
            continue
        if (origin or tp) is dict and i == len(parts) - 2:
            return  # an entry of a mapping field, e.g. runtime.resources_per_actor.site_a
        raise ConfigError(f"{where}: '{'.'.join(path)}' is a value, not a section")


def load_space(source: Union[str, Path, Mapping[str, Any], SearchSpace],
               base_config: Union[FederationConfig, Mapping, str, Path, None] = None) -> SearchSpace:
    """Read and check a search space: a YAML path, a mapping in the file format, or a :class:`SearchSpace`.

    Every key must exist for the method, and every sampler's values (each choice, both ends of a
    range) must give a config :func:`rayfed.config.from_dict` accepts on top of ``base_config``
    (default: rayfed's defaults).

    Raises:
        ConfigError: naming the file, the key, the value and the fix.
    """
    if isinstance(source, SearchSpace):
        sp = source
    else:
        where = None
        if isinstance(source, (str, Path)):
            p = Path(source)
            if not p.exists():
                raise ConfigError(f"search space file {str(source)!r} does not exist; see tune_spaces/ for examples")
            try:
                raw = yaml.safe_load(p.read_text())
            except yaml.YAMLError as e:
                raise ConfigError(f"search space file {str(source)!r} is not valid YAML: {e}") from e
            where = str(source)
        else:
            raw = copy.deepcopy(dict(source))
        sp = _parse(raw, where)
    _validate(sp, base_config)
    return sp


def _parse(raw: Any, where: Optional[str]) -> SearchSpace:
    label = where or "search space"
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: expected a mapping with keys {', '.join(SPACE_KEYS)}, got {type(raw).__name__}")
    unknown = [k for k in raw if k not in SPACE_KEYS]
    if unknown:
        raise ConfigError(f"{label}: unknown key(s) {unknown}; valid keys: {', '.join(SPACE_KEYS)}")
    for req in ("algorithm", "space"):
        if req not in raw:
            raise ConfigError(f"{label}: missing '{req}'" +
                              (" (the registered method every trial runs)" if req == "algorithm" else
                               " (dotted config keys -> samplers)"))
    space = raw["space"]
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{label}: 'space' must be a non-empty mapping of dotted config keys to samplers, "
                          f"got {space!r}")
    for k, spec in space.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
            raise ConfigError(f"{label}: space key '{k}': expected one sampler as {{name: args}} with name in "
                              f"{', '.join(SAMPLERS)}, got {spec!r} (fixed values go under 'fixed')")
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{label}: 'fixed' must map dotted config keys to values, got {fixed!r}")
    sched = raw.get("scheduler", {"name": "asha"})
    if isinstance(sched, str):
        sched = {"name": sched}
    if not isinstance(sched, dict):
        raise ConfigError(f"{label}: 'scheduler' must be a mapping like {{name: asha, grace_period: 2}}, got {sched!r}")
    sched = {"name": "asha", **sched}
    num_samples = raw.get("num_samples", 8)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"{label}: 'num_samples' must be an integer >= 1, got {num_samples!r}")
    return SearchSpace(algorithm=raw["algorithm"], space=space, metric=raw.get("metric", "accuracy_mean"),
                       mode=raw.get("mode", "max"), scheduler=sched, num_samples=num_samples, fixed=fixed,
                       description=str(raw.get("description", "")), source=where)


def _check_scheduler(sched: Mapping[str, Any], label: str) -> None:
    name = sched.get("name")
    if name not in SCHEDULERS:
        raise ConfigError(f"{label}: scheduler name {name!r} is not one of {', '.join(SCHEDULERS)}")
    bad = [k for k in sched if k != "name" and k not in SCHEDULERS[name]]
    if bad:
        raise ConfigError(f"{label}: scheduler option(s) {bad} do not apply to {name}; valid: "
                          f"{', '.join(SCHEDULERS[name]) or 'none'}")
    for k, v in sched.items():
        if k in ("grace_period", "reduction_factor", "max_t", "brackets", "perturbation_interval",
                 "burn_in_period"):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < (0 if k == "burn_in_period" else 1):
                raise ConfigError(f"{label}: scheduler.{k} must be a number >= 1, got {v!r}")
        if k == "synchronous" and not isinstance(v, bool):
            raise ConfigError(f"{label}: scheduler.synchronous must be true or false, got {v!r}")
        if k in ("quantile_fraction", "resample_probability") and not (
                isinstance(v, (int, float)) and 0 <= v <= (0.5 if k == "quantile_fraction" else 1)):
            raise ConfigError(f"{label}: scheduler.{k} must be in [0, {0.5 if k == 'quantile_fraction' else 1}], "
                              f"got {v!r}")


def _validate(sp: SearchSpace, base_config: Union[FederationConfig, Mapping, str, Path, None]) -> None:
    from rayfed.algorithms import available

    label = sp.source or "search space"
    if sp.algorithm not in available():
        raise ConfigError(f"{label}: algorithm {sp.algorithm!r} is not registered"
                          f"{did_you_mean(sp.algorithm, available())}; registered: {', '.join(available())}")
    if sp.metric not in TUNE_METRICS:
        raise ConfigError(f"{label}: metric {sp.metric!r} is not reported by trials; use one of "
                          f"{', '.join(TUNE_METRICS)}")
    if sp.mode not in ("max", "min"):
        raise ConfigError(f"{label}: mode must be max or min, got {sp.mode!r}")
    _check_scheduler(sp.scheduler, label)
    for k in sp.fixed:
        _check_key(k, sp.algorithm, f"{label}: fixed key '{k}'")
    for k, spec in sp.space.items():
        _check_key(k, sp.algorithm, f"{label}: space key '{k}'")
        _domain(k, spec)
    base = sp.base_mapping(base_config if base_config is not None else {})
    for k, spec in sp.space.items():
        for v in _candidates(spec):
            d = copy.deepcopy(base)
            set_key(d, k, v)
            try:
                from_dict(d)
            except ConfigError as e:
                raise ConfigError(f"{label}: space key '{k}': value {v!r} gives an invalid config: {e}") from e


# ---------------------------------------------------------------------------------------------
# trials
# ---------------------------------------------------------------------------------------------


def merge_params(base: Mapping[str, Any], params: Mapping[str, Any]) -> dict:
    """A trial's config mapping: ``base`` with each dotted key of ``params`` set (Tune values made plain)."""
    d = copy.deepcopy(dict(base))
    for k, v in params.items():
        set_key(d, k, _native(v))
    return d


def trial_resources(config: Union[FederationConfig, Mapping, str, Path], driver_cpus: float = 0.5):
    """The :class:`ray.tune.PlacementGroupFactory` of one trial of ``config``.

    Bundle 0 is the trial's own process (``driver_cpus``); then the server (``runtime.server_num_cpus``)
    and one bundle per client actor (``runtime.num_actors``, default 1, plus one per site, each with
    ``runtime.num_cpus_per_actor``, default 1 CPU, and its custom resources). A ``local`` executor
    runs everything in the trial's process: one bundle.
    """
    from ray import tune

    from rayfed.runtime.placement import trial_bundles

    cfg = config if isinstance(config, FederationConfig) else from_dict(_base_data(config))
    if cfg.runtime.executor == "local":
        return tune.PlacementGroupFactory([{"CPU": float(driver_cpus)}])
    return tune.PlacementGroupFactory(trial_bundles(cfg, list(range(cfg.data.num_clients)), driver_cpus),
                                      strategy="PACK")


def _run_trial(params: dict, *, base: dict, model_factory: Optional[Callable], checkpoint_every: int,
               metric: str = "accuracy_mean") -> None:
    """The body of one trial (runs inside Tune's trial actor)."""
    import ray
    from ray import tune

    from rayfed.federation import Federation

    cfg = from_dict(merge_params(base, params))
    work = Path(tempfile.mkdtemp(prefix="rayfed-trial-"))
    try:
        resume = None
        ckpt = tune.get_checkpoint()
        if ckpt is not None:
            resume = Path(ckpt.to_directory(str(work / "resume")))
        pg = ray.util.get_current_placement_group() if cfg.runtime.executor == "ray" else None
        fed = Federation(cfg, model_factory=model_factory, run_dir=False, placement_group=pg)
        last: dict[str, float] = {}
        deferred: dict[str, Any] = {}

        def send(metrics: dict, ckpt_dir: Optional[Path]) -> None:
            if ckpt_dir is None:
                tune.report(metrics)
                return
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # Tune has persisted its copy

        def on_round(rnd: int, metrics: dict) -> None:
            last.update({k: float(v) for k, v in metrics.items()
                         if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)})
            last.setdefault(metric, float("nan"))  # before the first evaluation (eval_every > 1)
            first = [metric, "round", *(k for k in TUNE_METRICS if k != metric)]  # Tune's table shows 4
            out = {k: last[k] for k in first if k in last}
            out["round"] = rnd
            out.update({k: v for k, v in last.items() if k not in out})
            ckpt_dir = None
            if checkpoint_every and (rnd % checkpoint_every == 0 or rnd == cfg.rounds):
                ckpt_dir = fed.checkpoint(work / f"round_{rnd}")
            if rnd == cfg.rounds and fed.algorithm.has_finalize:  # report after the post-training stage
                deferred.update(metrics=out, ckpt=ckpt_dir)
                return
            send(out, ckpt_dir)

        fed.callbacks.append(on_round)
        result = fed.fit(resume_from=resume)
        if deferred:
            final = {k: float(v) for k, v in result.summary.items() if k.startswith(("accuracy", "test_"))}
            send({**deferred["metrics"], **final}, deferred["ckpt"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def trainable(base_config: Union[FederationConfig, Mapping, str, Path, None] = None, *,
              model_factory: Optional[Callable] = None, checkpoint_every: Optional[int] = None,
              driver_cpus: float = 0.5, metric: str = "accuracy_mean"):
    """A Tune function trainable running one federation per trial, with its placement group attached.

    Each trial's ``config`` maps dotted config keys to values (``{"train.lr": 0.01}``) applied to
    ``base_config``.

    Args:
        base_config: a config, mapping or YAML path (None: the built-in digits experiment).
        model_factory: optional ``factory(info) -> nn.Module`` for every trial.
        checkpoint_every: checkpoint every N rounds (default: ``output.checkpoint_every`` or 1; 0 = never).
        driver_cpus: CPUs of bundle 0, the trial's own process.
        metric: reported first (Tune's progress table shows the first few metrics).

    Example:
        >>> from ray import tune
        >>> tuner = tune.Tuner(trainable("base.yaml"), param_space={"train.lr": tune.loguniform(1e-3, 1e-1)},
        ...                    tune_config=tune.TuneConfig(metric="accuracy_mean", mode="max"))  # doctest: +SKIP
    """
    from ray import tune

    data = _base_data(base_config)
    data["compare"] = []
    data.setdefault("output", {})["progress"] = False  # no progress bars in trial logs
    cfg = from_dict(data)
    every = checkpoint_every if checkpoint_every is not None else (cfg.output.checkpoint_every or 1)
    if every < 0:
        raise ConfigError(f"checkpoint_every: expected an integer >= 0, got {every!r}")

    def rayfed_trial(config: dict) -> None:
        _run_trial(config, base=data, model_factory=model_factory, checkpoint_every=every, metric=metric)

    rayfed_trial.__name__ = rayfed_trial.__qualname__ = f"rayfed_{cfg.algorithm.name}"
    return tune.with_resources(rayfed_trial, trial_resources(cfg, driver_cpus))


# ---------------------------------------------------------------------------------------------
# the tuner
# ---------------------------------------------------------------------------------------------


def _scheduler(sp: SearchSpace, name: str, rounds: int, checkpoint_every: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    opts = {k: v for k, v in sp.scheduler.items() if k != "name"}
    if name != sp.scheduler.get("name"):
        opts = {}  # the file's options belong to its own scheduler
    _check_scheduler({"name": name, **opts}, sp.source or "search space")
    if name == "fifo":
        return FIFOScheduler()
    if name == "asha":
        max_t = int(opts.pop("max_t", rounds))
        grace = int(opts.pop("grace_period", 1))
        if grace > max_t:
            raise ConfigError(f"{sp.source or 'search space'}: scheduler.grace_period={grace} exceeds max_t={max_t} "
                              "(the rounds of the base config); lower it or raise rounds")
        return ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=grace,
                             reduction_factor=opts.pop("reduction_factor", 2), brackets=int(opts.pop("brackets", 1)))
    mutations = {k: _domain(k, spec) for k, spec in sp.space.items() if next(iter(spec)) != "grid"}
    if not mutations:
        raise ConfigError(f"{sp.source or 'search space'}: PBT mutates sampled keys, but every key is a grid; "
                          "use choice/uniform/loguniform samplers with --scheduler pbt")
    if "synchronous" in opts:
        opts["synch"] = opts.pop("synchronous")
    return PopulationBasedTraining(time_attr="training_iteration",
                                   perturbation_interval=opts.pop("perturbation_interval", checkpoint_every or 1),
                                   hyperparam_mutations=mutations, **opts)


def _search(kind: str, sp: SearchSpace, seed: int, scheduler_name: str, max_concurrent: Optional[int]):
    if kind == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(max_concurrent=max_concurrent or 0, random_state=seed)
    if kind != "optuna":
        raise ConfigError(f"--search: expected random or optuna, got {kind!r}")
    if importlib.util.find_spec("optuna") is None:
        raise ConfigError("--search optuna needs the optuna package, which is not installed; install it with "
                          "`pip install 'rayfed-pfl[optuna]'` (or `pip install optuna`), or use --search random")
    if sp.grid_keys():
        raise ConfigError(f"{sp.source or 'search space'}: grid samplers ({', '.join(sp.grid_keys())}) work with "
                          "--search random only; use choice with optuna")
    if scheduler_name == "pbt":
        raise ConfigError("--scheduler pbt chooses its own configs; use it with --search random")
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=seed)


def make_tuner(space: Union[SearchSpace, str, Path, Mapping[str, Any]],
               base_config: Union[FederationConfig, Mapping, str, Path, None] = None, *,
               overrides: Optional[list[str]] = None, num_samples: Optional[int] = None,
               scheduler: Optional[str] = None, search: str = "random", storage_path: Union[str, Path, None] = None,
               name: Optional[str] = None, model_factory: Optional[Callable] = None,
               checkpoint_every: Optional[int] = None, driver_cpus: float = 0.5,
               max_concurrent_trials: Optional[int] = None, max_failures: int = 0, reuse_actors: bool = True,
               verbose: int = 1, callbacks: Optional[list] = None):
    """A configured :class:`ray.tune.Tuner` for a search space (customise it before ``.fit()``).

    Args:
        space: a search space file, mapping or :class:`SearchSpace`.
        base_config: config, mapping or YAML path the trials start from (None: the built-in experiment).
        overrides: ``a.b=c`` overrides applied to the base config.
        num_samples: trials (default: the file's ``num_samples``).
        scheduler: asha, fifo or pbt (default: the file's).
        search: random (Tune's variant generator, grid included) or optuna.
        storage_path: where Tune writes trials (default ``runs/``), made absolute.
        name: experiment folder name (default ``tune-<timestamp>-<method>``).
        model_factory: optional ``factory(info) -> nn.Module``.
        checkpoint_every: checkpoint every N rounds (default: PBT's perturbation interval, else
            ``output.checkpoint_every`` or 1).
        driver_cpus: CPUs of each trial's own process (bundle 0).
        max_concurrent_trials: cap on trials running at once (default: as many as fit).
        max_failures: restarts of a failing trial (from its latest checkpoint).
        reuse_actors: run later trials in the process of a finished one (saves a process start and
            the torch import per trial); each trial still starts its own server and client actors.
        verbose: Tune's output level (0 silent, 1 progress table, 2 verbose).
        callbacks: Tune callbacks (e.g. ``ray.air.integrations.mlflow.MLflowLoggerCallback`` or
            ``ray.tune.logger.TBXLoggerCallback``), added to the run config.
    """
    from ray import tune

    base_data = apply_overrides(_base_data(base_config), overrides)
    sp = load_space(space, base_data)
    base = sp.base_mapping(base_data)
    cfg = from_dict(base)
    sched_name = scheduler or sp.scheduler.get("name", "asha")
    if sched_name not in SCHEDULERS:
        raise ConfigError(f"--scheduler: expected one of {', '.join(SCHEDULERS)}, got {sched_name!r}")
    every = checkpoint_every
    if every is None:
        every = int(sp.scheduler.get("perturbation_interval", 0)) if sched_name == "pbt" else 0
        every = every or cfg.output.checkpoint_every or 1
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    tune_config = tune.TuneConfig(
        metric=sp.metric, mode=sp.mode, num_samples=num_samples or sp.num_samples,
        scheduler=_scheduler(sp, sched_name, cfg.rounds, every),
        search_alg=_search(search, sp, cfg.seed, sched_name, max_concurrent_trials),
        max_concurrent_trials=max_concurrent_trials if search != "random" else None,  # the generator caps it
        reuse_actors=reuse_actors)
    run_config = tune.RunConfig(
        name=name or f"tune-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{sp.algorithm}",
        storage_path=str(Path(storage_path or cfg.output.dir or "runs").expanduser().resolve()),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=4 if sched_name == "pbt" else 2),
        failure_config=tune.FailureConfig(max_failures=max_failures),
        callbacks=list(callbacks or []) or None,
        verbose=verbose)
    return tune.Tuner(trainable(base, model_factory=model_factory, checkpoint_every=every, driver_cpus=driver_cpus,
                                metric=sp.metric),
                      param_space=sp.param_space(), tune_config=tune_config, run_config=run_config)


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------


def _plain_frame(df):
    """Make a frame Parquet-safe: object columns holding mixed or nested values become strings."""
    import pandas as pd

    df = df.copy()
    for c in df.columns:
        if df[c].dtype == object:
            vals = df[c].dropna()
            if not vals.map(lambda v: isinstance(v, str)).all():
                df[c] = df[c].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    return pd.DataFrame(df)


def _history(result):
    """Every report of a trial: Tune's progress.csv in the trial folder (complete across PBT
    restores, where ``Result.metrics_dataframe`` can miss rows), else ``metrics_dataframe``.
    """
    import pandas as pd

    f = result.metrics_dataframe
    try:
        csv = Path(result.path) / "progress.csv"
        if csv.exists() and csv.stat().st_size:
            full = pd.read_csv(csv)
            if f is None or len(full) > len(f):
                return full
    except (OSError, ValueError, pd.errors.ParserError):
        pass
    return f


def trial_table(results, space: SearchSpace, rounds: int):
    """One row per trial: its sampled values, last metrics, rounds run and whether it was stopped early."""
    import pandas as pd

    rows = []
    for r in results:
        m = dict(r.metrics or {})
        row = {"trial_id": m.get("trial_id"), "status": "ERROR" if r.error else "TERMINATED",
               "rounds_completed": int(m.get("round", m.get("training_iteration", 0)) or 0)}
        row["stopped_early"] = not r.error and row["rounds_completed"] < rounds
        row.update({f"config/{k}": _native(r.config.get(k)) for k in space.space})
        row.update({k: m.get(k) for k in TUNE_METRICS if k in m})
        row["path"] = r.path
        rows.append(row)
    return pd.DataFrame(rows)


def best_config(results, space: SearchSpace, base: Mapping[str, Any], rounds: Optional[int] = None) -> FederationConfig:
    """The config of the best trial (by the space's metric on its last report; trials that ran every
    round are preferred over early-stopped ones), ready for ``rayfed run``.
    """
    table = trial_table(results, space, rounds or from_dict(dict(base)).rounds)
    ok = table[table.status != "ERROR"].dropna(subset=[space.metric]) if space.metric in table else table.iloc[0:0]
    if ok.empty:
        raise RuntimeError("no trial reported the metric; see the Tune logs in the experiment folder")
    full = ok[~ok.stopped_early]
    pool = full if not full.empty else ok
    idx = pool[space.metric].idxmax() if space.mode == "max" else pool[space.metric].idxmin()
    params = {k: pool.loc[idx, f"config/{k}"] for k in space.space}
    data = merge_params(base, params)
    data.setdefault("output", {}).update(plots=True, progress=True)
    return from_dict(data)


def write_results(results, out_dir: Union[str, Path], space: SearchSpace, base: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``best.yaml`` (runs with ``rayfed run``), ``trials.parquet`` (one row per trial) and
    ``rounds.parquet`` (every report of every trial) into ``out_dir``; returns their paths.
    """
    import pandas as pd

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    rounds = from_dict(dict(base)).rounds
    table = trial_table(results, space, rounds)
    _plain_frame(table).to_parquet(d / "trials.parquet", index=False)
    frames = []
    for r in results:
        f = _history(r)
        if f is None or f.empty:
            continue
        f = f.copy()
        for k in space.space:
            f[f"config/{k}"] = [_native(r.config.get(k))] * len(f)
        frames.append(f)
    rounds_df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    _plain_frame(rounds_df).to_parquet(d / "rounds.parquet", index=False)
    paths = {"trials": d / "trials.parquet", "rounds": d / "rounds.parquet"}
    try:
        dump_config(best_config(results, space, base, rounds), d / "best.yaml")
        paths["best"] = d / "best.yaml"
    except RuntimeError:
        pass
    return paths


def run_sweep(space: Union[SearchSpace, str, Path, Mapping[str, Any]],
              base_config: Union[FederationConfig, Mapping, str, Path, None] = None, *,
              out_dir: Union[str, Path, None] = None, **tuner_kwargs: Any) -> dict[str, Any]:
    """Build the tuner, run it (joining a running Ray or starting one) and write the results.

    Returns ``{"results": ResultGrid, "dir": Path, "space": SearchSpace, "trials": DataFrame,
    "best": Path | None, "trials_path": Path, "rounds_path": Path}``.
    """
    from rayfed.runtime.ray_executor import ray_session

    base_data = apply_overrides(_base_data(base_config), tuner_kwargs.pop("overrides", None))
    sp = load_space(space, base_data)
    base = sp.base_mapping(base_data)
    cfg = from_dict(base)
    root = Path(out_dir or cfg.output.dir or "runs").expanduser().resolve()
    name = tuner_kwargs.pop("name", None) or f"tune-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{sp.algorithm}"
    with ray_session(cfg.runtime.address, log_to_driver=False):
        tuner = make_tuner(sp, base_data, storage_path=root, name=name, **tuner_kwargs)
        results = tuner.fit()
    exp_dir = root / name
    paths = write_results(results, exp_dir, sp, base)
    import pandas as pd

    return {"results": results, "dir": exp_dir, "space": sp, "trials": pd.read_parquet(paths["trials"]),
            "best": paths.get("best"), "trials_path": paths["trials"], "rounds_path": paths["rounds"]}


def cmd_tune(args) -> int:
    """``rayfed tune SPACE.yaml [--config BASE.yaml] [--set k=v] ...`` (see :func:`rayfed.cli.build_parser`)."""
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    out = run_sweep(args.space, args.config, out_dir=args.out, overrides=list(args.set or []),
                    num_samples=args.num_samples, scheduler=args.scheduler, search=args.search,
                    max_concurrent_trials=args.max_concurrent, max_failures=args.max_failures)
    sp: SearchSpace = out["space"]
    table = out["trials"]
    cols = ["trial_id", "rounds_completed", "stopped_early", sp.metric, *[f"config/{k}" for k in sp.space]]
    table = table.sort_values(sp.metric, ascending=sp.mode == "min", na_position="last") if sp.metric in table \
        else table
    print(table[[c for c in cols if c in table]].to_string(index=False))
    errors = int((out["trials"].status == "ERROR").sum())
    if errors:
        print(f"\n{errors} trial(s) failed; their logs are under {out['dir']}")
    if out["best"] is not None:
        print(f"\nbest config: {out['best']}  (run it with: rayfed run {out['best']})")
    print(f"results: {out['trials'].shape[0]} trials in {out['trials_path']}, every round in {out['rounds_path']}")
    return 0 if out["best"] is not None else 1
