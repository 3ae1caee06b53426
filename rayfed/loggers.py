"""Experiment tracking: each round's metrics to TensorBoard, MLflow, Weights & Biases or a CSV file.

``output.loggers: [tensorboard, csv, mlflow, wandb]`` picks them; each logs the round-level
metrics (the values a round callback receives: accuracies, losses, bytes, seconds) with the round
as the step. A logger whose package is not installed is a :class:`~rayfed.errors.ConfigError`
naming the extra to install, raised before any actor starts.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp())
    >>> (log,) = make_loggers(["csv"], d, {"seed": 0})
    >>> log.log(1, {"accuracy_mean": 0.5}); log.close()
    >>> (d / "rounds.csv").read_text().splitlines()
    ['round,accuracy_mean', '1,0.5']
"""

from __future__ import annotations

import csv
import importlib.util
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from rayfed.errors import ConfigError

__all__ = ["LOGGERS", "RoundLogger", "check_loggers", "make_loggers"]

#: logger name -> (the module it needs, the pip extra that installs it)
LOGGERS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
           "wandb": ("wandb", "wandb"), "csv": (None, None)}


class RoundLogger(Protocol):
    """Receives each round's metrics."""

    def log(self, round: int, metrics: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, numbers.Real) and not isinstance(v, bool)}


class TensorBoardLogger:
    """Scalars under ``<run dir>/tensorboard`` (``tensorboard --logdir <run dir>``)."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, round: int, metrics: Mapping[str, Any]) -> None:
        for k, v in _numbers(metrics).items():
            self.writer.add_scalar(k, v, global_step=round)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class CSVLogger:
    """One row per round in ``<run dir>/rounds.csv`` (columns: the first round's metrics, then new ones)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "rounds.csv"
        self.rows: list[dict[str, float]] = []

    def log(self, round: int, metrics: Mapping[str, Any]) -> None:
        self.rows.append({"round": round, **_numbers(metrics)})
        cols = list(dict.fromkeys(k for r in self.rows for k in r))
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(self.rows)

    def close(self) -> None:
        pass


class MLflowLogger:
    """Metrics of an MLflow run (the active one, or a new one with the config as parameters)."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        self.own = mlflow.active_run() is None
        if self.own:
            mlflow.start_run(run_name=run_dir.name)
            mlflow.log_params({k: str(v)[:250] for k, v in _flat(config).items()})

    def log(self, round: int, metrics: Mapping[str, Any]) -> None:
        self.mlflow.log_metrics(_numbers(metrics), step=round)

    def close(self) -> None:
        if self.own:
            self.mlflow.end_run()


class WandbLogger:
    """Metrics of a Weights & Biases run (project ``rayfed``; ``WANDB_*`` variables apply)."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project="rayfed", name=run_dir.name, dir=str(run_dir), config=dict(config))

    def log(self, round: int, metrics: Mapping[str, Any]) -> None:
        self.run.log(_numbers(metrics), step=round)

    def close(self) -> None:
        self.run.finish()


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flat(v, key) if isinstance(v, Mapping) else {key: v})
    return out


def check_loggers(names: Sequence[str]) -> None:
    """Refuse loggers whose packages are missing, naming the extra that installs them."""
    for n in names:
        module, extra = LOGGERS[n]
        if module is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(f"config key 'output.loggers': the {n} logger needs the {module!r} package, which is not "
                              f"installed; pip install 'rayfed-pfl[{extra}]' (or remove {n!r} from output.loggers)")


def make_loggers(names: Sequence[str], run_dir: Path, config: Mapping[str, Any]) -> list[RoundLogger]:
    """The loggers ``names`` writing for the run in ``run_dir`` (see the module docstring)."""
    check_loggers(names)
    makers = {"tensorboard": lambda: TensorBoardLogger(run_dir), "csv": lambda: CSVLogger(run_dir),
              "mlflow": lambda: MLflowLogger(run_dir, config), "wandb": lambda: WandbLogger(run_dir, config)}
    return [makers[n]() for n in names]
