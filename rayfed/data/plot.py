"""Plot how labels are spread across clients (matplotlib, Agg canvas: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:
    from rayfed.data.federated import FederatedDataset

__all__ = ["plot_label_distribution"]


def plot_label_distribution(ds: FederatedDataset, path: Union[str, Path]) -> Path:
    """Write a PNG of label counts per client: stacked bars, or a heatmap above 50 clients.

    Args:
        ds: the federated dataset.
        path: where to write the PNG (parent folders are created).

    Returns:
        The path written.

    Example:
        >>> plot_label_distribution(ds, "runs/x/label_distribution.png")  # doctest: +SKIP
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = ds.label_counts()
    n_clients, n_classes = counts.shape
    fig = Figure(figsize=(min(4 + 0.25 * n_clients, 16), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if n_clients <= 50:
        colors = _colors(n_classes)
        bottom = np.zeros(n_clients)
        for c in range(n_classes):
            ax.bar(np.arange(n_clients), counts[:, c], bottom=bottom.copy(), color=colors[c], width=0.85,
                   label=str(c) if n_classes <= 20 else None)
            bottom += counts[:, c]
        if n_classes <= 20:
            ax.legend(title="class", fontsize="small", ncols=1 + n_classes // 11, loc="upper left",
                      bbox_to_anchor=(1.0, 1.0))
        ax.set_ylabel("samples")
        ax.set_xlim(-0.6, n_clients - 0.4)
        ax.set_ylim(0, max(1.0, bottom.max()) * 1.04)
    else:
        im = ax.imshow(counts.T, aspect="auto", interpolation="nearest", cmap="viridis")
        fig.colorbar(im, ax=ax, label="samples")
        ax.set_ylabel("class")
    ax.set_xlabel("client")
    ax.set_title(f"Label distribution over {n_clients} clients")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "viridis"]
    return [cmap(i if n <= 20 else i / max(n - 1, 1)) for i in range(n)]
