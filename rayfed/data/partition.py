"""Partitioners that split sample indices across clients, and each client's own train/test split.

All partitioners are seeded, complete (every sample goes to exactly one client) and give every client
at least ``min_samples``. Label-skewed ones first allocate a ``clients x classes`` count matrix from
Dirichlet (or shard) proportions and then repair short clients deterministically by moving samples
from clients with a surplus (no resample-until-it-works loops), so 1,000 clients stay fast.

Example:
    >>> import numpy as np
    >>> from rayfed.config import PartitionConfig
    >>> parts = partition_indices(np.arange(100) % 10, 4, PartitionConfig(name="iid"), seed=0)
    >>> [len(p) for p in parts]
    [25, 25, 25, 25]
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from rayfed.config import PartitionConfig
from rayfed.errors import ConfigError

__all__ = ["assign_test_rows", "partition_indices", "split_train_test"]


def partition_indices(labels: np.ndarray, num_clients: int, cfg: PartitionConfig, seed: int,
                      groups: Optional[np.ndarray] = None) -> list[np.ndarray]:
    """Split ``range(len(labels))`` into one sorted index array per client.

    Args:
        labels: class label of every sample (any sortable values).
        num_clients: number of clients.
        cfg: the partitioner (``name``, ``alpha``, ``classes_per_client``, ``min_samples``).
        seed: seeds ``np.random.default_rng``; the same seed gives the same split.
        groups: natural client id of every sample; required by ``by_column``.

    Returns:
        ``num_clients`` disjoint index arrays whose union is every sample.

    Raises:
        ConfigError: the request is infeasible (too many clients for the data, more classes per client
            than classes, a group count that differs from ``num_clients``, ...).
    """
    labels = np.asarray(labels)
    n, m = len(labels), cfg.min_samples
    if cfg.name == "by_column":
        return _by_column(groups, num_clients, m)
    if num_clients * m > n:
        raise ConfigError(
            f"config key 'data.num_clients': {num_clients} clients x data.partition.min_samples={m} needs "
            f"{num_clients * m} samples but the dataset has {n}; lower data.num_clients to at most {n // m} "
            f"or data.partition.min_samples to at most {max(n // num_clients, 1)}")
    rng = np.random.default_rng(seed % 2**63)  # negative seeds too
    if cfg.name == "iid":
        return _from_owner(_owner_from_sizes(_even(n, num_clients), rng), num_clients)
    if cfg.name == "quantity_skew":
        sizes = m + _round_alloc(n - num_clients * m, _dirichlet(rng, cfg.alpha, num_clients))
        return _from_owner(_owner_from_sizes(sizes, rng), num_clients)
    _, y = np.unique(labels, return_inverse=True)
    class_counts = np.bincount(y)
    if cfg.name == "dirichlet":
        props = np.stack([_dirichlet(rng, cfg.alpha, num_clients) for _ in class_counts], axis=1)
        counts = np.stack([_round_alloc(int(c), props[:, k]) for k, c in enumerate(class_counts)], axis=1)
        _repair(counts, m, props, None)
    elif cfg.name == "pathological":
        counts, held = _pathological(class_counts, num_clients, cfg.classes_per_client, n, rng)
        _repair(counts, m, held.astype(float), held)
    else:  # pragma: no cover - PartitionConfig rejects other names
        raise ConfigError(f"config key 'data.partition.name': unknown partitioner {cfg.name!r}")
    return _from_owner(_owner_from_counts(counts, y, class_counts, rng), num_clients)


def assign_test_rows(parts: list[np.ndarray], labels: np.ndarray, test_rows: np.ndarray, seed: int,
                     groups: Optional[np.ndarray] = None) -> list[np.ndarray]:
    """Deal a data set's own test rows out to the clients that trained on ``parts``.

    With ``groups`` (partition ``by_column``), a client gets the test rows of its own group. Otherwise
    each class's test rows (shuffled, seeded) go to the clients in proportion to how many training
    samples of that class each holds (largest remainder), so every client is tested on its own label
    distribution; rows of a class no client trains on are left out.

    Args:
        parts: each client's training indices (into ``labels``).
        labels: labels of every row, train and test.
        test_rows: indices of the test rows.
        seed: run seed.
        groups: the natural client id of every row, for ``by_column``.

    Returns:
        One sorted index array per client.

    Raises:
        ConfigError: a client would get no test row.
    """
    test_rows = np.asarray(test_rows)
    out: list[list[np.ndarray]] = [[] for _ in parts]
    if groups is not None:
        groups = np.asarray(groups)
        owner = {groups[p[0]]: c for c, p in enumerate(parts) if len(p)}  # by_column: one group per client
        for value in np.unique(groups[test_rows]):
            c = owner.get(value)
            if c is not None:
                out[c].append(test_rows[groups[test_rows] == value])
    else:
        values, y = np.unique(np.asarray(labels), return_inverse=True)
        counts = np.stack([np.bincount(y[p], minlength=len(values)) for p in parts])  # clients x classes
        rng = np.random.default_rng([seed % 2**63, 0x7E57, 0x5E7])
        for k in np.unique(y[test_rows]):
            if counts[:, k].sum() == 0:
                continue
            rows = test_rows[y[test_rows] == k]
            rows = rows[rng.permutation(len(rows))]
            cut = np.cumsum(_round_alloc(len(rows), counts[:, k] / counts[:, k].sum()))[:-1]
            for c, piece in enumerate(np.split(rows, cut)):
                if len(piece):
                    out[c].append(piece)
    result = [np.sort(np.concatenate(o)) if o else np.zeros(0, np.int64) for o in out]
    empty = [c for c, r in enumerate(result) if not len(r)]
    if empty:
        raise ConfigError(f"config key 'data.test_split': client(s) {empty[:10]} get no row of the data set's own "
                          f"test split ({len(test_rows)} rows for {len(parts)} clients); set data.test_split=null "
                          "to split each client's own rows by data.test_fraction, or use fewer clients")
    return result


def split_train_test(indices: np.ndarray, labels: np.ndarray, test_fraction: float,
                     seed: int, client_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of one client's samples, following that client's own label distribution.

    Each class the client holds puts ``round(test_fraction * count)`` samples in test, keeping at least
    one in train when it has two or more; the client always ends with at least one train and one
    test sample. The split of one client does not depend on the other clients.

    Args:
        indices: the client's sample indices (at least 2).
        labels: labels of the whole dataset (indexed by ``indices``).
        test_fraction: fraction in (0, 1) held out.
        seed: run seed; combined with ``client_id`` for the client's own generator.
        client_id: the client.

    Returns:
        ``(train_indices, test_indices)``, each sorted.
    """
    indices = np.asarray(indices)
    if len(indices) < 2:
        raise ConfigError(f"client {client_id} has {len(indices)} sample(s); it needs at least 2 for a train "
                          "and a test split (raise data.partition.min_samples or lower data.num_clients)")
    rng = np.random.default_rng([seed % 2**63, 0x7E57, client_id])
    idx = indices[rng.permutation(len(indices))]
    idx = idx[np.argsort(labels[idx], kind="stable")]
    _, start, cnt = np.unique(labels[idx], return_index=True, return_counts=True)
    t = np.floor(test_fraction * cnt + 0.5).astype(np.int64)
    t = np.where(cnt >= 2, np.minimum(t, cnt - 1), t)
    if t.sum() == 0:
        t[np.argmax(cnt)] = 1
    if t.sum() == len(idx):
        t[np.argmax(t)] -= 1
    test = (np.arange(len(idx)) - np.repeat(start, cnt)) < np.repeat(t, cnt)
    return np.sort(idx[~test]), np.sort(idx[test])


# ---------------------------------------------------------------------------------------------


def _even(n: int, k: int) -> np.ndarray:
    return n // k + (np.arange(k) < n % k).astype(np.int64)


def _dirichlet(rng: np.random.Generator, alpha: float, k: int) -> np.ndarray:
    p = np.nan_to_num(rng.dirichlet(np.full(k, alpha)))
    if p.sum() <= 0:  # extreme alpha can underflow every component
        p = np.zeros(k)
        p[rng.integers(k)] = 1.0
    return p / p.sum()


def _round_alloc(total: int, props: np.ndarray) -> np.ndarray:
    """Integers proportional to ``props`` summing exactly to ``total`` (largest remainder)."""
    raw = props * total
    out = np.floor(raw).astype(np.int64)
    rest = total - int(out.sum())
    if rest > 0:
        out[np.argsort(-(raw - out), kind="stable")[:rest]] += 1
    return out


def _repair(counts: np.ndarray, m: int, pref: np.ndarray, allowed: Optional[np.ndarray]) -> None:
    """Top up clients below ``m`` in place, from their preferred classes, taking from the largest donors.

    Each step moves as many samples as one donor can spare in one class, so the work is bounded by
    ``clients x classes`` steps; feasible whenever ``clients * m <= samples`` and no ``allowed`` mask.
    """
    rows = counts.sum(axis=1)
    for i in np.flatnonzero(rows < m):
        need = m - rows[i]
        for k in np.argsort(-pref[i], kind="stable"):
            if allowed is not None and not allowed[i, k]:
                continue
            while need > 0:
                spare = np.minimum(counts[:, k], np.maximum(rows - m, 0))
                spare[i] = 0
                j = int(np.argmax(spare))
                if spare[j] == 0:
                    break
                q = min(need, int(spare[j]))
                counts[j, k] -= q
                counts[i, k] += q
                rows[j] -= q
                rows[i] += q
                need -= q
            if need == 0:
                break
        if need > 0:
            raise ConfigError(
                f"config key 'data.partition.min_samples': client {i} cannot reach {m} samples from its "
                f"{int(allowed[i].sum()) if allowed is not None else counts.shape[1]} classes; lower "
                "data.partition.min_samples or data.num_clients, or raise data.partition.classes_per_client")


def _pathological(class_counts: np.ndarray, n_clients: int, k: int, n: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n_classes = len(class_counts)
    if k > n_classes:
        raise ConfigError(f"config key 'data.partition.classes_per_client': {k} but the data has only "
                          f"{n_classes} classes; set it to at most {n_classes}")
    if n_clients * k < n_classes:
        raise ConfigError(f"config key 'data.partition.classes_per_client': {n_clients} clients x {k} classes "
                          f"cover only {n_clients * k} of the {n_classes} classes, but every sample needs a client; "
                          f"raise it to {-(-n_classes // n_clients)} or data.num_clients to {-(-n_classes // k)}")
    if n_clients * k > n:
        raise ConfigError(f"config key 'data.partition.classes_per_client': {n_clients} clients x {k} classes "
                          f"needs {n_clients * k} class shards but there are only {n} samples; lower "
                          "data.partition.classes_per_client or data.num_clients")
    # holders per class proportional to its size (so shards are even), 1 <= holders <= min(clients, size)
    cap = np.minimum(class_counts, n_clients)
    holders = np.clip(_round_alloc(n_clients * k, class_counts / n), 1, cap)
    target = min(n_clients * k, int(cap.sum()))
    while holders.sum() < target:
        holders[np.argmax(np.where(holders < cap, class_counts / (holders + 1), -1.0))] += 1
    while holders.sum() > target:
        holders[np.argmin(np.where(holders > 1, class_counts / np.maximum(holders - 1, 1), np.inf))] -= 1
    # deal the class copies round-robin over shuffled clients: each client gets k slots, and the
    # copies of one class are consecutive and at most n_clients, so they land on distinct clients
    class_order, client_order = rng.permutation(n_classes), rng.permutation(n_clients)
    slot_class = np.repeat(class_order, holders[class_order])
    slot_client = client_order[np.arange(len(slot_class)) % n_clients]
    held = np.zeros((n_clients, n_classes), dtype=bool)
    held[slot_client, slot_class] = True
    counts = np.zeros((n_clients, n_classes), dtype=np.int64)
    for c in range(n_classes):
        who = slot_client[slot_class == c]
        counts[who, c] = _even(int(class_counts[c]), len(who))
    return counts, held


def _owner_from_sizes(sizes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    owner = np.empty(int(sizes.sum()), dtype=np.int64)
    owner[rng.permutation(len(owner))] = np.repeat(np.arange(len(sizes)), sizes)
    return owner


def _owner_from_counts(counts: np.ndarray, y: np.ndarray, class_counts: np.ndarray,
                       rng: np.random.Generator) -> np.ndarray:
    owner = np.empty(len(y), dtype=np.int64)
    by_class = np.split(np.argsort(y, kind="stable"), np.cumsum(class_counts)[:-1])
    for c, members in enumerate(by_class):
        owner[rng.permutation(members)] = np.repeat(np.arange(counts.shape[0]), counts[:, c])
    return owner


def _from_owner(owner: np.ndarray, n_clients: int) -> list[np.ndarray]:
    order = np.argsort(owner, kind="stable")  # stable: indices stay sorted within a client
    return np.split(order, np.cumsum(np.bincount(owner, minlength=n_clients))[:-1])


def _by_column(groups: Optional[np.ndarray], n_clients: int, m: int) -> list[np.ndarray]:
    if groups is None:
        raise ConfigError("config key 'data.group_column': partition 'by_column' needs group values, got none; "
                          "set data.group_column to a column of the data")
    values, owner = np.unique(np.asarray(groups), return_inverse=True)
    if len(values) != n_clients:
        raise ConfigError(f"config key 'data.num_clients': partition 'by_column' found {len(values)} distinct "
                          f"groups but data.num_clients={n_clients}; set data.num_clients to {len(values)}")
    sizes = np.bincount(owner, minlength=n_clients)
    if sizes.min() < m:
        g = int(np.argmin(sizes))
        name = values[g].item() if isinstance(values[g], np.generic) else values[g]
        raise ConfigError(f"config key 'data.partition.min_samples': group {name!r} has only {sizes[g]} "
                          f"samples, below min_samples={m}; lower data.partition.min_samples or drop small groups")
    return _from_owner(owner.astype(np.int64), n_clients)
