"""A dataset split into clients: one or more tasks, each client with its own train and test split.

Example:
    >>> from rayfed.config import DataConfig
    >>> ds = FederatedDataset.from_config(DataConfig(source="digits", num_clients=5), seed=0)
    >>> len(ds.client_ids), ds.client_data(0).x_train.shape[1:]
    (5, (1, 8, 8))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa

from rayfed.config import DataConfig, PartitionConfig
from rayfed.data.info import ClientData, DatasetInfo, Inputs, TaskData, TaskInfo
from rayfed.data.partition import assign_test_rows, partition_indices, split_train_test
from rayfed.data.sources import label_names, load_source, own_test_mask, table_to_arrays, task_targets
from rayfed.errors import ConfigError

__all__ = ["FederatedDataset", "TaskSource", "check_samples"]


@dataclass
class TaskSource:
    """One task's samples before partitioning (see :meth:`FederatedDataset.from_tasks`).

    Attributes:
        info: the task (name, inputs, target kind, outputs).
        x: inputs of every sample: one array ``(n, *shape)`` or a mapping from modality to such arrays.
        y: targets of every sample (partitioned on when the task is classification).
        clients: the clients that hold this task (default: every client).
        groups: natural client id of every sample, for ``partition.name: by_column``.
    """

    info: TaskInfo
    x: Inputs
    y: np.ndarray
    clients: Optional[Sequence[int]] = None
    groups: Optional[np.ndarray] = None


def check_samples(x: Inputs, y: np.ndarray, target: str, where: str) -> None:
    """Refuse NaN or infinite inputs or targets and negative class labels, naming where and how many rows.

    Raises:
        ConfigError: with the place (a column or a task), the number of bad rows and the fix.
    """
    inputs = x.items() if isinstance(x, Mapping) else [("inputs", x)]
    for name, a in inputs:
        a = np.asarray(a)
        if a.dtype.kind in "fc":
            bad = int((~np.isfinite(a.reshape(len(a), -1))).any(axis=1).sum()) if len(a) else 0
            if bad:
                raise ConfigError(f"{where}: {bad} of {len(a)} rows have NaN or infinite {name}; fill or drop them "
                                  "before building the federation")
    y = np.asarray(y)
    if y.dtype.kind in "fc" and len(y):
        bad = int((~np.isfinite(y.reshape(len(y), -1))).any(axis=1).sum())
        if bad:
            raise ConfigError(f"{where}: {bad} of {len(y)} targets are NaN or infinite; fill or drop those rows")
    if target == "class" and len(y):
        bad = int((y < 0).sum())
        if bad:
            raise ConfigError(f"{where}: {bad} of {len(y)} labels are negative (e.g. {int(y[y < 0][0])}); class ids "
                              "must be 0, 1, 2, ...: fix or drop those rows")


def _group_names(groups) -> list[str]:
    values = np.unique(np.asarray(groups))
    return [str(v.item() if isinstance(v, np.generic) else v) for v in values]


def _take(x: Inputs, order: np.ndarray) -> Inputs:
    return {k: v[order] for k, v in x.items()} if isinstance(x, Mapping) else x[order]


def _slice(x: Inputs, a: int, b: int) -> Inputs:
    return {k: v[a:b] for k, v in x.items()} if isinstance(x, Mapping) else x[a:b]


class _TaskStore:
    """One task's samples, reordered so that each holder's train and test rows are contiguous."""

    def __init__(self, info: TaskInfo, x: Inputs, y: np.ndarray, clients: np.ndarray, num_train: np.ndarray,
                 num_test: np.ndarray) -> None:
        self.info, self.x, self.y = info, x, y
        self.clients = clients  # ascending client ids holding the task
        self.num_train, self.num_test = num_train, num_test
        self.start = np.concatenate([[0], np.cumsum(num_train + num_test)]).astype(np.int64)
        self.pos = {int(c): i for i, c in enumerate(clients)}

    @classmethod
    def from_splits(cls, info: TaskInfo, x: Inputs, y: np.ndarray, clients: Sequence[int],
                    splits: Sequence[tuple[np.ndarray, np.ndarray]], reordered: Optional[Inputs] = None,
                    ) -> _TaskStore:
        order = np.concatenate([np.concatenate([tr, te]) for tr, te in splits]).astype(np.int64)
        sizes = np.array([[len(tr), len(te)] for tr, te in splits], dtype=np.int64).reshape(-1, 2)
        xs = _take(x, order) if reordered is None else reordered
        return cls(info, xs, np.asarray(y)[order], np.asarray(clients, np.int64), sizes[:, 0], sizes[:, 1])

    def task_data(self, cid: int) -> TaskData:
        i = self.pos[cid]
        a, b, c = self.start[i], self.start[i] + self.num_train[i], self.start[i + 1]
        return TaskData(_slice(self.x, a, b), self.y[a:b], _slice(self.x, b, c), self.y[b:c])

    def subset(self, client_ids: set[int]) -> Optional[_TaskStore]:
        keep = [i for i, c in enumerate(self.clients) if int(c) in client_ids]
        if not keep:
            return None
        rows = np.concatenate([np.arange(self.start[i], self.start[i + 1]) for i in keep])
        return _TaskStore(self.info, _take(self.x, rows), self.y[rows], self.clients[keep],
                          self.num_train[keep], self.num_test[keep])


class FederatedDataset:
    """Every client's samples, per task, reordered so each client's train and test rows are contiguous.

    :meth:`client_data` returns views into those arrays (no copies); treat them as read-only.
    Building from the same config and seed gives identical shards in any process, and
    :meth:`subset` gives the shards of some clients only (what one client actor receives).

    Attributes:
        info: the tasks, and for the first task the number of classes, feature shape, modality and vocabulary.
        client_ids: the clients present (``0 .. num_clients-1`` unless this is a :meth:`subset`).
        num_clients: clients of the whole federation (also in a subset).
        label_names: class names of the first task when the source labels were strings, else ``None``.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, info: DatasetInfo,
                 splits: list[tuple[np.ndarray, np.ndarray]], label_names: Optional[list[str]] = None) -> None:
        """Single-task data from full arrays and per-client ``(train_indices, test_indices)`` into them."""
        y = np.asarray(y).astype(np.float32 if info.task == "regression" else np.int64)
        (task,) = info.task_infos()
        store = _TaskStore.from_splits(task, x, y, list(range(len(splits))), splits)
        self._init(info, {task.name: store}, len(splits), label_names)

    def _init(self, info: DatasetInfo, stores: dict[str, _TaskStore], num_clients: int,
              label_names: Optional[list[str]]) -> None:
        self.info = info
        self._stores = stores
        self.num_clients = int(num_clients)
        self.client_ids: list[int] = sorted({int(c) for s in stores.values() for c in s.clients})
        self._present = frozenset(self.client_ids)
        self.label_names = label_names
        #: the natural group (data.group_column value) of each client under partition by_column, else None
        self.client_groups: Optional[list[str]] = None

    @classmethod
    def from_config(cls, cfg: DataConfig, seed: int) -> FederatedDataset:
        """Load ``cfg.source``, partition it across ``cfg.num_clients`` and split each client.

        With ``data.tasks``, each task's targets come from its own label column of the same samples;
        the partition follows the first task's labels, so a client's samples are the same for every
        task it holds.

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
        if cfg.source == "archetypes":  # clients holding (modality, task) pairs of several sets
            from rayfed.data.archetypes import load_archetypes

            return load_archetypes(cfg, seed)
        table, info = load_source(cfg, seed)
        x, y, groups = table_to_arrays(table, info)
        if not cfg.tasks:
            return cls.from_arrays(x, y, info, num_clients=cfg.num_clients, partition=cfg.partition,
                                   test_fraction=cfg.test_fraction, seed=seed, groups=groups,
                                   label_names=label_names(table), test_rows=own_test_mask(table))
        sources = [TaskSource(t_info, x, t_y, clients)
                   for t_info, t_y, clients in task_targets(table, cfg, info)]
        sources[0].groups = groups
        return cls.from_tasks(sources, num_clients=cfg.num_clients, partition=cfg.partition,
                              test_fraction=cfg.test_fraction, seed=seed, label_names=label_names(table))

    @classmethod
    def from_arrays(cls, x: np.ndarray, y: np.ndarray, info: DatasetInfo, *, num_clients: int,
                    partition: PartitionConfig, test_fraction: float, seed: int,
                    groups: Optional[np.ndarray] = None, label_names: Optional[list[str]] = None,
                    test_rows: Optional[np.ndarray] = None) -> FederatedDataset:
        """Partition in-memory arrays (``x`` shaped ``(n, *info.feature_shape)``, ``y`` int labels).

        ``test_rows`` (a boolean mask) marks the data set's own test rows: the other rows are
        partitioned and the test rows dealt to the clients by
        :func:`~rayfed.data.partition.assign_test_rows`; without it every client holds out
        ``test_fraction`` of its own rows.

        Raises:
            ConfigError: NaN or infinite features or targets, or negative labels (counting the rows).
        """
        check_samples(x, y, "regression" if info.task == "regression" else "class", "the data's samples")
        if test_rows is None:
            parts = partition_indices(y, num_clients, partition, seed, groups)
            splits = [split_train_test(p, y, test_fraction, seed, cid) for cid, p in enumerate(parts)]
        else:
            train, test = np.flatnonzero(~test_rows), np.flatnonzero(test_rows)
            parts = [train[p] for p in partition_indices(y[train], num_clients, partition, seed,
                                                         None if groups is None else groups[train])]
            splits = list(zip(parts, assign_test_rows(parts, y, test, seed, groups)))
        ds = cls(x, y, info, splits, label_names)
        if partition.name == "by_column":  # client i holds the i-th group value in sorted order
            ds.client_groups = _group_names(groups)
        return ds

    @classmethod
    def from_tasks(cls, sources: Sequence[TaskSource], *, num_clients: int, partition: PartitionConfig,
                   test_fraction: float, seed: int, label_names: Optional[list[str]] = None) -> FederatedDataset:
        """Several tasks, each partitioned over the clients that hold it.

        A task whose inputs are the same object as an earlier task's (``x is``) and whose clients
        hold that task too reuses its partition: each client holds the same samples (and split)
        with another target; when the clients are the same, the reordered inputs are shared too (no
        copy). Otherwise the task is partitioned on its own over its clients (classification
        targets drive label-skewed partitioners).

        Example:
            >>> import numpy as np
            >>> from rayfed.config import PartitionConfig
            >>> x, y = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32), np.arange(40) % 4
            >>> digit = TaskInfo("digit", (("vector", (3,)),), "class", 4)
            >>> parity = TaskInfo("parity", (("vector", (3,)),), "class", 2)
            >>> ds = FederatedDataset.from_tasks([TaskSource(digit, x, y), TaskSource(parity, x, y % 2)],
            ...                                  num_clients=2, partition=PartitionConfig(name="iid"),
            ...                                  test_fraction=0.25, seed=0)
            >>> ds.client_data(1).task_names
            ['digit', 'parity']
        """
        names = [s.info.name for s in sources]
        if not sources or len(set(names)) != len(names):
            raise ValueError(f"from_tasks needs at least one task and unique task names, got {names}")
        stores: dict[str, _TaskStore] = {}
        done: list[tuple[TaskSource, list[int], list, _TaskStore]] = []
        for s in sources:
            clients = sorted(int(c) for c in (range(num_clients) if s.clients is None else s.clients))
            bad = [c for c in clients if not 0 <= c < num_clients]
            if bad or not clients:
                raise ValueError(f"task {s.info.name!r}: clients must be a non-empty subset of 0..{num_clients - 1}, "
                                 f"got {list(s.clients or [])}")
            y = np.asarray(s.y)
            check_samples(s.x, y, s.info.target, f"task {s.info.name!r}")
            same = next((d for d in done if d[0].x is s.x and set(clients) <= set(d[1])), None)
            if same is not None:  # the same samples: each client keeps its rows and split of that task
                pos = {c: i for i, c in enumerate(same[1])}
                splits = [same[2][pos[c]] for c in clients]
                reordered = same[3].x if clients == same[1] else None
            else:
                labels = y if s.info.target == "class" else np.zeros(len(y), np.int64)
                parts = partition_indices(labels, len(clients), partition, seed, s.groups)
                splits = [split_train_test(p, labels, test_fraction, seed, cid) for cid, p in zip(clients, parts)]
                reordered = None
            dtype = np.int64 if s.info.target in ("class", "tokens") else np.float32
            store = _TaskStore.from_splits(s.info, s.x, y.astype(dtype, copy=False), clients, splits, reordered)
            stores[s.info.name] = store
            done.append((s, clients, splits, store))
        ds = cls.__new__(cls)
        ds._init(DatasetInfo.for_tasks(tuple(s.info for s in sources)), stores, num_clients, label_names)
        if partition.name == "by_column":  # a task's k-th client holds its k-th group value (first task wins)
            groups = [""] * num_clients
            for s, clients, _, _ in reversed(done):
                if s.groups is not None:
                    for c, g in zip(clients, _group_names(s.groups)):
                        groups[c] = g
            ds.client_groups = groups if any(groups) else None
        return ds

    # -- access ----------------------------------------------------------------------------------
    def client_data(self, cid: int) -> ClientData:
        """Client ``cid``'s shard: per task, train and test arrays shaped ``(n, *shape)``."""
        self._check(cid)
        return ClientData(cid, tasks={name: s.task_data(cid) for name, s in self._stores.items() if cid in s.pos})

    def client_tasks(self, cid: int) -> list[str]:
        """Names of the tasks client ``cid`` holds."""
        self._check(cid)
        return [name for name, s in self._stores.items() if cid in s.pos]

    def num_train(self, cid: int) -> int:
        """Training samples of client ``cid`` (over its tasks)."""
        self._check(cid)
        return sum(int(s.num_train[s.pos[cid]]) for s in self._stores.values() if cid in s.pos)

    def num_test(self, cid: int) -> int:
        """Test samples of client ``cid`` (over its tasks)."""
        self._check(cid)
        return sum(int(s.num_test[s.pos[cid]]) for s in self._stores.values() if cid in s.pos)

    def client_sizes(self) -> dict[int, int]:
        """Training-set size of every client, over its tasks (the usual aggregation weights)."""
        return {cid: self.num_train(cid) for cid in self.client_ids}

    def subset(self, client_ids: Sequence[int]) -> FederatedDataset:
        """The shards of ``client_ids`` only (copies), e.g. what one client actor holds."""
        wanted = {int(c) for c in client_ids}
        for c in wanted:
            self._check(c)
        stores = {n: sub for n, s in self._stores.items() if (sub := s.subset(wanted)) is not None}
        ds = type(self).__new__(type(self))
        ds._init(self.info, stores, self.num_clients, self.label_names)
        ds.client_groups = self.client_groups
        return ds

    def nbytes(self) -> int:
        """Bytes of the arrays held (inputs and targets of every task)."""
        def size(x: Inputs) -> int:
            return int(sum(a.nbytes for a in x.values())) if isinstance(x, Mapping) else int(x.nbytes)

        return sum(size(s.x) + s.y.nbytes for s in self._stores.values())

    def _primary(self) -> _TaskStore:
        return next(iter(self._stores.values()))

    def label_counts(self) -> np.ndarray:
        """Train + test samples per client and class of the first task, shape ``(clients, classes)``
        (one column of sample counts for non-class targets); rows follow ``client_ids``.
        """
        s = self._primary()
        rows = {int(c): i for i, c in enumerate(self.client_ids)}
        owner = np.repeat([rows[int(c)] for c in s.clients], np.diff(s.start)).astype(np.int64)
        if s.info.target != "class":
            out = np.zeros((len(self.client_ids), 1), np.int64)
            np.add.at(out[:, 0], owner, 1)
            return out
        k = s.info.num_outputs
        n = len(self.client_ids)
        return np.bincount(owner * k + s.y, minlength=n * k).reshape(n, k)

    def summary(self) -> pa.Table:
        """One row per client: sizes, classes present, the three largest classes and the label counts
        (of the first task), and the tasks it holds.
        """
        counts = self.label_counts()
        top = []
        for row in counts:
            best = [c for c in np.argsort(-row, kind="stable")[:3] if row[c] > 0]
            top.append(", ".join(f"{c}:{row[c]}" for c in best))
        cols = {
            "client_id": pa.array(self.client_ids, pa.int64()),
            "num_train": pa.array([self.num_train(c) for c in self.client_ids], pa.int64()),
            "num_test": pa.array([self.num_test(c) for c in self.client_ids], pa.int64()),
            "num_classes_present": pa.array((counts > 0).sum(axis=1), pa.int64()),
            "top_classes": pa.array(top, pa.string()),
            "label_counts": pa.array(counts.tolist(), pa.list_(pa.int64())),
        }
        if len(self._stores) > 1:
            cols["tasks"] = pa.array([",".join(self.client_tasks(c)) for c in self.client_ids], pa.string())
        return pa.table(cols)

    def __repr__(self) -> str:
        sizes = [self.num_train(c) + self.num_test(c) for c in self.client_ids]
        tasks = f", tasks={list(self._stores)}" if self.info.tasks else ""
        return (f"FederatedDataset(clients={len(self.client_ids)}, samples={int(sum(sizes))}, "
                f"per_client={min(sizes)}..{max(sizes)}{tasks}, info={self.info})")

    def _check(self, cid: int) -> None:
        if cid in self._present:
            return
        if len(self.client_ids) == self.num_clients:
            raise KeyError(f"client id {cid!r} out of range; valid ids are 0..{self.num_clients - 1}")
        more = "..." if len(self.client_ids) > 10 else ""
        raise KeyError(f"client id {cid!r} is not in this subset of the dataset; its client ids are "
                       f"{self.client_ids[:10]}{more}")
