"""PNG plots of a run's tidy metrics (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

__all__ = ["plot_accuracy", "plot_client_accuracy"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(metrics: pd.DataFrame, path: str | Path) -> Path:
    """Per-client mean (solid) and sample-weighted (dashed) test accuracy against round, per method."""
    plt = _plt()
    m = metrics[(metrics.client_id == -1) & (metrics.stage == "eval")]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (alg, g) in enumerate(m.groupby("algorithm", sort=False)):
        color = f"C{i}"
        for metric, style in (("accuracy_mean", "-"), ("accuracy_weighted", "--")):
            s = g[g.metric == metric].sort_values("round")
            if len(s):
                ax.plot(s["round"], s["value"], style, color=color,
                        label=f"{alg} ({'client mean' if metric == 'accuracy_mean' else 'weighted'})")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (own split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_client_accuracy(metrics: pd.DataFrame, path: str | Path) -> Path:
    """Distribution of the final per-client accuracy, one box per method."""
    plt = _plt()
    m = metrics[(metrics.client_id >= 0) & (metrics.metric == "accuracy") & metrics.stage.isin(["eval", "final"])]
    data, labels = [], []
    for alg, g in m.groupby("algorithm", sort=False):
        last = g[g.stage == "final"] if (g.stage == "final").any() else g[g["round"] == g["round"].max()]
        data.append(last["value"].to_numpy())
        labels.append(alg)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if data:
        ax.boxplot(data, tick_labels=labels, showmeans=True)
    ax.set_ylabel("final test accuracy per client")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
