"""PNG plots of a run's tidy metrics (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

__all__ = ["plot_accuracy", "plot_client_accuracy", "plot_exit_accuracy", "tasks_of"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _of_task(metrics: pd.DataFrame, task: str) -> pd.DataFrame:
    """The rows of one task (``""``: not per task), without per-exit rows."""
    if "exit" in metrics.columns:
        metrics = metrics[metrics.exit == -1]
    return metrics[metrics.task == task] if "task" in metrics.columns else metrics


def tasks_of(metrics: pd.DataFrame) -> list[str]:
    """The tasks with their own rows in ``metrics`` (multi-task data), in order of appearance."""
    if "task" not in metrics.columns:
        return []
    return [t for t in dict.fromkeys(metrics.task) if t]


def plot_accuracy(metrics: pd.DataFrame, path: str | Path, *, task: str = "") -> Path:
    """Per-client mean (solid) and sample-weighted (dashed) test accuracy against round, per method,
    over every client (and task), or of one ``task`` of multi-task data.

    Regression runs (no accuracy) plot the per-client mean and sample-weighted test loss instead,
    on a log scale.
    """
    plt = _plt()
    metrics = _of_task(metrics, task)
    m = metrics[(metrics.client_id == -1) & (metrics.stage == "eval")]
    regression = len(m) > 0 and not (m.metric == "accuracy_mean").any()
    pairs = (("test_loss_mean", "-"), ("test_loss", "--")) if regression else \
        (("accuracy_mean", "-"), ("accuracy_weighted", "--"))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (alg, g) in enumerate(m.groupby("algorithm", sort=False)):
        color = f"C{i}"
        for metric, style in pairs:
            s = g[g.metric == metric].sort_values("round")
            if len(s):  # one legend entry per method; the line styles are explained in the title
                ax.plot(s["round"], s["value"], style, color=color, label=alg if metric == pairs[0][0] else None)
    ax.set_title("solid: client mean, dashed: sample-weighted", fontsize=8)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("round")
    ax.set_ylabel("test loss (own split)" if regression else "test accuracy (own split)")
    if task:
        ax.set_title(f"task {task} (solid: client mean, dashed: sample-weighted)", fontsize=8)
    if regression and (m[m.metric.isin([p for p, _ in pairs])].value > 0).all():
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_client_accuracy(metrics: pd.DataFrame, path: str | Path, *, task: str = "") -> Path:
    """Distribution of the final per-client accuracy (loss for regression), one box per method
    (of one ``task`` of multi-task data: its rows, else the single-task rows).
    """
    plt = _plt()
    metrics = _of_task(metrics, task)
    evals = metrics[(metrics.client_id >= 0) & metrics.stage.isin(["eval", "final"])]
    metric = "accuracy" if (evals.metric == "accuracy").any() or not len(evals) else "loss"
    m = evals[evals.metric == metric]
    data, labels = [], []
    for alg, g in m.groupby("algorithm", sort=False):
        last = g[g.stage == "final"] if (g.stage == "final").any() else g[g["round"] == g["round"].max()]
        data.append(last["value"].to_numpy())
        labels.append(alg)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if data:
        ax.boxplot(data, tick_labels=labels, showmeans=True)
    ax.set_ylabel(f"final test {metric} per client")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_exit_accuracy(metrics: pd.DataFrame, path: str | Path) -> Path:
    """Final client-mean test accuracy against exit depth, one line per method (anytime models:
    each exit averaged over the clients that have it).
    """
    plt = _plt()
    m = metrics[(metrics.client_id == -1) & (metrics.exit >= 0) & (metrics.metric == "accuracy_mean")
                & metrics.stage.isin(["eval", "final"])]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (alg, g) in enumerate(m.groupby("algorithm", sort=False)):
        stage = "final" if (g.stage == "final").any() else "eval"
        g = g[(g.stage == stage) & (g["round"] == g[g.stage == stage]["round"].max())].sort_values("exit")
        ax.plot(g["exit"], g["value"], "o-", color=f"C{i}", label=alg)
    ax.set_xlabel("exit (blocks run)")
    ax.set_ylabel("final test accuracy (client mean)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
