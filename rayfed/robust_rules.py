"""Byzantine-robust aggregation rules over a stack of client vectors, on the CPU or a GPU.

Every rule takes ``X``, the clients' flattened updates as the rows of an ``(n, d)`` matrix, and
returns one ``(d,)`` vector: :func:`coordinate_median`, :func:`trimmed_mean`, :func:`krum` /
multi-Krum (Blanchard et al. 2017, with :func:`krum_scores`), :func:`centered_clipping` and
:func:`bucketing` (Karimireddy, He, Jaggi 2021; 2022). :func:`robust_aggregate` is the dict-level
entry point the server uses (:class:`rayfed.robust.RobustAggregator`).

One implementation serves every device: the rules are written against the Python array API
(through ``array_api_compat``, the layer scikit-learn and SciPy use for the same purpose) and run,
in float64, wherever ``X`` lives. A numpy ``X`` is computed by numpy on the host; a torch ``X`` by
torch on its device (a CUDA tensor on the GPU). Each rule returns the same kind of array as ``X``,
in ``X``'s floating dtype (float64 for integer input). :func:`robust_aggregate` takes the device to
run on (``runtime.server_device`` on the server, so a server actor with a GPU sorts, measures
distances and clips there) and always returns host numpy arrays, the form server state takes.

Sorting and selection are exact, so the coordinate median and Krum's choice are the same bits with
numpy and with torch on any device; the means inside the trimmed mean, multi-Krum, clipping and
bucketing are float64 reductions whose summation order is the library's, equal to each other to
float64 rounding (tested to 1e-12 relative).

Example:
    >>> ups = [{"w": np.array([v])} for v in (1.0, 2.0, 3.0, 1000.0)]
    >>> robust_aggregate(ups, "median")
    {'w': array([2.5])}
    >>> krum(np.array([[0.0], [1.0], [2.0], [4.0], [100.0]]), num_byzantine=1)
    array([1.])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import array_api_compat
import numpy as np

from rayfed.aggregate import flatten, unflatten, weighted_mean

__all__ = [
    "ROBUST_RULES",
    "bucketing",
    "centered_clipping",
    "coordinate_median",
    "krum",
    "krum_scores",
    "robust_aggregate",
    "trimmed_mean",
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

#: an ``(n, d)`` stack of client vectors: a numpy array or any array-API array (a torch tensor)
Matrix = Any


# --------------------------------------------------------------------------------------------------
# helpers: the namespace of X, one float64 matrix in, X's kind of array out


def _as_matrix(X: Matrix) -> tuple[Any, Matrix]:
    """``(xp, M)``: ``X``'s array-API namespace (numpy's for anything that is not an array-API array,
    e.g. a list) and ``X`` as a float64 ``(n, d)`` matrix with ``n >= 1``.
    """
    A = X if array_api_compat.is_array_api_obj(X) else np.asarray(X)
    xp = array_api_compat.array_namespace(A)
    M = xp.astype(A, xp.float64, copy=False)
    if M.ndim != 2 or M.shape[0] < 1:
        raise ValueError(
            f"expected a stack of client vectors of shape (n_clients, d) with n_clients >= 1, "
            f"got shape {tuple(M.shape)}; use flatten() to turn each client's dict into one row"
        )
    return xp, M


def _vector_like(xp: Any, v: Matrix, M: Matrix) -> Matrix:
    """``v`` (numpy or ``xp``) as a float64 vector of ``xp`` on ``M``'s device."""
    if not array_api_compat.is_array_api_obj(v) or array_api_compat.array_namespace(v) is not xp:
        v = np.asarray(v, dtype=np.float64)
    return xp.asarray(v, dtype=xp.float64, device=array_api_compat.device(M), copy=True)


def _cast_back(xp: Any, result: Matrix, X: Matrix) -> Matrix:
    """``result`` in ``X``'s floating dtype (float64 when ``X`` is integer or boolean)."""
    dtype = X.dtype if array_api_compat.is_array_api_obj(X) else np.asarray(X).dtype
    return result if not xp.isdtype(dtype, "real floating") else xp.astype(result, dtype)


# --------------------------------------------------------------------------------------------------
# rules over (n_clients, d) stacks


def coordinate_median(X: Matrix) -> Matrix:
    """Coordinate-wise median of the rows of ``X``.

    ``out[j] = median_i X[i, j]``; for even ``n`` the mean of the two middle values, as
    :func:`numpy.median` does (and bitwise equal to it; :func:`torch.median` would return the lower
    one).

    Args:
        X: client vectors, shape ``(n, d)``: numpy, or a torch tensor on any device.

    Returns:
        The ``(d,)`` median vector, the same kind of array as ``X``.

    Example:
        >>> coordinate_median(np.array([[1.0, 5.0], [2.0, 0.0], [1000.0, 1.0]]))
        array([2., 1.])
    """
    xp, M = _as_matrix(X)
    n = M.shape[0]
    S = xp.sort(M, axis=0, stable=False)
    mid = S[n // 2, :] if n % 2 else (S[n // 2 - 1, :] + S[n // 2, :]) / 2
    return _cast_back(xp, mid, X)


def trimmed_mean(X: Matrix, trim: float) -> Matrix:
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
    xp, M = _as_matrix(X)
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
    kept = xp.sort(M, axis=0, stable=False)[b : n - b, :]
    return _cast_back(xp, xp.mean(kept, axis=0), X)


def krum_scores(X: Matrix, num_byzantine: int) -> Matrix:
    """Krum's score of every row: ``score(i) = sum_{j in N_i} ||x_i - x_j||^2`` over the
    ``n - f - 2`` nearest other rows ``N_i`` (``f = num_byzantine``).

    Distances are computed one row against all at a time (``O(n d)`` memory, not ``O(n^2 d)``) from
    the differences themselves, never from ``|x|^2 + |y|^2 - 2 x.y``, whose cancellation would blur
    the scores of close updates.

    Returns:
        The ``(n,)`` float64 scores, the same kind of array as ``X``.

    Raises:
        ValueError: ``f < 0`` or ``n - f - 2 < 1``, naming ``n`` and ``f``.

    Example:
        >>> krum_scores(np.array([[0.0], [1.0], [3.0], [10.0]]), num_byzantine=1)
        array([ 1.,  1.,  4., 49.])
    """
    xp, M = _as_matrix(X)
    return _scores(xp, M, num_byzantine)


def _scores(xp: Any, M: Matrix, num_byzantine: int) -> Matrix:
    n = M.shape[0]
    k = n - num_byzantine - 2
    if num_byzantine < 0 or k < 1:
        raise ValueError(
            f"Krum needs num_byzantine >= 0 and n - f - 2 >= 1 neighbours, got n={n}, "
            f"f={num_byzantine}; use fewer assumed Byzantine clients or more clients"
        )
    rows = []
    for i in range(n):
        diff = M - M[i : i + 1, :]
        rows.append(xp.linalg.vecdot(diff, diff, axis=1))
    # a row is not its own neighbour: +inf on the diagonal, which k <= n - 2 never reaches
    eye = xp.eye(n, dtype=xp.bool, device=array_api_compat.device(M))
    dist = xp.where(eye, math.inf, xp.stack(rows))
    return xp.sum(xp.sort(dist, axis=1, stable=False)[:, :k], axis=1)


def krum(X: Matrix, num_byzantine: int, multi: int = 1) -> Matrix:
    """Krum and multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017).

    Krum returns the row with the lowest :func:`krum_scores`; multi-Krum returns the mean of the
    ``multi`` rows with the lowest scores (scores computed once). Ties are broken by the lowest row
    index.

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
    xp, M = _as_matrix(X)
    n = M.shape[0]
    scores = _scores(xp, M, num_byzantine)
    if not 1 <= multi <= n:
        raise ValueError(f"multi must be in [1, n={n}], got {multi}")
    chosen = xp.sort(xp.argsort(scores, stable=True)[:multi])
    return _cast_back(xp, xp.mean(xp.take(M, chosen, axis=0), axis=0), X)


def _multi_krum(X: Matrix, num_byzantine: int, multi: int | None) -> Matrix:
    """Multi-Krum with ``multi`` defaulting to ``n - num_byzantine`` for the rows given."""
    m = X.shape[0] - num_byzantine if multi is None else multi
    return krum(X, num_byzantine, multi=m)


def centered_clipping(X: Matrix, center: Matrix, tau: float, iters: int = 1) -> Matrix:
    """Centered clipping of client vectors around a center.

    From Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization",
    ICML 2021.

    Starting from ``v = center``, repeat ``iters`` times:
    ``v <- v + (1/n) sum_i clip(x_i - v, tau)`` with ``clip(z) = z * min(1, tau / ||z||)``
    (``clip(0) = 0``). The center is typically the previous round's aggregate (momentum).

    Args:
        X: client vectors, shape ``(n, d)``.
        center: starting point, shape ``(d,)`` (numpy, or an array like ``X``; not modified).
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
    xp, M = _as_matrix(X)
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite positive radius, got {tau!r}")
    if int(iters) != iters or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    v = _vector_like(xp, center, M)
    if tuple(v.shape) != (M.shape[1],):
        raise ValueError(f"center must have shape ({M.shape[1]},) like the rows, got {tuple(v.shape)}")
    for _ in range(int(iters)):
        diff = M - v
        norms = xp.sqrt(xp.linalg.vecdot(diff, diff, axis=1))
        scale = xp.clip(tau / xp.where(norms > 0, norms, math.inf), max=1.0)
        v = v + xp.mean(diff * scale[:, None], axis=0)
    return _cast_back(xp, v, X)


def bucketing(
    X: Matrix,
    bucket_size: int,
    rule: Callable[[Matrix], Matrix],
    rng: np.random.Generator,
) -> Matrix:
    """Bucketing: average random groups of clients, then apply a robust rule to the group means.

    From Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
    Bucketing", ICLR 2022. Shuffle the rows with ``perm = rng.permutation(n)``, average each
    consecutive group of ``s = bucket_size`` shuffled rows (the last group may be smaller),
    ``y_b = mean(x_perm[b*s : (b+1)*s])``, then return ``rule(Y)`` over the ``ceil(n / s)`` means.

    Args:
        X: client vectors, shape ``(n, d)``.
        bucket_size: rows per bucket ``s``, >= 1.
        rule: robust rule applied to the ``(ceil(n/s), d)`` bucket means, e.g.
            ``coordinate_median`` or ``lambda Y: krum(Y, 1)``; it receives the means as the same
            kind of array as ``X``, on ``X``'s device.
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
    xp, M = _as_matrix(X)
    if int(bucket_size) != bucket_size or bucket_size < 1:
        raise ValueError(f"bucket_size must be an int >= 1, got {bucket_size!r}")
    s = int(bucket_size)
    n = M.shape[0]
    perm = xp.asarray(rng.permutation(n), device=array_api_compat.device(M))
    shuffled = xp.take(M, perm, axis=0)
    means = xp.stack([xp.mean(shuffled[i : i + s, :], axis=0) for i in range(0, n, s)])
    return _cast_back(xp, _vector_like(xp, rule(means), M), X)


# --------------------------------------------------------------------------------------------------
# dict-level entry point


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
    device: Any = "cpu",
) -> dict[str, np.ndarray]:
    """Aggregate dict updates with one of :data:`ROBUST_RULES`, optionally after bucketing.

    Flattens every update over the first update's keys, optionally buckets the rows
    (:func:`bucketing`), applies the rule on ``device``, and unflattens to the first update's shapes
    and dtypes, as host numpy arrays:

    * ``"mean"``: :func:`rayfed.aggregate.weighted_mean` (the only rule that uses ``weights``; a
      streaming sum, computed on the host whatever ``device`` says);
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
        device: the torch device the rule runs on (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...); the
            stacked updates are moved there once.

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

    apply: Callable[[Matrix], Matrix]
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

    rows = X if rule == "mean" else _on_device(X, device)  # the mean: a weighted sum over host rows
    if bucket_size:
        if rng is None:
            raise ValueError("bucketing needs a seeded generator: rng=np.random.default_rng(seed)")
        vec = bucketing(rows, bucket_size, apply, rng)
    else:
        vec = apply(rows)
    if not isinstance(vec, np.ndarray):  # back to the host, where server state lives
        vec = np.asarray(array_api_compat.to_device(vec, "cpu"))
    return unflatten(vec, like, keys)


def _on_device(X: np.ndarray, device: Any) -> Matrix:
    """The host matrix ``X`` where the rules should run: itself for the CPU, a torch tensor on any
    other torch device (``"cuda"``, ``"cuda:1"``, a :class:`torch.device`).
    """
    if str(device) == "cpu":
        return X
    import torch  # only a server with an accelerator needs torch here

    return torch.from_numpy(X).to(torch.device(device))
