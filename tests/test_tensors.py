"""Wire formats (rayfed.tensors) and sparse-aware StreamingMean: every expectation is computed by hand."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from rayfed.aggregate import PackedTensors, StreamingMean, holder_mean
from rayfed.tensors import SparseTensor, densify, is_sparse, wire_nbytes


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def first(n: int, size: int = 100) -> np.ndarray:
    """A flat mask holding the first ``n`` of ``size`` positions."""
    return np.arange(size) < n


# ------------------------------------------------------------------------------------------------
# encodings and byte counts


@pytest.mark.parametrize(
    ("size", "nnz", "encoding", "index_bytes"),
    [
        (100, 0, "indices", 0),  # 0 < ceil(100/8) = 13
        (100, 3, "indices", 12),  # 3 * 4 = 12 < 13
        (100, 4, "bitmap", 13),  # 4 * 4 = 16 > 13
        (104, 3, "indices", 12),  # 12 < ceil(104/8) = 13
        (32, 1, "bitmap", 4),  # 1 * 4 = 4 == ceil(32/8) = 4: a tie picks the bitmap
        (100, 60, "bitmap", 13),  # 60 * 4 = 240 > 13
        (100, 100, "bitmap", 13),
    ],
)
def test_auto_encoding_picks_the_cheaper_one_with_exact_bytes(size, nnz, encoding, index_bytes):
    s = SparseTensor.from_dense(np.ones(size, np.float32), first(nnz, size))
    assert s.encoding == encoding
    assert s.index.nbytes == index_bytes
    assert s.nbytes == 4 * nnz + index_bytes == s.values.nbytes + s.index.nbytes
    assert s.nnz == nnz and s.size == size and s.density == nnz / size


def test_forced_encodings_and_index_dtypes():
    a = np.ones(100, np.float32)
    s = SparseTensor.from_dense(a, first(60), encoding="indices")
    assert s.index.dtype == np.int32
    assert s.nbytes == 60 * 4 + 60 * 4 == 480
    b = SparseTensor.from_dense(a, first(3), encoding="bitmap")
    assert b.index.dtype == np.uint8
    assert b.nbytes == 3 * 4 + 13 == 25
    # float64 values, int32 positions: 2 * 8 + 2 * 4
    assert SparseTensor.from_positions((2**31 - 1,), [0, 7], [1.0, 2.0]).nbytes == 24
    big = SparseTensor.from_positions((2**31,), [2**31 - 1, 0], [2.0, 1.0])  # no dense buffer is made
    assert big.encoding == "indices" and big.index.dtype == np.int64
    assert big.nbytes == 2 * 8 + 2 * 8 == 32
    np.testing.assert_array_equal(big.positions(), [0, 2**31 - 1])
    np.testing.assert_array_equal(big.values, [1.0, 2.0])


def test_bitmap_bit_order_is_numpy_big_endian():
    # position 0 -> bit 7 of byte 0 (128); position 9 -> bit 6 of byte 1 (64)
    s = SparseTensor.from_positions((10,), [9, 0], [2.0, 1.0], dtype=np.float32, encoding="bitmap")
    np.testing.assert_array_equal(s.index, np.array([128, 64], np.uint8))
    np.testing.assert_array_equal(s.values, f32(1.0, 2.0))
    assert s.nbytes == 2 * 4 + 2 == 10


def test_repr_is_short():
    s = SparseTensor.from_dense(np.arange(6.0).reshape(2, 3), np.eye(2, 3, dtype=bool))
    assert repr(s) == "SparseTensor(shape=(2, 3), dtype=float64, nnz=2, encoding='bitmap', nbytes=17)"


# ------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("encoding", ["indices", "bitmap", "auto"])
def test_from_dense_round_trips(encoding):
    a = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    mask = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 1, 0]], dtype=bool)
    s = SparseTensor.from_dense(a, mask, encoding=encoding)
    assert s.shape == (3, 4) and s.dtype == np.float32 and s.nnz == 4
    np.testing.assert_array_equal(s.values, f32(1, 4, 10, 11))  # ascending flat positions 0, 3, 9, 10
    assert s.positions().dtype == np.int64
    np.testing.assert_array_equal(s.positions(), [0, 3, 9, 10])
    np.testing.assert_array_equal(s.mask(), mask)
    dense = s.to_dense()
    assert dense.dtype == np.float32
    np.testing.assert_array_equal(dense, [[1, 0, 0, 4], [0, 0, 0, 0], [0, 10, 11, 0]])
    np.testing.assert_array_equal(s.to_dense(fill=-1), [[1, -1, -1, 4], [-1] * 4, [-1, 10, 11, -1]])
    previous = np.full((3, 4), 0.5)  # float64 fill is cast to the tensor's float32
    out = s.to_dense(fill=previous)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[1, 0.5, 0.5, 4], [0.5] * 4, [0.5, 10, 11, 0.5]])
    assert previous[0, 0] == 0.5  # the fill array is not written to


def test_from_positions_sorts_and_casts():
    s = SparseTensor.from_positions((2, 3), np.array([5, 0, 2]), [3.0, 1.0, 2.0], dtype=np.float32)
    np.testing.assert_array_equal(s.positions(), [0, 2, 5])
    np.testing.assert_array_equal(s.values, f32(1.0, 2.0, 3.0))
    np.testing.assert_array_equal(s.to_dense(), [[1, 0, 2], [0, 0, 3]])
    empty = SparseTensor.from_positions((4,), [], [])
    assert empty.nnz == 0 and empty.nbytes == 0 and empty.density == 0.0
    np.testing.assert_array_equal(empty.to_dense(fill=7.0), [7.0] * 4)


# ------------------------------------------------------------------------------------------------
# validation


def test_constructors_reject_bad_inputs_naming_the_values():
    a = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"mask has shape \(3, 2\) but the array has shape \(2, 3\)"):
        SparseTensor.from_dense(a, np.zeros((3, 2), bool))
    with pytest.raises(ValueError, match="mask must be boolean, got dtype float64; pass e.g. mask != 0"):
        SparseTensor.from_dense(a, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="encoding must be 'auto', 'indices' or 'bitmap', got 'csr'"):
        SparseTensor.from_dense(a, np.zeros((2, 3), bool), encoding="csr")
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 6\) for shape \(2, 3\), got out-of-range "
                                         r"positions \[6, -1\]"):
        SparseTensor.from_positions((2, 3), [6, 1, -1], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"positions must be unique, got repeated positions \[2\]"):
        SparseTensor.from_positions((2, 3), [2, 0, 2], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="got 2 values for 3 positions"):
        SparseTensor.from_positions((2, 3), [0, 1, 2], [1.0, 2.0])
    with pytest.raises(ValueError, match="positions must be integers, got dtype float64"):
        SparseTensor.from_positions((2, 3), [0.0, 1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"shape must be a tuple of non-negative ints, got \(2, -3\)"):
        SparseTensor.from_positions((2, -3), [0], [1.0])


def test_direct_construction_is_validated():
    with pytest.raises(ValueError, match="strictly ascending, got 3 then 1 at offsets 1 and 2"):
        SparseTensor((5,), np.zeros(3), np.array([0, 3, 1]), "indices")
    with pytest.raises(ValueError, match=r"got 2 values for 3 positions \(encoding 'indices'\)"):
        SparseTensor((5,), np.zeros(2), np.array([0, 1, 2]), "indices")
    with pytest.raises(ValueError, match=r"must be a uint8 array of shape \(2,\).*got dtype uint8 and shape \(1,\)"):
        SparseTensor((10,), np.zeros(1), np.array([128], np.uint8), "bitmap")
    # 10 entries leave the 6 lowest bits of byte 1 as padding; 1 sets one of them
    with pytest.raises(ValueError, match="last byte 1 sets padding bits beyond the 10 entries"):
        SparseTensor((10,), np.zeros(2), np.array([128, 1], np.uint8), "bitmap")
    with pytest.raises(ValueError, match=r"got 1 values for 2 positions \(encoding 'bitmap'\)"):
        SparseTensor((10,), np.zeros(1), np.array([128, 64], np.uint8), "bitmap")
    with pytest.raises(ValueError, match="encoding must be 'indices' or 'bitmap', got 'dense'"):
        SparseTensor((10,), np.zeros(1), np.array([1]), "dense")
    s = SparseTensor((5,), f32(1, 2), np.array([1, 4], np.int64), "indices")
    assert s.index.dtype == np.int32  # positions are stored in the canonical dtype
    with pytest.raises(ValueError, match=r"fill has shape \(4,\) but the sparse tensor has shape \(5,\)"):
        s.to_dense(fill=np.zeros(4))


# ------------------------------------------------------------------------------------------------
# pickling


def test_pickle_is_compact_and_round_trips():
    n = 1_000_000
    a = np.arange(n, dtype=np.float32)
    s = SparseTensor.from_dense(a, a % 2 == 0)  # 500,000 kept: bitmap (125,000 B) beats 2,000,000 B of int32
    assert s.encoding == "bitmap"
    assert s.nbytes == 500_000 * 4 + 125_000 == 2_125_000
    blob = pickle.dumps(s, protocol=5)
    assert s.nbytes < len(blob) < s.nbytes + 1_000
    assert len(blob) < 0.55 * a.nbytes  # the dense tensor is 4,000,000 B
    back = pickle.loads(blob)
    assert back.shape == s.shape and back.encoding == "bitmap" and back.dtype == np.float32
    np.testing.assert_array_equal(back.values, s.values)
    np.testing.assert_array_equal(back.index, s.index)


def test_unpickling_validates_again():
    s = SparseTensor.from_positions((5,), [1, 3], [1.0, 2.0])
    s.values = np.zeros(3)  # tampered with after construction
    blob = pickle.dumps(s, protocol=5)
    with pytest.raises(ValueError, match="got 3 values for 2 positions"):
        pickle.loads(blob)


# ------------------------------------------------------------------------------------------------
# wire_nbytes, is_sparse, densify


def test_wire_nbytes_on_each_kind():
    dense = np.zeros((2, 5), np.float32)
    sparse = SparseTensor.from_dense(np.ones(100, np.float32), first(3))  # 12 + 12
    packed = PackedTensors(np.arange(5.0), (("w", 0, (2, 2)), ("b", 4, (1,))))
    assert wire_nbytes(dense) == 40
    assert wire_nbytes(sparse) == 24
    assert wire_nbytes(packed) == 40  # its one buffer, not a sum over views
    assert wire_nbytes(None) == 0
    assert wire_nbytes({}) == 0
    assert wire_nbytes({"d": dense, "s": sparse, "nested": {"p": packed, "none": None}}) == 40 + 24 + 40
    assert wire_nbytes(np.float32(1.0)) == 4
    with pytest.raises(TypeError, match="builtins.int"):
        wire_nbytes(3)
    with pytest.raises(TypeError, match="builtins.list"):
        wire_nbytes({"w": [1.0, 2.0]})


def test_is_sparse_and_densify():
    s = SparseTensor.from_positions((3,), [1], f32(5.0))
    b = np.ones(2)
    assert is_sparse(s) and not is_sparse(b) and not is_sparse(None)
    out = densify({"w": s, "b": b})
    assert list(out) == ["w", "b"] and out["b"] is b
    np.testing.assert_array_equal(out["w"], f32(0, 5, 0))
    out = densify({"w": s, "b": b}, fill={"w": np.array([7.0, 8.0, 9.0])})
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["w"], f32(7, 5, 9))
    with pytest.raises(ValueError, match=r"fill has no entry for sparse tensor 'w' \(fill holds \['b'\]\)"):
        densify({"w": s}, fill={"b": b})


# ------------------------------------------------------------------------------------------------
# StreamingMean with sparse values


def _three_overlapping() -> StreamingMean:
    s = StreamingMean()
    s.add({"w": SparseTensor.from_positions((5,), [0, 1, 2], f32(2, 4, 6), encoding="bitmap")}, 1)
    s.add({"w": SparseTensor.from_positions((5,), [2, 1], f32(10, 8), encoding="indices")}, 3)
    s.add({"w": SparseTensor.from_positions((5,), [2, 3], f32(1, 5))}, 4)
    return s


def test_streaming_mean_of_overlapping_sparse_uploads():
    s = _three_overlapping()
    # j=0: 1*2/1 = 2 ; j=1: (1*4 + 3*8)/(1+3) = 7 ; j=2: (1*6 + 3*10 + 4*1)/(1+3+4) = 40/8 = 5
    # j=3: 4*5/4 = 5 ; j=4: held by nobody -> fallback 9.5
    np.testing.assert_array_equal(s.coverage("w"), [1, 4, 8, 4, 0])
    out = s.result(fallback={"w": np.array([0, 0, 0, 0, 9.5])})
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["w"], f32(2, 7, 5, 5, 9.5))
    assert s.count == 3 and s.total_weight == 8.0
    with pytest.raises(ValueError, match=r"held by no update of positive weight \('w': 1 of 5\)"):
        s.result()
    with pytest.raises(ValueError, match=r"fallback for 'w' has shape \(4,\) but the tensor has shape \(5,\)"):
        s.result(fallback={"w": np.zeros(4)})


@pytest.mark.parametrize("sparse_first", [False, True])
def test_streaming_mean_of_dense_and_sparse_mixed(sparse_first):
    dense = {"w": np.array([[1.0, 2.0], [3.0, 4.0]]), "b": np.array([1.0])}
    sparse = {"w": SparseTensor.from_positions((2, 2), [0, 3], [5.0, 8.0]), "b": np.array([5.0])}
    s = StreamingMean()
    for upd, w in ([(sparse, 3), (dense, 1)] if sparse_first else [(dense, 1), (sparse, 3)]):
        s.add(upd, w)
    # w[0,0] = (1 + 3*5)/4 = 4 ; w[0,1] = 2/1 ; w[1,0] = 3/1 ; w[1,1] = (4 + 3*8)/4 = 7 ; b = (1 + 15)/4 = 4
    out = s.result()
    np.testing.assert_array_equal(out["w"], [[4.0, 2.0], [3.0, 7.0]])
    np.testing.assert_array_equal(out["b"], [4.0])
    np.testing.assert_array_equal(s.coverage("w"), [[4, 1], [1, 4]])
    np.testing.assert_array_equal(s.coverage("b"), [4.0])
    assert set(s._coverage) == {"w"}  # the dense-only key keeps one scalar weight


def test_streaming_mean_sparse_after_packed_updates():
    s = StreamingMean()
    s.add(PackedTensors(f32(1, 2, 3), (("w", 0, (2,)), ("b", 2, (1,)))), 1)
    np.testing.assert_array_equal(s.coverage("w"), [1, 1])
    assert s._flat is not None  # coverage() does not leave the packed fast path
    s.add({"w": SparseTensor.from_positions((2,), [1], f32(10))}, 1)
    # w = [1/1, (2 + 10)/2] ; b = 3/1
    out = s.result()
    np.testing.assert_array_equal(out["w"], f32(1, 6))
    np.testing.assert_array_equal(out["b"], f32(3))
    np.testing.assert_array_equal(s.coverage("w"), [1, 2])
    with pytest.raises(KeyError, match=r"no update held tensor 'x'; keys seen: \['w', 'b'\]"):
        s.coverage("x")


def test_streaming_mean_sparse_integer_dtype_rounds_and_fallback_is_cast():
    s = StreamingMean()
    s.add({"n": SparseTensor.from_positions((3,), [0], np.array([1], np.int64))}, 1)
    s.add({"n": SparseTensor.from_positions((3,), [0, 1], np.array([2, 4], np.int64))}, 2)
    # n[0] = (1 + 2*2)/3 = 1.67 -> 2 ; n[1] = 2*4/2 = 4 ; n[2] uncovered -> fallback 7
    out = s.result(fallback={"n": np.array([0.0, 0.0, 7.0])})
    assert out["n"].dtype == np.int64
    np.testing.assert_array_equal(out["n"], [2, 4, 7])


def test_streaming_mean_zero_weight_holders_take_the_fallback():
    s = StreamingMean()
    s.add({"w": SparseTensor.from_positions((3,), [0, 1], [1.0, 2.0]), "d": np.array([5.0])}, 0)
    s.add({"w": SparseTensor.from_positions((3,), [1], [4.0])}, 2)
    np.testing.assert_array_equal(s.coverage("w"), [0, 2, 0])
    with pytest.raises(ValueError, match=r"keys \['d'\] were only held by updates of weight 0"):
        s.result(fallback={"w": np.zeros(3)})
    out = s.result(fallback={"w": np.array([7.0, 8.0, 9.0]), "d": np.array([6.0])})
    np.testing.assert_array_equal(out["w"], [7.0, 4.0, 9.0])
    np.testing.assert_array_equal(out["d"], [6.0])


def test_a_failing_add_leaves_the_accumulator_unchanged():
    s = _three_overlapping()
    s.add({"b": np.array([1.0, 2.0])}, 1)
    before = (s.result(fallback={"w": np.zeros(5)}), s.coverage("w"), s.count, s.total_weight)
    bad_updates = [
        # the valid sparse entry comes first, so a half-done add would show
        {"w": SparseTensor.from_positions((5,), [4], f32(100)), "b": np.zeros(3)},
        {"b": np.array([9.0, 9.0]), "w": SparseTensor.from_positions((6,), [4], f32(100))},
        {"w": SparseTensor.from_positions((5,), [4], f32(100)), "s": np.array(["x"])},
    ]
    for bad in bad_updates:
        with pytest.raises(ValueError, match="shape|dtype"):
            s.add(bad, 1)
    after = (s.result(fallback={"w": np.zeros(5)}), s.coverage("w"), s.count, s.total_weight)
    np.testing.assert_array_equal(after[0]["w"], before[0]["w"])
    np.testing.assert_array_equal(after[0]["b"], before[0]["b"])
    assert list(after[0]) == ["w", "b"]
    np.testing.assert_array_equal(after[1], before[1])
    assert after[2:] == before[2:] == (4, 9.0)


def test_a_failing_add_keeps_the_packed_fast_path():
    s = StreamingMean()
    s.add(PackedTensors(f32(1, 2), (("w", 0, (2,)),)), 1)
    with pytest.raises(ValueError, match=r"'w' has shape \(3,\) in this update but shape \(2,\)"):
        s.add({"w": SparseTensor.from_positions((3,), [0], f32(1))}, 1)
    assert s._flat is not None and s.count == 1
    s.add(PackedTensors(f32(3, 6), (("w", 0, (2,)),)), 3)
    assert s._flat is not None
    np.testing.assert_array_equal(s.result()["w"], f32(2.5, 5.0))  # (1 + 9)/4, (2 + 18)/4


def test_holder_mean_accepts_sparse_values():
    ups = [{"w": np.array([1.0, 2.0])}, {"w": SparseTensor.from_positions((2,), [1], [8.0])}]
    np.testing.assert_array_equal(holder_mean(ups, [1, 1])["w"], [1.0, 5.0])  # [1/1, (2 + 8)/2]
    with pytest.raises(ValueError, match=r"'w': 1 of 2"):
        holder_mean([{"w": SparseTensor.from_positions((2,), [1], [8.0])}])
