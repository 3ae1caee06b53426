"""Checks of every client update on the server, before it reaches the aggregator.

The server is the trust boundary: a client controls what it sends. :class:`UpdateValidator`
rejects an update that carries a name its client's roles do not allow (a private or frozen
tensor, an unknown key, an ``aux/`` entry the algorithm does not declare), misses a tensor the
algorithm uploads, has a wrong shape or dtype, or holds NaN or infinite values. A rejected update is
reported as a failure of that client (stage ``validate``) with the reason, and the round goes on
without it (the failure policy and quorum apply as for any failed client).

Example:
    >>> import numpy as np
    >>> from rayfed.algorithms.base import ClientUpdate
    >>> v = UpdateValidator({"w": ((2,), np.dtype("float32"))}, {0: frozenset({"w"})})
    >>> v.check(ClientUpdate(0, 0, 10, {"w": np.array([1.0, np.nan], np.float32)}))
    "tensor 'w' holds 1 NaN or infinite value(s)"
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import numpy as np

from rayfed.algorithms.base import AUX, ClientUpdate
from rayfed.tensors import is_sparse

__all__ = ["UpdateValidator"]


class UpdateValidator:
    """What each client may send, and the check of one update against it.

    Args:
        shapes: ``key -> (shape, dtype)`` of every tensor a client may upload.
        expected: per client, the keys its update must hold (its structure's uploaded tensors).
        aux: ``aux/`` entry names (without the prefix) the algorithm declares; any other is refused.
    """

    def __init__(self, shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]], expected: Mapping[int, frozenset[str]],
                 aux: frozenset[str] = frozenset()) -> None:
        self.shapes = dict(shapes)
        self.expected = dict(expected)
        self.aux = frozenset(aux)

    def check(self, update: ClientUpdate) -> Optional[str]:
        """The reason ``update`` is refused, or None when it is acceptable."""
        want = self.expected.get(update.client_id)
        if want is None:
            return f"client {update.client_id} is not a client of this federation"
        names = list(update.tensors)
        bad_aux = [k for k in names if k.startswith(AUX) and k[len(AUX):] not in self.aux]
        if bad_aux:
            return (f"entries {bad_aux[:3]} under 'aux/' are not declared by the algorithm (declared: "
                    f"{sorted(self.aux) or 'none'})")
        model = [k for k in names if not k.startswith(AUX)]
        unknown = [k for k in model if k not in want]
        if unknown:
            return (f"tensors {unknown[:3]} may not leave this client (private, frozen, not held by its model, or "
                    "unknown)")
        missing = sorted(want - set(model))
        if missing:
            return f"tensors {missing[:3]} are missing ({len(missing)} of {len(want)} expected)"
        for k in model:
            reason = self._check_value(k, update.tensors[k])
            if reason:
                return reason
        return None

    def _check_value(self, key: str, value: object) -> Optional[str]:
        shape, dtype = self.shapes[key]
        if is_sparse(value):
            got_shape, got_dtype, data = tuple(value.shape), value.dtype, value.values
        else:
            data = np.asarray(value)
            got_shape, got_dtype = tuple(data.shape), data.dtype
        if got_shape != tuple(shape):
            return f"tensor {key!r} has shape {list(got_shape)}, expected {list(shape)}"
        if got_dtype != dtype:
            return f"tensor {key!r} has dtype {got_dtype}, expected {dtype}"
        if data.dtype.kind in "fc":
            bad = int(np.count_nonzero(~np.isfinite(data)))
            if bad:
                return f"tensor {key!r} holds {bad} NaN or infinite value(s)"
        return None
