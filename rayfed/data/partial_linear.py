"""The over-personalized linear regression problem of FFGG (a seeded synthetic source).

Mishchenko, Islamov, Gorbunov, Horváth. *Partially Personalized Federated Learning: Breaking the
Curse of Data Heterogeneity.* TMLR 2025, arXiv 2305.18285. Their synthetic experiments use a linear
model with a shared part of dimension 100 and a private part of dimension 50 on 8 clients; this
module builds a problem of that shape (the exact generator of the paper is not reproduced).

Client ``i`` draws samples ``(a, c)`` with ``a ~ N(mu_i, I)`` in R^shared_dim and ``c ~ N(nu_i, I)``
in R^private_dim (``mu_i, nu_i ~ N(0, feature_shift^2 I)``, zero by default) and targets

    t = a . x* + c . y_i* + noise * N(0, 1),

with one shared ``x* ~ N(0, I / shared_dim)`` and ``y_i* = y0 + heterogeneity * z_i`` where
``y0, z_i ~ N(0, I / private_dim)``. With ``noise = 0`` the problem is *over-personalized*: for the
split (x shared, y_i private) the point ``(x*, y_1*, ..., y_n*)`` fits every client exactly, whatever
the heterogeneity; a single model shared by all clients cannot, and its best loss grows like
``heterogeneity^2``.

Features are stored as one vector ``[a, c]`` per sample; ``DatasetInfo.private_features`` records
that the trailing ``private_dim`` of them are the client-specific block, which
``model.name=linear`` reads with its ``head`` (so ``preset:head`` selects ``y_i``).

Example:
    >>> from rayfed.config import DataConfig
    >>> x, y, info, splits = make_partial_linear(DataConfig(source="partial_linear", num_clients=8), seed=0)
    >>> x.shape, info.task, info.private_features, len(splits)
    ((1600, 150), 'regression', 50, 8)
"""

from __future__ import annotations

import numpy as np

from rayfed.config import DataConfig
from rayfed.data.info import DatasetInfo

__all__ = ["make_partial_linear"]


def make_partial_linear(cfg: DataConfig, seed: int
                        ) -> tuple[np.ndarray, np.ndarray, DatasetInfo, list[tuple[np.ndarray, np.ndarray]]]:
    """Generate the problem described in the module docstring.

    Args:
        cfg: the ``data`` section (``num_clients``, ``test_fraction`` and ``partial_linear``).
        seed: the run's seed; the same seed gives the same problem in any process.

    Returns:
        ``(x, y, info, splits)``: float32 features ``(n, shared_dim + private_dim)``, float32
        targets ``(n,)``, the dataset info, and per-client ``(train_indices, test_indices)``.
    """
    p = cfg.partial_linear
    n_clients, m = cfg.num_clients, p.samples_per_client
    dx, dy = p.shared_dim, p.private_dim
    rng = np.random.default_rng([seed % 2**63, 0x5EED, 3])
    x_star = rng.standard_normal(dx) / np.sqrt(dx)
    y0 = rng.standard_normal(dy) / np.sqrt(dy)
    xs, ys, splits = [], [], []
    n_test = min(m - 1, max(1, int(round(cfg.test_fraction * m))))
    for i in range(n_clients):
        crng = np.random.default_rng([seed % 2**63, 0x5EED, 4, i])
        y_star = y0 + p.heterogeneity * crng.standard_normal(dy) / np.sqrt(dy)
        mu = p.feature_shift * crng.standard_normal(dx + dy)
        feats = crng.standard_normal((m, dx + dy)) + mu
        t = feats[:, :dx] @ x_star + feats[:, dx:] @ y_star + p.noise * crng.standard_normal(m)
        xs.append(feats.astype(np.float32))
        ys.append(t.astype(np.float32))
        start = i * m
        splits.append((np.arange(start, start + m - n_test), np.arange(start + m - n_test, start + m)))
    info = DatasetInfo(num_classes=1, feature_shape=(dx + dy,), modality="vector", task="regression",
                       private_features=dy)
    return np.concatenate(xs), np.concatenate(ys), info, splits
