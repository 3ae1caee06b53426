"""A dataset split into clients, each with its own train and test split.

Example:
    >>> from rayfed.config import DataConfig
    >>> ds = FederatedDataset.from_config(DataConfig(source="digits", num_clients=5), seed=0)
    >>> len(ds.client_ids), ds.client_data(0).x_train.shape[1:]
    (5, (1, 8, 8))
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa

from rayfed.config import DataConfig, PartitionConfig
from rayfed.data.info import ClientData, DatasetInfo
from rayfed.data.partition import partition_indices, split_train_test
from rayfed.data.sources import label_names, load_source, table_to_arrays

__all__ = ["FederatedDataset"]


class FederatedDataset:
    """Samples of every client in one array, reordered so each client's train and test rows are contiguous.

    :meth:`client_data` returns views into that array (no copies); treat them as read-only.
    Building from the same config and seed gives identical shards in any process.

    Attributes:
        info: number of classes, feature shape, modality and vocabulary size.
        client_ids: ``0 .. num_clients-1``.
        label_names: class names when the source labels were strings, else ``None``.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, info: DatasetInfo,
                 splits: list[tuple[np.ndarray, np.ndarray]], label_names: Optional[list[str]] = None) -> None:
        """Build from full arrays and per-client ``(train_indices, test_indices)`` into them."""
        order = np.concatenate([np.concatenate([tr, te]) for tr, te in splits]).astype(np.int64)
        self._x = x[order]
        self._y = y[order].astype(np.float32 if info.task == "regression" else np.int64)
        sizes = np.array([[len(tr), len(te)] for tr, te in splits], dtype=np.int64).reshape(-1, 2)
        self._start = np.concatenate([[0], np.cumsum(sizes.sum(axis=1))])
        self._num_train, self._num_test = sizes[:, 0], sizes[:, 1]
        self.info = info
        self.client_ids: list[int] = list(range(len(splits)))
        self.label_names = label_names

    @classmethod
    def from_config(cls, cfg: DataConfig, seed: int) -> FederatedDataset:
        """Load ``cfg.source``, partition it across ``cfg.num_clients`` and split each client.

        Args:
            cfg: the ``data`` section.
            seed: seeds the synthetic source, the partitioner and every client's split.

        Returns:
            The federated dataset.
        """
        if cfg.source == "partial_linear":  # clients are generated, not partitioned
            from rayfed.data.partial_linear import make_partial_linear

            x, y, info, splits = make_partial_linear(cfg, seed)
            return cls(x, y, info, splits)
        table, info = load_source(cfg, seed)
        x, y, groups = table_to_arrays(table, info)
        return cls.from_arrays(x, y, info, num_clients=cfg.num_clients, partition=cfg.partition,
                               test_fraction=cfg.test_fraction, seed=seed, groups=groups,
                               label_names=label_names(table))

    @classmethod
    def from_arrays(cls, x: np.ndarray, y: np.ndarray, info: DatasetInfo, *, num_clients: int,
                    partition: PartitionConfig, test_fraction: float, seed: int,
                    groups: Optional[np.ndarray] = None,
                    label_names: Optional[list[str]] = None) -> FederatedDataset:
        """Partition in-memory arrays (``x`` shaped ``(n, *info.feature_shape)``, ``y`` int labels)."""
        parts = partition_indices(y, num_clients, partition, seed, groups)
        splits = [split_train_test(p, y, test_fraction, seed, cid) for cid, p in enumerate(parts)]
        return cls(x, y, info, splits, label_names)

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.client_ids)

    def client_data(self, cid: int) -> ClientData:
        """Client ``cid``'s shard: train and test arrays shaped ``(n, *info.feature_shape)``."""
        self._check(cid)
        a, b, c = self._start[cid], self._start[cid] + self._num_train[cid], self._start[cid + 1]
        return ClientData(client_id=cid, x_train=self._x[a:b], y_train=self._y[a:b],
                          x_test=self._x[b:c], y_test=self._y[b:c])

    def num_train(self, cid: int) -> int:
        """Training samples of client ``cid``."""
        self._check(cid)
        return int(self._num_train[cid])

    def num_test(self, cid: int) -> int:
        """Test samples of client ``cid``."""
        self._check(cid)
        return int(self._num_test[cid])

    def client_sizes(self) -> dict[int, int]:
        """Training-set size of every client (the usual aggregation weights)."""
        return {cid: int(n) for cid, n in enumerate(self._num_train)}

    def label_counts(self) -> np.ndarray:
        """Train + test samples per client and class, shape ``(num_clients, num_classes)``."""
        owner = np.repeat(np.arange(self.num_clients), np.diff(self._start))
        if self.info.task == "regression":  # no classes: one column of sample counts
            return np.diff(self._start).reshape(self.num_clients, 1)
        k = self.info.num_classes
        return np.bincount(owner * k + self._y, minlength=self.num_clients * k).reshape(self.num_clients, k)

    def summary(self) -> pa.Table:
        """One row per client: sizes, classes present, the three largest classes and the label counts."""
        counts = self.label_counts()
        top = []
        for row in counts:
            best = [c for c in np.argsort(-row, kind="stable")[:3] if row[c] > 0]
            top.append(", ".join(f"{c}:{row[c]}" for c in best))
        return pa.table({
            "client_id": pa.array(self.client_ids, pa.int64()),
            "num_train": pa.array(self._num_train, pa.int64()),
            "num_test": pa.array(self._num_test, pa.int64()),
            "num_classes_present": pa.array((counts > 0).sum(axis=1), pa.int64()),
            "top_classes": pa.array(top, pa.string()),
            "label_counts": pa.array(counts.tolist(), pa.list_(pa.int64())),
        })

    def __repr__(self) -> str:
        sizes = np.diff(self._start)
        return (f"FederatedDataset(clients={self.num_clients}, samples={int(sizes.sum())}, "
                f"per_client={int(sizes.min())}..{int(sizes.max())}, info={self.info})")

    def _check(self, cid: int) -> None:
        if not 0 <= cid < self.num_clients:
            raise KeyError(f"client id {cid!r} out of range; valid ids are 0..{self.num_clients - 1}")
