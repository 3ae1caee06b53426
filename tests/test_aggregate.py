"""Exact-value tests for rayfed.aggregate: every expectation below is computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from rayfed import aggregate as agg
from rayfed.aggregate import (
    StreamingMean,
    flatten,
    holder_mean,
    sparse_mean,
    unflatten,
    weighted_mean,
)


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# weighted_mean


def test_weighted_mean_hand_computed():
    # (1*1 + 3*3) / 4 = 2.5 ; (1*2 + 3*6) / 4 = 5.0
    out = weighted_mean([np.array([1.0, 2.0]), np.array([3.0, 6.0])], [1, 3])
    np.testing.assert_array_equal(out, [2.5, 5.0])


def test_weighted_mean_defaults_to_equal_weights():
    out = weighted_mean([np.array([1.0, 2.0]), np.array([3.0, 6.0])])
    np.testing.assert_array_equal(out, [2.0, 4.0])


def test_weighted_mean_keeps_float32_and_shape():
    out = weighted_mean([f32(1, 2, 3, 4).reshape(2, 2), f32(3, 6, 5, 0).reshape(2, 2)], [1, 3])
    assert out.dtype == np.float32
    assert out.shape == (2, 2)
    # (1+9)/4, (2+18)/4, (3+15)/4, (4+0)/4
    np.testing.assert_array_equal(out, f32(2.5, 5.0, 4.5, 1.0).reshape(2, 2))


def test_weighted_mean_accumulates_in_float64():
    arrays = [f32(1e8), f32(1.0), f32(-1e8)]
    # In float32, 1e8 + 1 rounds back to 1e8 (spacing 8), so a float32 sum would give 0.
    naive = (arrays[0] + arrays[1]) + arrays[2]
    assert naive[0] == 0.0
    out = weighted_mean(arrays)
    assert out.dtype == np.float32
    assert out[0] == np.float32(1.0 / 3.0)


def test_weighted_mean_integer_inputs_give_float64():
    out = weighted_mean([np.array([1]), np.array([2])])
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [1.5])


@pytest.mark.parametrize("weights", [[0, 0], [-1, -2], [2, -1], [1, float("nan")]])
def test_weighted_mean_rejects_bad_weights_naming_them(weights):
    with pytest.raises(ValueError, match="weights must be finite") as err:
        weighted_mean([np.ones(2), np.ones(2)], weights)
    assert str([float(w) for w in weights]) in str(err.value)


def test_weighted_mean_errors():
    with pytest.raises(ValueError, match="at least one array"):
        weighted_mean([])
    with pytest.raises(ValueError, match="got 1 weights for 2 arrays"):
        weighted_mean([np.ones(2), np.ones(2)], [1])
    with pytest.raises(ValueError, match=r"array 1 has shape \(3,\), but array 0 has shape \(2,\)"):
        weighted_mean([np.ones(2), np.ones(3)])


# ------------------------------------------------------------------------------------------------
# StreamingMean and holder_mean


def test_streaming_mean_hand_computed_and_equals_batch_mean():
    s = StreamingMean()
    s.add({"w": np.array([1.0, 2.0])}, 1)
    s.add({"w": np.array([3.0, 6.0])}, 3)
    np.testing.assert_array_equal(s.result()["w"], [2.5, 5.0])
    assert s.count == 2
    assert s.total_weight == 4.0


def test_streaming_mean_is_bitwise_the_batch_mean():
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(5)]
    weights = [3.0, 1.0, 7.0, 2.0, 5.0]
    s = StreamingMean()
    for a, w in zip(arrays, weights, strict=True):
        s.add({"w": a}, w)
    out = s.result()["w"]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, weighted_mean(arrays, weights))
    np.testing.assert_array_equal(out, holder_mean([{"w": a} for a in arrays], weights)["w"])


def test_streaming_mean_averages_each_key_over_its_holders():
    s = StreamingMean()
    s.add({"w": np.array([1.0]), "head": np.array([10.0])}, 1)
    s.add({"w": np.array([3.0])}, 1)
    s.add({"w": np.array([5.0]), "head": np.array([20.0])}, 3)
    out = s.result()
    assert list(out) == ["w", "head"]
    # w: (1*1 + 1*3 + 3*5) / (1+1+3) = 19/5 ; head held by 2 of 3: (1*10 + 3*20) / (1+3) = 70/4
    np.testing.assert_array_equal(out["w"], [3.8])
    np.testing.assert_array_equal(out["head"], [17.5])
    assert s.count == 3
    assert s.total_weight == 5.0


def test_streaming_mean_returns_only_seen_keys():
    assert StreamingMean().result() == {}
    s = StreamingMean()
    s.add({"a": np.zeros(1)}, 1)
    s.add({"b": np.ones(2)}, 1)
    out = s.result()
    assert set(out) == {"a", "b"}
    np.testing.assert_array_equal(out["b"], [1.0, 1.0])


def test_streaming_mean_casts_to_first_seen_dtype():
    s = StreamingMean()
    s.add({"w": f32(1.0), "steps": np.array([1], dtype=np.int64)}, 1)
    s.add({"w": np.array([2.0]), "steps": np.array([2], dtype=np.int64)}, 2)
    out = s.result()
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["w"], f32(5.0 / 3.0))
    # (1 + 2*2)/3 = 1.67 rounds to 2, not truncated to 1
    assert out["steps"].dtype == np.int64
    np.testing.assert_array_equal(out["steps"], [2])


def test_streaming_mean_is_deterministic_given_order():
    rng = np.random.default_rng(1)
    ups = [{"w": rng.normal(size=10)} for _ in range(6)]
    ws = rng.uniform(1, 10, size=6)

    def run():
        s = StreamingMean()
        for u, w in zip(ups, ws, strict=True):
            s.add(u, w)
        return s.result()["w"]

    np.testing.assert_array_equal(run(), run())


def test_streaming_mean_shape_mismatch_names_key_and_shapes():
    s = StreamingMean()
    s.add({"w": np.zeros(2), "b": np.zeros(1)}, 1)
    with pytest.raises(ValueError, match=r"'w' has shape \(3,\) in this update but shape \(2,\)"):
        s.add({"b": np.ones(1), "w": np.zeros(3)}, 1)
    # nothing from the rejected update was added
    assert s.count == 1
    np.testing.assert_array_equal(s.result()["b"], [0.0])


def test_streaming_mean_weight_errors():
    s = StreamingMean()
    with pytest.raises(ValueError, match="non-negative, got -1"):
        s.add({"w": np.zeros(1)}, -1)
    s.add({"w": np.zeros(1)}, 0)
    with pytest.raises(ValueError, match=r"keys \['w'\] were only held by updates of weight 0"):
        s.result()


def test_holder_mean_matches_hand_computed_and_errors():
    out = holder_mean([{"w": f32(1, 2)}, {"w": f32(3, 6), "h": f32(5)}], weights=[1, 3])
    np.testing.assert_array_equal(out["w"], f32(2.5, 5.0))
    np.testing.assert_array_equal(out["h"], f32(5.0))
    with pytest.raises(ValueError, match="at least one update"):
        holder_mean([])
    with pytest.raises(ValueError, match="got 1 weights for 2 updates"):
        holder_mean([{"w": f32(1)}, {"w": f32(2)}], [1])


# ------------------------------------------------------------------------------------------------
# sparse_mean (FedSpa)


def test_sparse_mean_overlapping_masks_and_uncovered_coordinate():
    values = [f32(1, 2, 3, 4), f32(5, 6, 7, 8), f32(9, 10, 11, 12)]
    masks = [
        np.array([True, True, False, False]),
        np.array([False, True, True, False]),
        np.array([False, True, False, False]),
    ]
    # coord 0: only client 0 -> 1 ; coord 1: all, weights 1,1,2 -> (2 + 6 + 2*10)/4 = 7
    # coord 2: only client 1 -> 7 ; coord 3: nobody -> fallback
    out = sparse_mean(values, masks, weights=[1, 1, 2], fallback=f32(0, 0, 0, 100))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, f32(1, 7, 7, 100))
    np.testing.assert_array_equal(sparse_mean(values, masks, weights=[1, 1, 2]), f32(1, 7, 7, 0))


def test_sparse_mean_ignores_values_off_the_mask():
    values = [np.array([2.0, np.nan]), np.array([np.inf, 4.0])]
    masks = [np.array([1, 0]), np.array([0, 1])]
    np.testing.assert_array_equal(sparse_mean(values, masks), [2.0, 4.0])


def test_sparse_mean_equals_dense_mean_with_full_masks():
    values = [np.array([1.0, 2.0]), np.array([3.0, 6.0])]
    masks = [np.ones(2, bool), np.ones(2, bool)]
    np.testing.assert_array_equal(sparse_mean(values, masks, [1, 3]), [2.5, 5.0])


def test_sparse_mean_errors():
    with pytest.raises(ValueError, match="got 1 masks for 2 value arrays"):
        sparse_mean([np.ones(2), np.ones(2)], [np.ones(2, bool)])
    with pytest.raises(ValueError, match=r"client 1 has values of shape \(2,\) and mask of shape"):
        sparse_mean([np.ones(2), np.ones(2)], [np.ones(2, bool), np.ones(3, bool)])


# ------------------------------------------------------------------------------------------------
# flatten / unflatten


def test_flatten_unflatten_round_trip():
    like = {"a": f32(1, 2, 3, 4).reshape(2, 2), "b": np.array([5, 6], dtype=np.int32)}
    vec = flatten(like, ["b", "a"])
    assert vec.dtype == np.float64
    np.testing.assert_array_equal(vec, [5, 6, 1, 2, 3, 4])
    back = unflatten(vec, like, ["b", "a"])
    assert list(back) == ["b", "a"]
    for k, template in like.items():
        assert back[k].dtype == template.dtype
        np.testing.assert_array_equal(back[k], template)
    with pytest.raises(ValueError, match=r"missing tensors \['c'\]"):
        flatten(like, ["a", "c"])
    with pytest.raises(ValueError, match=r"vec has shape \(5,\), expected \(6,\)"):
        unflatten(np.zeros(5), like, ["a", "b"])


def test_all_is_sorted():
    assert agg.__all__ == sorted(agg.__all__)
