"""The tidy metrics table: recorded row by row, written to disk every round, summarised.

One row per (round, client, stage, task, exit, metric); client ``-1`` holds round aggregates, task
``""`` values that are not of one task, exit ``-1`` values that are not of one early exit.
:class:`MetricsLog` appends each round's rows to ``<run dir>/metrics/round_<N>.parquet`` (written
atomically), so a crash loses at most the round in progress and a resumed run picks the rows up to
its checkpoint; the final ``metrics.parquet`` is the whole table.

Example:
    >>> log = MetricsLog("fedavg")
    >>> log.add(1, 0, "eval", {"accuracy": 0.5, "tasks": {"parity": {"accuracy": 0.75}}})
    >>> log.frame()[["task", "metric", "value"]].values.tolist()
    [['', 'accuracy', 0.5], ['parity', 'accuracy', 0.75]]
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from rayfed.safe_io import ensure_private_dir, write_atomic

__all__ = ["METRIC_COLUMNS", "MetricsLog", "eval_summary"]

#: columns of the tidy metrics table
METRIC_COLUMNS = ["algorithm", "round", "client_id", "stage", "task", "exit", "metric", "value"]
PARTS_DIR = "metrics"


class MetricsLog:
    """The rows of one run. With a ``directory``, each round's rows are written to
    ``directory/metrics/round_<N>.parquet`` and released, so the driver's memory does not grow with
    the number of rounds or clients; :meth:`frame` reads them back.
    """

    def __init__(self, algorithm: str, directory: Optional[Path] = None) -> None:
        self.algorithm = algorithm
        self.directory = directory
        self.rows: list[dict] = []  # not written yet (all of them when there is no directory)

    def add(self, round: int, client_id: int, stage: str, metrics: Mapping[str, Any], task: str = "",
            exit: int = -1) -> None:
        """Record every numeric entry of ``metrics``; nested ``tasks``/``exits`` mappings become rows
        of their task or exit.
        """
        for name, v in metrics.items():
            if name == "tasks" and isinstance(v, Mapping):
                for t, tm in v.items():
                    self.add(round, client_id, stage, tm, t, exit)
            elif name == "exits" and isinstance(v, Mapping):
                for e, em in v.items():
                    self.add(round, client_id, stage, em, task, int(e))
            elif name != "client_id" and isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
                self.rows.append({"algorithm": self.algorithm, "round": round, "client_id": client_id, "stage": stage,
                                  "task": task, "exit": exit, "metric": name, "value": float(v)})

    def _parts(self, run_dir: Optional[Path] = None) -> list[Path]:
        d = (run_dir or self.directory) / PARTS_DIR if (run_dir or self.directory) is not None else None
        return sorted(d.glob("round_*.parquet")) if d is not None and d.is_dir() else []

    def flush(self, round: int) -> None:
        """Write the rows recorded since the last flush as ``metrics/round_<round>.parquet`` (and
        release them).
        """
        if self.directory is None or not self.rows:
            return
        buf = io.BytesIO()
        pd.DataFrame(self.rows, columns=METRIC_COLUMNS).to_parquet(buf, index=False)
        path = ensure_private_dir(self.directory / PARTS_DIR) / f"round_{round:06d}.parquet"
        if path.exists():  # a later flush of the same round (post-training stages): keep both
            path = path.with_name(f"round_{round:06d}_{len(list(path.parent.glob(path.stem + '*')))}.parquet")
        write_atomic(path, buf.getvalue())
        self.rows = []

    def frame(self) -> pd.DataFrame:
        """Every row so far, as a DataFrame with :data:`METRIC_COLUMNS`."""
        frames = [_with_columns(pd.read_parquet(p)) for p in self._parts()]
        frames.append(pd.DataFrame(self.rows, columns=METRIC_COLUMNS))
        frames = [f for f in frames if len(f)]
        if not frames:
            return pd.DataFrame(columns=METRIC_COLUMNS)
        return pd.concat(frames, ignore_index=True)[METRIC_COLUMNS]

    def resume(self, run_dir: Path, round: int) -> None:
        """Start from the rows of an earlier run up to ``round`` (its round files, or its
        ``metrics.parquet``): in the same directory its later round files are dropped; into another
        directory the earlier ones are copied (or, without a directory, loaded).
        """
        parts = self._parts(run_dir)
        keep = [p for p in parts if int(p.stem.split("_")[1]) <= round]
        same = self.directory is not None and self.directory.resolve() == run_dir.resolve()
        if same:
            for p in parts:
                if p not in keep:
                    p.unlink()
            return
        if keep:
            old = pd.concat([_with_columns(pd.read_parquet(p)) for p in keep], ignore_index=True)
        elif (run_dir / "metrics.parquet").exists():
            old = _with_columns(pd.read_parquet(run_dir / "metrics.parquet"))
            old = old[old["round"] <= round]
        else:
            return
        self.rows = old[METRIC_COLUMNS].to_dict("records")
        self.flush(round)


def _with_columns(old: pd.DataFrame) -> pd.DataFrame:
    for col, fill in (("task", ""), ("exit", -1)):  # tables written before these columns existed
        if col not in old.columns:
            old.insert(METRIC_COLUMNS.index(col), col, fill)
    return old


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
