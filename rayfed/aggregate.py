"""Aggregation maths: pure functions over numpy arrays, no Ray and no torch.

The server holds weights as ``dict[str, np.ndarray]``. Every rule here is a plain function (or, for
the streaming mean, a small accumulator) with an exact-value test, so algorithms and the server
actor can compose them without owning any maths themselves.

* Means: :func:`weighted_mean`, the streaming per-key holder mean :class:`StreamingMean` (clients
  that hold only some tensors, e.g. tiered roles, are averaged only where they hold a key, and
  sparse uploads, :class:`rayfed.tensors.SparseTensor`, only at the coordinates they hold) and its
  batch form :func:`holder_mean`, and the FedSpa sparse-aware mean over dense values and masks
  :func:`sparse_mean`.
* Byzantine-robust rules over a stack ``X`` of flattened client vectors, shape ``(n, d)``:
  :func:`coordinate_median`, :func:`trimmed_mean`, :func:`krum` (Blanchard et al. 2017),
  :func:`centered_clipping` and :func:`bucketing` (Karimireddy, He, Jaggi 2021; 2022), with
  :func:`flatten`/:func:`unflatten` and the dict-level entry point :func:`robust_aggregate`.

All sums are accumulated in float64; results are cast back to the inputs' floating dtype.

Example:
    >>> a = {"w": np.array([1.0, 2.0], np.float32)}
    >>> b = {"w": np.array([3.0, 6.0], np.float32), "head": np.array([5.0], np.float32)}
    >>> holder_mean([a, b], weights=[1, 3])
    {'w': array([2.5, 5. ], dtype=float32), 'head': array([5.], dtype=float32)}
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from rayfed.tensors import SparseTensor

__all__ = [
    "PackedTensors",
    "ROBUST_RULES",
    "StreamingMean",
    "bucketing",
    "centered_clipping",
    "coordinate_median",
    "flatten",
    "holder_mean",
    "krum",
    "robust_aggregate",
    "sparse_mean",
    "trimmed_mean",
    "unflatten",
    "weighted_mean",
]

ROBUST_RULES: tuple[str, ...] = (
    "mean",
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "centered_clipping",
)
"""Rule names accepted by :func:`robust_aggregate`."""


# --------------------------------------------------------------------------------------------------
# helpers


def _out_dtype(*dtypes: np.dtype) -> np.dtype:
    """The inputs' common floating dtype; float64 when the inputs are integer or boolean."""
    dtype = np.result_type(*dtypes)
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def _check_weights(weights: Sequence[float] | None, n: int, what: str) -> list[float]:
    """Validate per-item weights: ``n`` finite, non-negative values with a positive sum."""
    if weights is None:
        return [1.0] * n
    values = [float(w) for w in weights]
    if len(values) != n:
        raise ValueError(f"got {len(values)} weights for {n} {what}; pass one weight per item")
    if any(not math.isfinite(w) or w < 0 for w in values) or not sum(values) > 0:
        raise ValueError(
            f"weights must be finite and non-negative with a positive total, got {values} "
            f"(total {sum(values)}); pass e.g. sample counts, or weights=None for equal weights"
        )
    return values


def _check_weight(weight: float) -> float:
    w = float(weight)
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"weight must be finite and non-negative, got {weight!r}")
    return w


def _as_matrix(X: np.ndarray) -> np.ndarray:
    """``X`` as a float64 ``(n, d)`` matrix with ``n >= 1``."""
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] < 1:
        raise ValueError(
            f"expected a stack of client vectors of shape (n_clients, d) with n_clients >= 1, "
            f"got shape {X.shape}; use flatten() to turn each client's dict into one row"
        )
    return X.astype(np.float64, copy=False)


def _cast_back(result: np.ndarray, X: np.ndarray) -> np.ndarray:
    return result.astype(_out_dtype(np.asarray(X).dtype), copy=False)


# --------------------------------------------------------------------------------------------------
# means


def weighted_mean(
    arrays: Sequence[np.ndarray], weights: Sequence[float] | None = None
) -> np.ndarray:
    """Weighted mean of equally shaped arrays.

    ``mean = sum_i w_i * a_i / sum_i w_i``, accumulated in float64 in the order given and cast back
    to the inputs' floating dtype (float64 for integer inputs).

    Args:
        arrays: one array per client, all of the same shape.
        weights: one finite, non-negative weight per array with a positive total (e.g. sample
            counts); ``None`` for equal weights.

    Returns:
        The weighted mean, shaped like each input.

    Raises:
        ValueError: no arrays, mismatched shapes, or invalid weights (the message names them).

    Example:
        >>> weighted_mean([np.array([1.0, 2.0]), np.array([3.0, 6.0])], [1, 3])
        array([2.5, 5. ])
    """
    if len(arrays) == 0:
        raise ValueError("weighted_mean needs at least one array, got none")
    arrs = [np.asarray(a) for a in arrays]
    w = _check_weights(weights, len(arrs), "arrays")
    shape = arrs[0].shape
    for i, a in enumerate(arrs):
        if a.shape != shape:
            raise ValueError(f"array {i} has shape {a.shape}, but array 0 has shape {shape}")
    acc = np.zeros(shape, dtype=np.float64)
    for wi, a in zip(w, arrs, strict=True):
        acc += wi * a.astype(np.float64, copy=False)
    return (acc / sum(w)).astype(_out_dtype(*(a.dtype for a in arrs)), copy=False)


class PackedTensors(Mapping):
    """Named arrays stored back to back in one flat buffer: a read-only mapping of views into it.

    A client's upload arrives this way from a Ray client actor (one buffer per round and actor, not
    one per tensor). :class:`StreamingMean` adds a packed update with one vector operation instead
    of one per tensor when its layout matches the updates before it.

    Args:
        flat: 1-D array holding every tensor, in layout order.
        layout: ``(name, offset, shape)`` per tensor, offsets in elements of ``flat``.

    Example:
        >>> p = PackedTensors(np.arange(5.0), (("w", 0, (2, 2)), ("b", 4, (1,))))
        >>> p["b"], list(p)
        (array([4.]), ['w', 'b'])
    """

    __slots__ = ("flat", "layout", "_views")

    def __init__(self, flat: np.ndarray, layout: tuple[tuple[str, int, tuple[int, ...]], ...]) -> None:
        self.flat = flat
        self.layout = layout
        self._views: dict[str, np.ndarray] | None = None

    def _map(self) -> dict[str, np.ndarray]:
        if self._views is None:
            self._views = {k: self.flat[o:o + math.prod(shape)].reshape(shape) for k, o, shape in self.layout}
        return self._views

    def __getitem__(self, key: str) -> np.ndarray:
        return self._map()[key]

    def __iter__(self):
        return (k for k, _, _ in self.layout)

    def __len__(self) -> int:
        return len(self.layout)

    def __contains__(self, key: object) -> bool:
        return key in self._map()

    @property
    def nbytes(self) -> int:
        """Bytes of all the tensors (the buffer holds nothing else)."""
        return int(self.flat.nbytes)


class StreamingMean:
    """Streaming weighted per-key, per-coordinate holder mean over dict updates, in O(model) memory.

    An update holds a key when it contains it; a dense value holds every coordinate of the key, a
    :class:`~rayfed.tensors.SparseTensor` holds only its positions (FedSpa masks, per-client slices).
    For every key ``k`` and coordinate ``j``,
    ``result()[k][j] = sum_{i holds k, j} w_i * u_i[k][j] / sum_{i holds k, j} w_i``, so clients
    that hold only some tensors (tiered roles, mismatched architectures) or only some coordinates
    (sparse uploads) aggregate without dilution by zeros. Coordinates that no update of positive
    weight holds take ``fallback[k][j]`` (see :meth:`result`).

    Sums are float64 and accumulated in the order of :meth:`add` calls, so results are deterministic
    given that order; each key is cast back to the dtype it had when first seen (integer and boolean
    keys rounded to nearest). A key that has only ever received dense values keeps one scalar weight
    (and packed updates of one layout keep one flat sum); only a key that receives a sparse value
    gets a per-coordinate weight array.

    Attributes:
        count: number of updates added.
        total_weight: sum of the weights of all updates added.

    Example:
        >>> from rayfed.tensors import SparseTensor
        >>> agg = StreamingMean()
        >>> agg.add({"w": np.array([1.0, 1.0, 1.0]), "b": np.array([4.0])}, weight=1)
        >>> agg.add({"w": SparseTensor.from_positions((3,), [1], [5.0])}, weight=3)
        >>> agg.result()
        {'w': array([1., 4., 1.]), 'b': array([4.])}
        >>> agg.coverage("w")
        array([1., 4., 1.])
    """

    def __init__(self) -> None:
        """Start empty."""
        self.count: int = 0
        self.total_weight: float = 0.0
        self._sums: dict[str, np.ndarray] = {}
        # holder weight per key while it has only had dense values, per coordinate once it had a sparse one
        self._weights: dict[str, float] = {}
        self._coverage: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        # while every update is a PackedTensors of one layout and dtype: one flat float64 sum
        self._flat: tuple[np.ndarray, tuple, np.dtype, float] | None = None

    def _add_flat(self, tensors: PackedTensors, w: float) -> bool:
        """Add a packed update as one vector (the same float64 operations, element by element, as
        the per-key path); False when it cannot (another layout, or per-key sums exist).
        """
        if self._sums:
            return False
        if self._flat is None:
            if self.count:
                return False
            self._flat = (np.zeros(tensors.flat.shape, np.float64), tensors.layout, tensors.flat.dtype, 0.0)
        acc, layout, dtype, total = self._flat
        if tensors.layout != layout or tensors.flat.dtype != dtype:
            return False
        acc += w * tensors.flat.astype(np.float64, copy=False)
        self._flat = (acc, layout, dtype, total + w)
        return True

    def _unflatten(self) -> None:
        """Move the flat sum into per-key sums (before an update the flat path cannot take)."""
        if self._flat is None:
            return
        acc, layout, dtype, total = self._flat
        self._flat = None
        for k, o, shape in layout:
            self._sums[k] = acc[o:o + math.prod(shape)].reshape(shape)
            self._weights[k] = total
            self._dtypes[k] = dtype

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every key seen so far, whether held per key or in the flat sum."""
        if self._flat is not None:
            return {k: tuple(shape) for k, _, shape in self._flat[1]}
        return {k: s.shape for k, s in self._sums.items()}

    def add(self, tensors: Mapping[str, np.ndarray | SparseTensor], weight: float = 1.0) -> None:
        """Add one update with the given weight.

        Args:
            tensors: the client's tensors by name; may hold any subset of the keys, each dense (a
                numpy array, holding every coordinate) or a :class:`~rayfed.tensors.SparseTensor`
                (holding its positions).
            weight: finite, non-negative weight (e.g. the client's sample count).

        Raises:
            ValueError: invalid weight, a key whose shape differs from the one first seen (the
                message names the key and both shapes), a non-numeric dtype, or a sparse value whose
                values do not match its positions. Nothing is added when it raises.
        """
        w = _check_weight(weight)
        if isinstance(tensors, PackedTensors) and self._add_flat(tensors, w):
            self.count += 1
            self.total_weight += w
            return
        shapes = self._shapes()
        # validate everything before mutating any state
        entries: list[tuple[str, tuple[int, ...], np.ndarray, np.ndarray | None]] = []  # + flat selector
        for k, v in tensors.items():
            if isinstance(v, SparseTensor):
                shape, values = v.shape, v.values
                # the int positions themselves, or the bitmap as a flat boolean mask: no int64 copy
                select = v.index if v.encoding == "indices" else v.mask().reshape(-1)
                held = select.size if v.encoding == "indices" else int(np.count_nonzero(select))
                if values.shape != (held,):
                    raise ValueError(
                        f"sparse tensor {k!r} holds {held} positions but has values of shape {values.shape}"
                    )
            else:
                values = np.asarray(v)
                shape, select = values.shape, None
            if values.dtype.kind not in "biuf":
                raise ValueError(
                    f"tensor {k!r} has dtype {values.dtype}; StreamingMean averages boolean, integer and "
                    f"floating tensors only"
                )
            if k in shapes and shapes[k] != shape:
                raise ValueError(
                    f"tensor {k!r} has shape {shape} in this update but shape {shapes[k]} in earlier updates"
                )
            entries.append((k, shape, values, select))
        self._unflatten()
        for k, shape, values, select in entries:
            if k not in self._sums:
                self._sums[k] = np.zeros(shape, dtype=np.float64)
                self._dtypes[k] = values.dtype
                if select is None:
                    self._weights[k] = 0.0
                else:
                    self._coverage[k] = np.zeros(shape, dtype=np.float64)
            elif select is not None and k in self._weights:  # a dense-only key's first sparse value
                self._coverage[k] = np.full(self._sums[k].shape, self._weights.pop(k), dtype=np.float64)
            weighted = w * values.astype(np.float64, copy=False)
            if select is None:
                self._sums[k] += weighted
                if k in self._weights:
                    self._weights[k] += w
                else:
                    self._coverage[k] += w
            else:
                # positions are unique, so fancy-index += adds each value exactly once; every sum is
                # C-contiguous (np.zeros or a slice of the flat sum), so reshape(-1) is a view
                self._sums[k].reshape(-1)[select] += weighted
                self._coverage[k].reshape(-1)[select] += w
        self.count += 1
        self.total_weight += w

    def coverage(self, key: str) -> np.ndarray:
        """Holder weight per coordinate of ``key``: the sum of the weights of the updates holding it.

        Args:
            key: a key seen by :meth:`add`.

        Returns:
            A new float64 array shaped like the key's tensor (constant for a key that has only had
            dense values).

        Raises:
            KeyError: ``key`` was never added (the message lists the keys seen).
        """
        if self._flat is not None:
            for k, _, shape in self._flat[1]:
                if k == key:
                    return np.full(shape, self._flat[3], dtype=np.float64)
        elif key in self._coverage:
            return self._coverage[key].copy()
        elif key in self._weights:
            return np.full(self._sums[key].shape, self._weights[key], dtype=np.float64)
        raise KeyError(f"no update held tensor {key!r}; keys seen: {list(self._shapes())}")

    def result(self, fallback: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The per-key, per-coordinate holder mean of the updates added so far.

        Args:
            fallback: values for the coordinates that no update of positive weight holds, by key and
                shaped like the key's tensor (e.g. the previous global weights); cast to the key's
                dtype. Keys it lacks must be fully covered.

        Returns:
            One array per key seen at least once, in order of first appearance.

        Raises:
            ValueError: a key's holders all had weight 0, or some of a key's coordinates are held by
                no update of positive weight, and ``fallback`` has no entry for it (the messages name
                the keys and count the coordinates); or a fallback of the wrong shape.
        """
        self._unflatten()
        fallback = {} if fallback is None else fallback
        for k, s in self._sums.items():
            if k in fallback and np.shape(fallback[k]) != s.shape:
                raise ValueError(
                    f"fallback for {k!r} has shape {np.shape(fallback[k])} but the tensor has shape {s.shape}"
                )
        empty = [k for k, w in self._weights.items() if not w > 0 and k not in fallback]
        if empty:
            raise ValueError(
                f"keys {empty} were only held by updates of weight 0, so their mean is undefined; pass "
                f"result(fallback=...) with their previous values"
            )
        uncovered = {}
        for k, cov in self._coverage.items():
            n = int(cov.size - np.count_nonzero(cov > 0))
            if n and k not in fallback:
                uncovered[k] = n
        if uncovered:
            detail = ", ".join(f"{k!r}: {n} of {self._sums[k].size}" for k, n in uncovered.items())
            raise ValueError(
                f"some coordinates are held by no update of positive weight ({detail}), so their mean is "
                f"undefined; pass result(fallback={{key: previous values}}) for keys {list(uncovered)}"
            )
        out: dict[str, np.ndarray] = {}
        for k, s in self._sums.items():
            dtype = self._dtypes[k]
            covered: np.ndarray | None = None
            if k in self._weights:
                if not self._weights[k] > 0:
                    out[k] = np.asarray(fallback[k]).astype(dtype, copy=True)
                    continue
                mean = s / self._weights[k]
            else:
                covered = self._coverage[k] > 0
                mean = np.divide(s, self._coverage[k], out=np.zeros_like(s), where=covered)
            if not np.issubdtype(dtype, np.floating):
                mean = np.rint(mean)
            out[k] = mean.astype(dtype, copy=False)
            if covered is not None and not covered.all():
                out[k] = np.where(covered, out[k], np.asarray(fallback[k]).astype(dtype))
        return out


def holder_mean(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float] | None = None
) -> dict[str, np.ndarray]:
    """Per-key holder mean of dict updates; the batch form of :class:`StreamingMean`.

    ``result[k] = sum_{i holds k} w_i * u_i[k] / sum_{i holds k} w_i``.

    Args:
        updates: one mapping of tensors per client; each may hold any subset of the keys.
        weights: one weight per update; ``None`` for equal weights.

    Returns:
        One array per key held by at least one update.

    Raises:
        ValueError: no updates, invalid weights, or mismatched shapes.

    Example:
        >>> holder_mean([{"w": np.array([1.0])}, {"w": np.array([2.0]), "b": np.array([0.0])}])
        {'w': array([1.5]), 'b': array([0.])}
    """
    if len(updates) == 0:
        raise ValueError("holder_mean needs at least one update, got none")
    w = _check_weights(weights, len(updates), "updates")
    agg = StreamingMean()
    for update, wi in zip(updates, w, strict=True):
        agg.add(update, wi)
    return agg.result()


def sparse_mean(
    values: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    weights: Sequence[float] | None = None,
    fallback: np.ndarray | None = None,
) -> np.ndarray:
    """FedSpa sparse-aware mean: each coordinate is averaged over the clients whose mask holds it.

    ``out[j] = sum_i w_i m_i[j] v_i[j] / sum_i w_i m_i[j]`` where the denominator is positive, and
    ``fallback[j]`` (0 when ``fallback`` is None) where no client holds coordinate ``j``. Values
    off a client's mask are ignored, whatever they are.

    Args:
        values: one array per client, all of the same shape.
        masks: one boolean array per client, shaped like its values.
        weights: one weight per client; ``None`` for equal weights.
        fallback: value for uncovered coordinates (e.g. the previous global weights); broadcast
            to the values' shape.

    Returns:
        The sparse-aware mean, in the values' floating dtype.

    Raises:
        ValueError: no clients, mismatched counts or shapes, or invalid weights.

    Example:
        >>> v = [np.array([1.0, 2.0, 9.0]), np.array([3.0, 4.0, 9.0])]
        >>> m = [np.array([True, True, False]), np.array([False, True, False])]
        >>> sparse_mean(v, m, fallback=np.array([0.0, 0.0, 7.0]))
        array([1., 3., 7.])
    """
    if len(values) == 0:
        raise ValueError("sparse_mean needs at least one client, got none")
    if len(masks) != len(values):
        raise ValueError(f"got {len(masks)} masks for {len(values)} value arrays; pass one each")
    vals = [np.asarray(v) for v in values]
    w = _check_weights(weights, len(vals), "clients")
    shape = vals[0].shape
    num = np.zeros(shape, dtype=np.float64)
    den = np.zeros(shape, dtype=np.float64)
    for i, (v, m, wi) in enumerate(zip(vals, masks, w, strict=True)):
        m = np.asarray(m)
        if v.shape != shape or m.shape != shape:
            raise ValueError(
                f"client {i} has values of shape {v.shape} and mask of shape {m.shape}; "
                f"expected both {shape} (client 0's values)"
            )
        held = m.astype(bool)
        num += np.where(held, wi * v.astype(np.float64, copy=False), 0.0)
        den += np.where(held, wi, 0.0)
    fb = np.zeros(shape) if fallback is None else np.asarray(fallback, dtype=np.float64)
    fb = np.broadcast_to(fb, shape)
    covered = den > 0
    out = np.where(covered, num / np.where(covered, den, 1.0), fb)
    return out.astype(_out_dtype(*(v.dtype for v in vals)), copy=False)


# --------------------------------------------------------------------------------------------------
# robust rules over (n_clients, d) stacks


def coordinate_median(X: np.ndarray) -> np.ndarray:
    """Coordinate-wise median of the rows of ``X``.

    ``out[j] = median_i X[i, j]``; for even ``n`` the mean of the two middle values, as
    :func:`numpy.median` does.

    Args:
        X: client vectors, shape ``(n, d)``.

    Returns:
        The ``(d,)`` median vector.

    Example:
        >>> coordinate_median(np.array([[1.0, 5.0], [2.0, 0.0], [1000.0, 1.0]]))
        array([2., 1.])
    """
    M = _as_matrix(X)
    return _cast_back(np.median(M, axis=0), X)


def trimmed_mean(X: np.ndarray, trim: float) -> np.ndarray:
    """Coordinate-wise trimmed mean: drop the ``b`` largest and ``b`` smallest values per entry.

    ``out[j] = mean(sorted(X[:, j])[b : n - b])``, with ``b = trim`` for an int and
    ``b = floor(trim * n)`` for a float fraction in ``[0, 0.5)``.

    Args:
        X: client vectors, shape ``(n, d)``.
        trim: number of values (int) or fraction of ``n`` (float) to drop at each end.

    Returns:
        The ``(d,)`` trimmed mean.

    Raises:
        ValueError: a negative trim, a fraction outside ``[0, 0.5)``, or ``2b >= n``.
        TypeError: ``trim`` is neither an int nor a float.

    Example:
        >>> trimmed_mean(np.array([[1.0], [2.0], [3.0], [1000.0]]), trim=1)
        array([2.5])
    """
    M = _as_matrix(X)
    n = M.shape[0]
    if isinstance(trim, bool) or not isinstance(trim, (int, float, np.integer, np.floating)):
        raise TypeError(f"trim must be an int count or a float fraction, got {trim!r}")
    if isinstance(trim, (float, np.floating)):
        if not 0.0 <= trim < 0.5:
            raise ValueError(f"a float trim is a fraction of n and must be in [0, 0.5), got {trim}")
        b = math.floor(trim * n)
    else:
        b = int(trim)
        if b < 0:
            raise ValueError(f"trim must be >= 0, got {trim}")
    if 2 * b >= n:
        raise ValueError(
            f"trimmed_mean drops 2b values per coordinate and needs n > 2b, got n={n}, b={b}; "
            f"use a smaller trim or more clients"
        )
    kept = np.sort(M, axis=0)[b : n - b]
    return _cast_back(kept.mean(axis=0), X)


def _krum_scores(M: np.ndarray, num_byzantine: int) -> np.ndarray:
    n = M.shape[0]
    k = n - num_byzantine - 2
    if num_byzantine < 0 or k < 1:
        raise ValueError(
            f"Krum needs num_byzantine >= 0 and n - f - 2 >= 1 neighbours, got n={n}, "
            f"f={num_byzantine}; use fewer assumed Byzantine clients or more clients"
        )
    # One row of squared distances at a time: O(n * d) memory rather than O(n^2 * d).
    dist = np.empty((n, n), dtype=np.float64)
    for i in range(n):
        diff = M - M[i]
        dist[i] = np.einsum("ij,ij->i", diff, diff)
    scores = np.empty(n, dtype=np.float64)
    for i in range(n):
        others = np.delete(dist[i], i)
        scores[i] = np.sort(others)[:k].sum()
    return scores


def krum(X: np.ndarray, num_byzantine: int, multi: int = 1) -> np.ndarray:
    """Krum and multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017).

    ``score(i) = sum_{j in N_i} ||x_i - x_j||^2`` where ``N_i`` are the ``n - f - 2`` nearest
    neighbours of ``x_i`` (other than itself). Krum returns the row with the lowest score;
    multi-Krum returns the mean of the ``multi`` rows with the lowest scores (scores computed once).
    Ties are broken by the lowest row index.

    Args:
        X: client vectors, shape ``(n, d)``.
        num_byzantine: ``f``, the number of Byzantine clients to tolerate.
        multi: how many lowest-score rows to average (1 = plain Krum).

    Returns:
        The ``(d,)`` selected vector (or mean of the selected vectors).

    Raises:
        ValueError: ``n - f - 2 < 1`` (naming ``n`` and ``f``), or ``multi`` outside ``[1, n]``.

    Example:
        >>> krum(np.array([[0.0], [1.0], [2.0], [4.0], [100.0]]), num_byzantine=1)
        array([1.])
    """
    M = _as_matrix(X)
    n = M.shape[0]
    scores = _krum_scores(M, num_byzantine)
    if not 1 <= multi <= n:
        raise ValueError(f"multi must be in [1, n={n}], got {multi}")
    chosen = np.argsort(scores, kind="stable")[:multi]
    return _cast_back(M[np.sort(chosen)].mean(axis=0), X)


def _multi_krum(X: np.ndarray, num_byzantine: int, multi: int | None) -> np.ndarray:
    """Multi-Krum with ``multi`` defaulting to ``n - num_byzantine`` for the rows given."""
    m = np.shape(X)[0] - num_byzantine if multi is None else multi
    return krum(X, num_byzantine, multi=m)


def centered_clipping(X: np.ndarray, center: np.ndarray, tau: float, iters: int = 1) -> np.ndarray:
    """Centered clipping of client vectors around a center.

    From Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization",
    ICML 2021.

    Starting from ``v = center``, repeat ``iters`` times:
    ``v <- v + (1/n) sum_i clip(x_i - v, tau)`` with ``clip(z) = z * min(1, tau / ||z||)``
    (``clip(0) = 0``). The center is typically the previous round's aggregate (momentum).

    Args:
        X: client vectors, shape ``(n, d)``.
        center: starting point, shape ``(d,)``.
        tau: clipping radius, > 0.
        iters: number of clipping iterations, >= 1.

    Returns:
        The ``(d,)`` clipped aggregate.

    Raises:
        ValueError: bad ``tau``, ``iters`` or center shape.

    Example:
        >>> centered_clipping(np.array([[3.0, 4.0], [0.0, 0.0]]), np.zeros(2), tau=1.0)
        array([0.3, 0.4])
    """
    M = _as_matrix(X)
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite positive radius, got {tau!r}")
    if int(iters) != iters or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    v = np.asarray(center, dtype=np.float64)
    if v.shape != (M.shape[1],):
        raise ValueError(f"center must have shape ({M.shape[1]},) like the rows, got {v.shape}")
    v = v.copy()
    for _ in range(int(iters)):
        diff = M - v
        norms = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        scale = np.minimum(1.0, tau / np.where(norms > 0, norms, np.inf))
        v = v + (diff * scale[:, None]).mean(axis=0)
    return _cast_back(v, X)


def bucketing(
    X: np.ndarray,
    bucket_size: int,
    rule: Callable[[np.ndarray], np.ndarray],
    rng: np.random.Generator,
) -> np.ndarray:
    """Bucketing: average random groups of clients, then apply a robust rule to the group means.

    From Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
    Bucketing", ICLR 2022. Shuffle the rows with ``perm = rng.permutation(n)``, average each
    consecutive group of ``s = bucket_size`` shuffled rows (the last group may be smaller),
    ``y_b = mean(x_perm[b*s : (b+1)*s])``, then return ``rule(Y)`` over the ``ceil(n / s)`` means.

    Args:
        X: client vectors, shape ``(n, d)``.
        bucket_size: rows per bucket ``s``, >= 1.
        rule: robust rule applied to the ``(ceil(n/s), d)`` bucket means, e.g.
            ``coordinate_median`` or ``lambda Y: krum(Y, 1)``.
        rng: seeded generator; consumed by exactly one ``rng.permutation(n)`` call.

    Returns:
        ``rule`` applied to the bucket means.

    Raises:
        ValueError: ``bucket_size < 1``.

    Example:
        >>> X = np.array([[1.0], [2.0], [3.0], [1000.0]])
        >>> bucketing(X, 2, coordinate_median, np.random.default_rng(0)).shape
        (1,)
    """
    M = _as_matrix(X)
    if int(bucket_size) != bucket_size or bucket_size < 1:
        raise ValueError(f"bucket_size must be an int >= 1, got {bucket_size!r}")
    s = int(bucket_size)
    n = M.shape[0]
    shuffled = M[rng.permutation(n)]
    means = np.stack([shuffled[i : i + s].mean(axis=0) for i in range(0, n, s)])
    return _cast_back(np.asarray(rule(means), dtype=np.float64), X)


# --------------------------------------------------------------------------------------------------
# dict-level entry point


def flatten(tensors: Mapping[str, np.ndarray], keys: Sequence[str]) -> np.ndarray:
    """Concatenate the named tensors, raveled in ``keys`` order, into one float64 vector.

    Args:
        tensors: tensors by name.
        keys: which tensors, in which order.

    Returns:
        A ``(sum of sizes,)`` float64 vector.

    Raises:
        ValueError: a key is missing (the message names it).

    Example:
        >>> flatten({"a": np.ones((2, 2)), "b": np.zeros(1)}, ["b", "a"])
        array([0., 1., 1., 1., 1.])
    """
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ValueError(f"missing tensors {missing}; available: {sorted(tensors)}")
    if not keys:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.asarray(tensors[k], dtype=np.float64).ravel() for k in keys])


def unflatten(
    vec: np.ndarray, like: Mapping[str, np.ndarray], keys: Sequence[str]
) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten`: split ``vec`` into tensors shaped and typed like ``like``.

    Args:
        vec: flat vector of length ``sum(like[k].size for k in keys)``.
        like: template tensors giving each key's shape and dtype.
        keys: the order used by :func:`flatten`.

    Returns:
        ``{k: tensor}`` in ``keys`` order.

    Raises:
        ValueError: a key is missing from ``like`` or ``vec`` has the wrong length.

    Example:
        >>> unflatten(np.arange(3.0), {"a": np.zeros(2), "b": np.zeros(1)}, ["a", "b"])
        {'a': array([0., 1.]), 'b': array([2.])}
    """
    missing = [k for k in keys if k not in like]
    if missing:
        raise ValueError(f"missing template tensors {missing}; available: {sorted(like)}")
    vec = np.asarray(vec)
    templates = [np.asarray(like[k]) for k in keys]
    total = sum(t.size for t in templates)
    if vec.shape != (total,):
        raise ValueError(f"vec has shape {vec.shape}, expected ({total},) for keys {list(keys)}")
    out: dict[str, np.ndarray] = {}
    start = 0
    for k, t in zip(keys, templates, strict=True):
        out[k] = vec[start : start + t.size].reshape(t.shape).astype(t.dtype)
        start += t.size
    return out


def robust_aggregate(
    updates: Sequence[Mapping[str, np.ndarray]],
    rule: str,
    *,
    weights: Sequence[float] | None = None,
    trim: float = 0.1,
    num_byzantine: int = 0,
    multi: int | None = None,
    tau: float | None = None,
    center: Mapping[str, np.ndarray] | np.ndarray | None = None,
    iters: int = 1,
    bucket_size: int = 0,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Aggregate dict updates with one of :data:`ROBUST_RULES`, optionally after bucketing.

    Flattens every update over the first update's keys, optionally buckets the rows
    (:func:`bucketing`), applies the rule, and unflattens to the first update's shapes and dtypes:

    * ``"mean"``: :func:`weighted_mean` (the only rule that uses ``weights``);
    * ``"median"``: :func:`coordinate_median`;
    * ``"trimmed_mean"``: :func:`trimmed_mean` with ``trim``;
    * ``"krum"``: :func:`krum` with ``num_byzantine`` (``multi`` must be None or 1);
    * ``"multi_krum"``: :func:`krum` with ``multi`` (default ``n - num_byzantine``);
    * ``"centered_clipping"``: :func:`centered_clipping` with ``tau`` (required), ``iters`` and
      ``center`` (default zeros, right for deltas and gradients; pass the previous aggregate
      otherwise).

    With bucketing, ``n`` for the rule is the number of buckets. Updates holding NaN or infinite
    values are left out before anything else (they cannot poison the result).

    Args:
        updates: one mapping of tensors per client, all with the same keys and shapes.
        rule: one of :data:`ROBUST_RULES`.
        weights: per-client weights for ``"mean"``; robust rules ignore client-reported weights by
            design, so passing them with another rule is an error.
        trim: count or fraction trimmed per end for ``"trimmed_mean"``.
        num_byzantine: ``f`` for Krum.
        multi: rows averaged by ``"multi_krum"``.
        tau: clipping radius for ``"centered_clipping"``.
        center: starting point for ``"centered_clipping"``, as a dict like the updates or a flat
            vector.
        iters: clipping iterations for ``"centered_clipping"``.
        bucket_size: rows per bucket; 0 disables bucketing.
        rng: seeded generator, required when ``bucket_size > 0``.

    Returns:
        The aggregate, with the first update's keys, shapes and dtypes.

    Raises:
        ValueError: unknown rule (listing the valid ones), inconsistent updates, or bad options.

    Example:
        >>> ups = [{"w": np.array([v])} for v in (1.0, 2.0, 3.0, 1000.0)]
        >>> robust_aggregate(ups, "median")
        {'w': array([2.5])}
    """
    if rule not in ROBUST_RULES:
        valid = ", ".join(ROBUST_RULES)
        raise ValueError(f"unknown aggregation rule {rule!r}; valid rules: {valid}")
    if len(updates) == 0:
        raise ValueError("robust_aggregate needs at least one update, got none")
    like = {k: np.asarray(v) for k, v in updates[0].items()}
    keys = list(like)
    for i, u in enumerate(updates):
        if set(u) != set(keys):
            missing, extra = sorted(set(keys) - set(u)), sorted(set(u) - set(keys))
            raise ValueError(
                f"update {i} has keys differing from update 0: missing {missing}, extra {extra}; "
                f"robust rules need every client to send the same tensors (use holder_mean for "
                f"partial updates)"
            )
        for k in keys:
            shape = np.shape(u[k])
            if shape != like[k].shape:
                raise ValueError(
                    f"tensor {k!r} has shape {shape} in update {i} but {like[k].shape} in update 0"
                )
    if weights is not None and rule != "mean":
        raise ValueError(
            f"weights apply only to rule='mean', got rule={rule!r}; pass weights=None "
            f"(client-reported weights would let a Byzantine client dominate)"
        )
    if weights is not None and bucket_size:
        raise ValueError("weights cannot be combined with bucketing; pass weights=None")
    X = np.stack([flatten(u, keys) for u in updates])
    finite = np.isfinite(X).all(axis=1)
    if not finite.all():  # a NaN or infinite update cannot be an honest one: leave it out of every rule
        if not finite.any():
            raise ValueError(f"all {len(updates)} updates hold NaN or infinite values; nothing to aggregate")
        X = X[finite]
        if weights is not None:
            weights = [w for w, ok in zip(weights, finite) if ok]

    apply: Callable[[np.ndarray], np.ndarray]
    if rule == "mean":
        apply = functools.partial(weighted_mean, weights=weights)
    elif rule == "median":
        apply = coordinate_median
    elif rule == "trimmed_mean":
        apply = functools.partial(trimmed_mean, trim=trim)
    elif rule == "krum":
        if multi not in (None, 1):
            raise ValueError(f"rule='krum' selects one vector, got multi={multi}; use 'multi_krum'")
        apply = functools.partial(krum, num_byzantine=num_byzantine)
    elif rule == "multi_krum":
        apply = functools.partial(_multi_krum, num_byzantine=num_byzantine, multi=multi)
    else:  # centered_clipping
        if tau is None:
            raise ValueError("rule='centered_clipping' needs a clipping radius, e.g. tau=1.0")
        if center is None:
            c = np.zeros(X.shape[1])
        elif isinstance(center, Mapping):
            c = flatten(center, keys)
        else:
            c = np.asarray(center, dtype=np.float64).ravel()
        apply = functools.partial(centered_clipping, center=c, tau=tau, iters=iters)

    if bucket_size:
        if rng is None:
            raise ValueError("bucketing needs a seeded generator: rng=np.random.default_rng(seed)")
        vec = bucketing(X, bucket_size, apply, rng)
    else:
        vec = apply(X)
    return unflatten(vec, like, keys)
