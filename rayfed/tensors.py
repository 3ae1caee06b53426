"""Wire formats: the tensors a client or the server actually sends, and the one rule that counts them.

A payload (broadcast or upload) is a mapping of names to tensors. A tensor crosses the wire either
dense, as a numpy array, or sparse, as a :class:`SparseTensor`: only the entries at some flat
(row-major) positions, e.g. the coordinates of a FedSpa client's mask. :func:`wire_nbytes` is the one
byte-counting rule for both, so communication metrics report what is really sent, not the dense size
of the model.

This module imports numpy only: algorithms build payloads with it, the runtime ships them, and
:class:`rayfed.aggregate.StreamingMean` averages sparse uploads over their holders.

Example:
    >>> w = np.array([[0.5, 0.0], [0.0, 2.0]], np.float32)
    >>> s = SparseTensor.from_dense(w, w != 0)
    >>> s
    SparseTensor(shape=(2, 2), dtype=float32, nnz=2, encoding='bitmap', nbytes=9)
    >>> s.positions(), s.to_dense(fill=-1.0)
    (array([0, 3]), array([[ 0.5, -1. ],
           [-1. ,  2. ]], dtype=float32))
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

__all__ = ["ENCODINGS", "SparseTensor", "densify", "is_sparse", "wire_nbytes"]

Encoding = Literal["indices", "bitmap"]

ENCODINGS: tuple[str, ...] = ("indices", "bitmap")
"""The position encodings of a :class:`SparseTensor`; ``"auto"`` picks the cheaper of the two."""

# Set bits per byte value: a bitmap's entry count without unpacking it (np.bitwise_count needs numpy 2).
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def _index_dtype(size: int) -> np.dtype:
    """int32 positions while every flat position fits in it (half the bytes), else int64."""
    return np.dtype(np.int32) if size < 2**31 else np.dtype(np.int64)


def _check_shape(shape: Any) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in shape)
        ok = all(int(d) == d for d in shape) and all(d >= 0 for d in dims)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"shape must be a tuple of non-negative ints, got {shape!r}")
    return dims


def _choose(encoding: str, nnz: int, size: int) -> Encoding:
    """``encoding`` itself, or for ``"auto"`` the cheaper one by bytes (ties -> bitmap)."""
    if encoding == "auto":
        indices_bytes = nnz * _index_dtype(size).itemsize
        return "indices" if indices_bytes < -(-size // 8) else "bitmap"
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be 'auto', 'indices' or 'bitmap', got {encoding!r}")
    return encoding  # type: ignore[return-value]


class SparseTensor:
    """A tensor of which only the entries at some flat (row-major) positions are sent.

    The off-mask entries are not part of the tensor: the receiver decides what they are (zero, or
    the previous global weights: see :meth:`to_dense`; :class:`~rayfed.aggregate.StreamingMean`
    averages each coordinate over the updates that hold it).

    Two encodings of the positions, chosen by bytes (:meth:`from_dense` with ``encoding="auto"``):

    * ``"indices"``: the ascending flat positions, int32 when the tensor has fewer than ``2**31``
      entries, else int64 (``4 * nnz`` or ``8 * nnz`` bytes);
    * ``"bitmap"``: ``np.packbits`` of the flat boolean mask in numpy's default big-endian bit order
      (flat position ``p`` is bit ``7 - p % 8`` of byte ``p // 8``, the most significant bit first),
      ``ceil(size / 8)`` bytes, with the padding bits of the last byte zero.

    Attributes are plain numpy arrays, so a pickle (and Ray's object store) carries the two buffers
    and a few dozen bytes besides; unpickling validates again, so a malformed payload fails on
    arrival rather than inside an aggregation. Treat instances as immutable.

    Args:
        shape: the dense tensor's shape.
        values: 1-D, the kept entries in ascending position order; their dtype is the tensor's.
        index: the positions in ``encoding``; integer positions are stored as the canonical index
            dtype above.
        encoding: ``"indices"`` or ``"bitmap"``.

    Attributes:
        shape: the dense tensor's shape.
        values: the kept entries, in ascending position order.
        index: the encoded positions.
        encoding: ``"indices"`` or ``"bitmap"``.

    Raises:
        ValueError: a bad shape or encoding, positions out of range or not strictly ascending, a
            bitmap of the wrong length or with padding bits set, or a values length that differs
            from the number of positions (the message names the values).

    Example:
        >>> s = SparseTensor((5,), np.array([7.0, 8.0]), np.array([1, 4]), "indices")
        >>> s.to_dense()
        array([0., 7., 0., 0., 8.])
        >>> s.nbytes  # 2 float64 values + 2 int32 positions
        24
    """

    __slots__ = ("shape", "values", "index", "encoding")

    shape: tuple[int, ...]
    values: np.ndarray
    index: np.ndarray
    encoding: Encoding

    def __init__(self, shape: tuple[int, ...], values: np.ndarray, index: np.ndarray, encoding: Encoding) -> None:
        dims = _check_shape(shape)
        size = math.prod(dims)
        values = np.asarray(values)
        index = np.asarray(index)
        if values.ndim != 1:
            raise ValueError(f"values must be 1-D (the kept entries in position order), got shape {values.shape}")
        if encoding == "indices":
            if index.ndim != 1 or not (index.dtype.kind in "iu" or index.size == 0):
                raise ValueError(
                    f"'indices' positions must be a 1-D integer array, got dtype {index.dtype} and shape "
                    f"{index.shape}"
                )
            if index.size:
                lo, hi = int(index.min()), int(index.max())
                if lo < 0 or hi >= size:
                    raise ValueError(
                        f"positions must lie in [0, {size}) for shape {dims}, got positions from {lo} to {hi}"
                    )
                steps = np.diff(index.astype(np.int64, copy=False))
                if steps.size and not (steps > 0).all():
                    at = int(np.flatnonzero(steps <= 0)[0])
                    raise ValueError(
                        f"'indices' positions must be strictly ascending, got {int(index[at])} then "
                        f"{int(index[at + 1])} at offsets {at} and {at + 1}; use SparseTensor.from_positions, "
                        f"which sorts them"
                    )
            index = index.astype(_index_dtype(size), copy=False)
            nnz = index.size
        elif encoding == "bitmap":
            nbytes = -(-size // 8)
            if index.dtype != np.uint8 or index.shape != (nbytes,):
                raise ValueError(
                    f"a bitmap for shape {dims} must be a uint8 array of shape ({nbytes},) "
                    f"(np.packbits of the flat mask), got dtype {index.dtype} and shape {index.shape}"
                )
            pad = 8 * nbytes - size
            if pad and int(index[-1]) & ((1 << pad) - 1):
                raise ValueError(
                    f"the bitmap's last byte {int(index[-1])} sets padding bits beyond the {size} entries of "
                    f"shape {dims}; its lowest {pad} bits must be 0"
                )
            nnz = int(_POPCOUNT[index].sum())
        else:
            raise ValueError(f"encoding must be 'indices' or 'bitmap', got {encoding!r}")
        if values.size != nnz:
            raise ValueError(
                f"got {values.size} values for {nnz} positions (encoding {encoding!r}); pass one value per "
                f"kept position"
            )
        self.shape = dims
        self.values = values
        self.index = index
        self.encoding = encoding

    # -- constructors ----------------------------------------------------------------------------

    @classmethod
    def from_dense(cls, array: np.ndarray, mask: np.ndarray, encoding: str = "auto") -> SparseTensor:
        """The entries of ``array`` where ``mask`` is True.

        Args:
            array: the dense tensor.
            mask: boolean, shaped like ``array``.
            encoding: ``"indices"``, ``"bitmap"``, or ``"auto"`` for the one with fewer bytes
                (a tie picks ``"bitmap"``).

        Returns:
            The sparse tensor, with ``array``'s shape and dtype (the values are a copy).

        Raises:
            ValueError: shapes differ, the mask is not boolean, or an unknown encoding.

        Example:
            >>> SparseTensor.from_dense(np.arange(100.0), np.arange(100) < 3).encoding  # 12 < 13 bytes
            'indices'
        """
        array = np.asarray(array)
        mask = np.asarray(mask)
        if mask.shape != array.shape:
            raise ValueError(f"mask has shape {mask.shape} but the array has shape {array.shape}; pass one alike")
        if mask.dtype != np.bool_:
            raise ValueError(f"mask must be boolean, got dtype {mask.dtype}; pass e.g. mask != 0")
        flat = mask.reshape(-1)
        values = array.reshape(-1)[flat]
        chosen = _choose(encoding, values.size, array.size)
        if chosen == "indices":
            index = np.flatnonzero(flat).astype(_index_dtype(array.size), copy=False)
        else:
            index = np.packbits(flat)
        return cls(array.shape, values, index, chosen)

    @classmethod
    def from_positions(
        cls,
        shape: tuple[int, ...],
        positions: np.ndarray,
        values: np.ndarray,
        *,
        dtype: np.dtype | type | str | None = None,
        encoding: str = "auto",
    ) -> SparseTensor:
        """A sparse tensor from flat (row-major) positions and their values, in any order.

        Args:
            shape: the dense tensor's shape.
            positions: unique flat positions in ``[0, prod(shape))``, any order.
            values: one value per position, in the order of ``positions``.
            dtype: the tensor's dtype; ``None`` keeps the values' dtype.
            encoding: ``"indices"``, ``"bitmap"``, or ``"auto"`` (as in :meth:`from_dense`).

        Returns:
            The sparse tensor, its values reordered to ascending positions.

        Raises:
            ValueError: positions out of range, repeated, or not integers; a values length that
                differs from the positions'; a bad shape or encoding.

        Example:
            >>> SparseTensor.from_positions((2, 3), [5, 0], [2.0, 1.0]).to_dense()
            array([[1., 0., 0.],
                   [0., 0., 2.]])
        """
        dims = _check_shape(shape)
        size = math.prod(dims)
        pos = np.asarray(positions)
        vals = np.asarray(values, dtype=dtype)
        if pos.ndim != 1 or vals.ndim != 1:
            raise ValueError(
                f"positions and values must be 1-D, got shapes {np.shape(positions)} and {np.shape(values)}"
            )
        if pos.size and pos.dtype.kind not in "iu":
            raise ValueError(f"positions must be integers, got dtype {pos.dtype}")
        if pos.size != vals.size:
            raise ValueError(f"got {vals.size} values for {pos.size} positions; pass one value per position")
        pos = pos.astype(np.int64, copy=False)
        if pos.size and (int(pos.min()) < 0 or int(pos.max()) >= size):
            bad = pos[(pos < 0) | (pos >= size)]
            raise ValueError(
                f"positions must lie in [0, {size}) for shape {dims}, got out-of-range positions {bad[:5].tolist()}"
            )
        order = np.argsort(pos, kind="stable")
        pos, vals = pos[order], vals[order]
        repeated = pos[1:][pos[1:] == pos[:-1]]
        if repeated.size:
            raise ValueError(f"positions must be unique, got repeated positions {np.unique(repeated)[:5].tolist()}")
        chosen = _choose(encoding, pos.size, size)
        if chosen == "indices":
            index = pos.astype(_index_dtype(size), copy=False)
        else:
            flat = np.zeros(size, dtype=bool)
            flat[pos] = True
            index = np.packbits(flat)
        return cls(dims, vals, index, chosen)

    # -- properties ------------------------------------------------------------------------------

    @property
    def nnz(self) -> int:
        """Number of kept entries."""
        return int(self.values.size)

    @property
    def size(self) -> int:
        """Number of entries of the dense tensor."""
        return math.prod(self.shape)

    @property
    def density(self) -> float:
        """``nnz / size`` (0.0 for an empty tensor)."""
        return self.nnz / self.size if self.size else 0.0

    @property
    def dtype(self) -> np.dtype:
        """The values' dtype, which is the dense tensor's."""
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: exactly what the two buffers hold (``values.nbytes + index.nbytes``)."""
        return int(self.values.nbytes + self.index.nbytes)

    # -- views -----------------------------------------------------------------------------------

    def _flat_mask(self) -> np.ndarray:
        if self.encoding == "bitmap":
            return np.unpackbits(self.index, count=self.size).view(bool)
        flat = np.zeros(self.size, dtype=bool)
        flat[self.index] = True
        return flat

    def positions(self) -> np.ndarray:
        """The kept flat positions, ascending, as int64."""
        if self.encoding == "bitmap":
            return np.flatnonzero(np.unpackbits(self.index, count=self.size)).astype(np.int64, copy=False)
        return self.index.astype(np.int64)

    def mask(self) -> np.ndarray:
        """A boolean array of ``shape``: True at the kept positions."""
        return self._flat_mask().reshape(self.shape)

    def to_dense(self, fill: float | np.ndarray = 0) -> np.ndarray:
        """The dense tensor: the kept values at their positions, ``fill`` elsewhere.

        Args:
            fill: a scalar, or an array of ``shape`` (e.g. the previous global weights) whose
                entries are taken off the mask; cast to the tensor's dtype.

        Returns:
            A new array of ``shape`` and the tensor's dtype.

        Raises:
            ValueError: ``fill`` is an array of another shape.
        """
        fill_arr = np.asarray(fill)
        if fill_arr.ndim == 0:
            out = np.full(self.shape, fill_arr, dtype=self.dtype)
        elif fill_arr.shape != self.shape:
            raise ValueError(
                f"fill has shape {fill_arr.shape} but the sparse tensor has shape {self.shape}; "
                f"pass a scalar or an array of shape {self.shape}"
            )
        else:
            out = fill_arr.astype(self.dtype, copy=True)
        flat = out.reshape(-1)
        if self.encoding == "bitmap":
            flat[self._flat_mask()] = self.values
        else:
            flat[self.index] = self.values
        return out

    def __repr__(self) -> str:
        return (
            f"SparseTensor(shape={self.shape}, dtype={self.dtype}, nnz={self.nnz}, "
            f"encoding={self.encoding!r}, nbytes={self.nbytes})"
        )

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Rebuilt through __init__, so what arrives from another process is validated again.
        return (SparseTensor, (self.shape, self.values, self.index, self.encoding))


def is_sparse(x: object) -> bool:
    """Whether ``x`` is a :class:`SparseTensor`."""
    return isinstance(x, SparseTensor)


def wire_nbytes(value: Any) -> int:
    """Bytes that ``value`` puts on the wire: the one byte-counting rule for payloads and uploads.

    * a numpy array: ``.nbytes``;
    * a :class:`SparseTensor`: ``.nbytes`` (values plus encoded positions, not the dense size);
    * any other object with an integer ``nbytes`` attribute (e.g.
      :class:`rayfed.aggregate.PackedTensors`, one buffer for many tensors; a torch tensor): that;
    * a mapping: the sum over its values;
    * ``None``: 0.

    Args:
        value: what is sent.

    Returns:
        The byte count.

    Raises:
        TypeError: anything else (the message names the type).

    Example:
        >>> s = SparseTensor.from_dense(np.ones(100, np.float32), np.arange(100) < 3)
        >>> wire_nbytes({"dense": np.zeros(10, np.float32), "sparse": s, "none": None})
        64
    """
    if value is None:
        return 0
    if isinstance(value, (np.ndarray, SparseTensor)):
        return int(value.nbytes)
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, (int, np.integer)) and not isinstance(nbytes, bool):
        return int(nbytes)
    if isinstance(value, Mapping):
        return sum(wire_nbytes(v) for v in value.values())
    raise TypeError(
        f"cannot count the wire bytes of a {type(value).__module__}.{type(value).__qualname__}; send numpy "
        f"arrays, SparseTensor, objects with an integer nbytes, mappings of those, or None"
    )


def densify(mapping: Mapping[str, Any], fill: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A dict like ``mapping`` with every :class:`SparseTensor` made dense.

    Args:
        mapping: tensors by name, dense or sparse.
        fill: off-mask values per name (e.g. the previous global weights); ``None`` fills with 0.
            When given, it must hold every sparse name.

    Returns:
        A new dict in ``mapping``'s order; dense entries are the same objects, not copies.

    Raises:
        ValueError: ``fill`` is given but lacks a sparse name, or a fill has the wrong shape.

    Example:
        >>> s = SparseTensor.from_positions((3,), [1], [5.0])
        >>> densify({"w": s, "b": np.ones(1)}, fill={"w": np.full(3, 9.0)})
        {'w': array([9., 5., 9.]), 'b': array([1.])}
    """
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        if not isinstance(v, SparseTensor):
            out[k] = v
            continue
        if fill is None:
            out[k] = v.to_dense(0)
        elif k in fill:
            out[k] = v.to_dense(fill[k])
        else:
            raise ValueError(
                f"densify: fill has no entry for sparse tensor {k!r} (fill holds {sorted(fill)}); add "
                f"fill[{k!r}] (e.g. the previous global weights), or pass fill=None to fill with 0"
            )
    return out
