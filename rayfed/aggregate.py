"""Aggregation maths: pure functions over numpy arrays, no Ray and no torch.

The server holds weights as ``dict[str, np.ndarray]``. Every rule here is a plain function (or, for
the streaming mean, a small accumulator) with an exact-value test, so algorithms and the server
actor can compose them without owning any maths themselves.

* Means: :func:`weighted_mean`, the streaming per-key holder mean :class:`StreamingMean` (clients
  that hold only some tensors, e.g. tiered roles, are averaged only where they hold a key, and
  sparse uploads, :class:`rayfed.tensors.SparseTensor`, only at the coordinates they hold) and its
  batch form :func:`holder_mean`, and the FedSpa sparse-aware mean over dense values and masks
  :func:`sparse_mean`.
* :func:`flatten` and :func:`unflatten` between a dict of named tensors and one flat vector (the
  rows the Byzantine-robust rules of :mod:`rayfed.robust_rules` work on).

All sums are accumulated in float64; results are cast back to the inputs' floating dtype.

Example:
    >>> a = {"w": np.array([1.0, 2.0], np.float32)}
    >>> b = {"w": np.array([3.0, 6.0], np.float32), "head": np.array([5.0], np.float32)}
    >>> holder_mean([a, b], weights=[1, 3])
    {'w': array([2.5, 5. ], dtype=float32), 'head': array([5.], dtype=float32)}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from rayfed.tensors import SparseTensor

__all__ = [
    "PackedTensors",
    "StreamingMean",
    "flatten",
    "holder_mean",
    "sparse_mean",
    "unflatten",
    "weighted_mean",
]

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
# flat vectors of named tensors (the rows of rayfed.robust_rules)


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
