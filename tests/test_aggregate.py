"""Exact-value tests for rayfed.aggregate: every expectation below is computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from rayfed import aggregate as agg
from rayfed.aggregate import (
    ROBUST_RULES,
    StreamingMean,
    bucketing,
    centered_clipping,
    coordinate_median,
    flatten,
    holder_mean,
    krum,
    robust_aggregate,
    sparse_mean,
    trimmed_mean,
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
# coordinate_median and trimmed_mean


def test_median_odd_n():
    X = np.array([[1.0, 5.0], [2.0, 0.0], [1000.0, 1.0]])
    np.testing.assert_array_equal(coordinate_median(X), [2.0, 1.0])


def test_median_even_n_averages_middle_values():
    X = np.array([[1.0, 4.0], [2.0, 3.0], [3.0, 2.0], [1000.0, 1.0]])
    # sorted col 0: 1,2,3,1000 -> (2+3)/2 ; col 1: 1,2,3,4 -> (2+3)/2
    np.testing.assert_array_equal(coordinate_median(X), [2.5, 2.5])


def test_median_with_ties_and_dtype():
    np.testing.assert_array_equal(coordinate_median(np.array([[1.0], [1.0], [5.0]])), [1.0])
    out = coordinate_median(np.array([[2], [2], [2], [9]], dtype=np.float32))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, f32(2.0))


def test_median_rejects_non_matrix():
    with pytest.raises(ValueError, match=r"shape \(n_clients, d\).*got shape \(3,\)"):
        coordinate_median(np.ones(3))


TRIM_X = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0], [1000.0, -1000.0]])


def test_trimmed_mean_int_trim():
    # col 0 sorted 1,2,3,4,1000 -> mean(2,3,4) = 3 ; col 1 sorted -1000,10,20,30,40 -> 20
    np.testing.assert_array_equal(trimmed_mean(TRIM_X, 1), [3.0, 20.0])


def test_trimmed_mean_fraction_trim():
    # b = floor(0.25 * 5) = 1
    np.testing.assert_array_equal(trimmed_mean(TRIM_X, 0.25), [3.0, 20.0])
    # b = floor(0.1 * 5) = 0 -> plain mean: (1+2+3+4+1000)/5, (10+20+30+40-1000)/5
    np.testing.assert_array_equal(trimmed_mean(TRIM_X, 0.1), [202.0, -180.0])
    np.testing.assert_array_equal(trimmed_mean(TRIM_X, 0), [202.0, -180.0])


def test_trimmed_mean_too_much_trimmed():
    X = np.arange(4.0).reshape(4, 1)
    with pytest.raises(ValueError, match="n=4, b=2"):
        trimmed_mean(X, 2)
    with pytest.raises(ValueError, match=r"must be in \[0, 0.5\), got 0.5"):
        trimmed_mean(X, 0.5)
    with pytest.raises(ValueError, match="must be >= 0, got -1"):
        trimmed_mean(X, -1)
    with pytest.raises(TypeError, match="int count or a float fraction"):
        trimmed_mean(X, "1")


# ------------------------------------------------------------------------------------------------
# Krum and multi-Krum

# Points 0, 1, 3, 6 on the x-axis and an outlier at (100, 100); n=5, f=1 -> n-f-2 = 2 neighbours.
KRUM_X = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [6.0, 0.0], [100.0, 100.0]])
# squared distances: 0:{1,9,36,20000} 1:{1,4,25,19801} 3:{9,4,9,19409} 6:{36,25,9,18836}
KRUM_SCORES = [1 + 9, 1 + 4, 4 + 9, 9 + 25, 18836 + 19409]


def test_krum_scores_hand_computed():
    np.testing.assert_array_equal(agg._krum_scores(KRUM_X, 1), KRUM_SCORES)


def test_krum_selects_lowest_score():
    np.testing.assert_array_equal(krum(KRUM_X, num_byzantine=1), [1.0, 0.0])


def test_multi_krum_averages_lowest_scores():
    # scores 10, 5, 13, 34, 38245: the 2 best are rows 1, 0 ; the 3 best add row 2
    np.testing.assert_array_equal(krum(KRUM_X, 1, multi=2), [0.5, 0.0])
    np.testing.assert_allclose(krum(KRUM_X, 1, multi=3), [4.0 / 3.0, 0.0], rtol=0, atol=1e-15)


def test_krum_ties_break_by_lowest_index():
    # unit square plus an outlier: every corner scores 1 + 1 = 2 with n-f-2 = 2 neighbours
    X = np.array([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [10.0, 10.0]])
    np.testing.assert_array_equal(agg._krum_scores(X, 1)[:4], [2.0, 2.0, 2.0, 2.0])
    np.testing.assert_array_equal(krum(X, 1), [1.0, 1.0])
    np.testing.assert_array_equal(krum(X, 1, multi=2), [0.5, 0.5])


def test_krum_errors():
    with pytest.raises(ValueError, match="n=3, f=1"):
        krum(np.zeros((3, 2)), 1)
    with pytest.raises(ValueError, match=r"multi must be in \[1, n=5\], got 6"):
        krum(KRUM_X, 1, multi=6)


# ------------------------------------------------------------------------------------------------
# centered clipping


def test_centered_clipping_one_iteration():
    X = np.array([[3.0, 4.0], [0.0, 0.0]])
    # x0 - 0 = (3,4), norm 5 -> clipped to (0.6, 0.8) ; x1 - 0 = 0 -> 0 ; mean (0.3, 0.4)
    np.testing.assert_allclose(centered_clipping(X, np.zeros(2), tau=1.0), [0.3, 0.4], atol=1e-15)


def test_centered_clipping_two_iterations():
    X = np.array([[3.0, 4.0], [0.0, 0.0]])
    # iter 2 from v=(0.3,0.4): x0 - v = (2.7,3.6), norm 4.5 -> (0.6,0.8) ; x1 - v = (-0.3,-0.4),
    # norm 0.5 < tau, kept ; mean (0.15, 0.2) -> v = (0.45, 0.6)
    out = centered_clipping(X, np.zeros(2), tau=1.0, iters=2)
    np.testing.assert_allclose(out, [0.45, 0.6], atol=1e-15)


def test_centered_clipping_large_tau_is_the_mean_and_center_is_not_mutated():
    X = np.array([[3.0, 4.0], [0.0, 0.0]])
    center = np.array([1.0, 1.0])
    np.testing.assert_allclose(centered_clipping(X, center, tau=100.0), [1.5, 2.0], atol=1e-15)
    np.testing.assert_array_equal(center, [1.0, 1.0])


def test_centered_clipping_errors():
    X = np.zeros((2, 2))
    with pytest.raises(ValueError, match="tau must be a finite positive radius, got 0"):
        centered_clipping(X, np.zeros(2), tau=0)
    with pytest.raises(ValueError, match="iters must be an int >= 1, got 0"):
        centered_clipping(X, np.zeros(2), tau=1, iters=0)
    with pytest.raises(ValueError, match=r"center must have shape \(2,\)"):
        centered_clipping(X, np.zeros(3), tau=1)


# ------------------------------------------------------------------------------------------------
# bucketing


def test_bucketing_matches_manual_shuffle_with_same_seed():
    X = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0], [5.0, 50.0]])
    seen = []

    def capture(Y):
        seen.append(Y)
        return coordinate_median(Y)

    out = bucketing(X, 2, capture, np.random.default_rng(7))
    perm = np.random.default_rng(7).permutation(5)
    shuffled = X[perm]
    manual = np.stack([shuffled[0:2].mean(0), shuffled[2:4].mean(0), shuffled[4:5].mean(0)])
    np.testing.assert_array_equal(seen[0], manual)  # 3 buckets, the last holding one row
    np.testing.assert_array_equal(out, np.median(manual, axis=0))


def test_bucketing_seed_free_cases():
    X = np.array([[1.0], [2.0], [6.0]])
    rng = np.random.default_rng(0)
    # one bucket of all rows: the mean (1+2+6)/3 = 3 whatever the shuffle
    np.testing.assert_array_equal(bucketing(X, 3, coordinate_median, rng), [3.0])
    # buckets of one: the rule on the rows themselves
    np.testing.assert_array_equal(bucketing(X, 1, coordinate_median, rng), [2.0])
    with pytest.raises(ValueError, match="bucket_size must be an int >= 1, got 0"):
        bucketing(X, 0, coordinate_median, rng)


# ------------------------------------------------------------------------------------------------
# flatten / unflatten / robust_aggregate


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


def _updates():
    return [
        {"a": f32(1, 2, 3, 4).reshape(2, 2), "b": f32(0, 10)},
        {"a": f32(3, 6, 5, 0).reshape(2, 2), "b": f32(1, 20)},
        {"a": f32(2, 2, 2, 2).reshape(2, 2), "b": f32(5, 60)},
    ]


def test_robust_aggregate_mean_round_trip():
    out = robust_aggregate(_updates(), "mean", weights=[1, 3, 0])
    assert list(out) == ["a", "b"]
    assert out["a"].dtype == np.float32 and out["a"].shape == (2, 2)
    np.testing.assert_array_equal(out["a"], f32(2.5, 5.0, 4.5, 1.0).reshape(2, 2))
    np.testing.assert_array_equal(out["b"], f32(0.75, 17.5))


def test_robust_aggregate_median_round_trip():
    out = robust_aggregate(_updates(), "median")
    np.testing.assert_array_equal(out["a"], f32(2, 2, 3, 2).reshape(2, 2))
    np.testing.assert_array_equal(out["b"], f32(1, 20))


def test_robust_aggregate_centered_clipping_center_as_dict():
    ups = [{"w": np.array([3.0, 4.0])}, {"w": np.array([0.0, 0.0])}]
    out = robust_aggregate(ups, "centered_clipping", tau=1.0, iters=2, center={"w": np.zeros(2)})
    np.testing.assert_allclose(out["w"], [0.45, 0.6], atol=1e-15)


def test_robust_aggregate_unknown_rule_lists_valid_rules():
    with pytest.raises(ValueError, match="unknown aggregation rule 'avg'") as err:
        robust_aggregate(_updates(), "avg")
    for name in ROBUST_RULES:
        assert name in str(err.value)


def test_robust_aggregate_option_errors():
    ups = _updates()
    with pytest.raises(ValueError, match=r"update 1 has keys .*missing \['b'\], extra \['c'\]"):
        robust_aggregate([ups[0], {"a": ups[1]["a"], "c": ups[1]["b"]}], "median")
    with pytest.raises(ValueError, match=r"'b' has shape \(3,\) in update 1 but \(2,\)"):
        robust_aggregate([ups[0], {"a": ups[1]["a"], "b": f32(1, 2, 3)}], "median")
    with pytest.raises(ValueError, match="weights apply only to rule='mean'"):
        robust_aggregate(ups, "median", weights=[1, 1, 1])
    with pytest.raises(ValueError, match="needs a clipping radius"):
        robust_aggregate(ups, "centered_clipping")
    with pytest.raises(ValueError, match="needs a seeded generator"):
        robust_aggregate(ups, "median", bucket_size=2)
    with pytest.raises(ValueError, match="use 'multi_krum'"):
        robust_aggregate(ups, "krum", multi=2)
    with pytest.raises(ValueError, match="at least one update"):
        robust_aggregate([], "median")


def test_robust_aggregate_bucketing_uses_the_given_rng():
    ups = [{"w": np.array([float(v)])} for v in (1, 2, 3, 4, 5, 6)]
    out = robust_aggregate(ups, "median", bucket_size=2, rng=np.random.default_rng(3))
    shuffled = np.array([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]])[
        np.random.default_rng(3).permutation(6)
    ]
    expected = np.median(shuffled.reshape(3, 2).mean(axis=1))
    np.testing.assert_array_equal(out["w"], [expected])


# ------------------------------------------------------------------------------------------------
# Byzantine robustness: one row at 1000 must not move any robust rule far from the honest values

HONEST = np.array([[1.0, 2.0], [1.1, 1.9], [0.9, 2.1], [1.0, 2.05], [1.05, 1.95], [0.95, 2.0]])
BYZANTINE = np.vstack([HONEST, [[1000.0, 1000.0]]])


@pytest.mark.parametrize(
    ("rule", "options"),
    [
        ("median", {}),
        ("trimmed_mean", {"trim": 1}),
        ("krum", {"num_byzantine": 1}),
        ("multi_krum", {"num_byzantine": 1}),
        # clipping settles at honest mean + tau / n_honest toward the outlier: 0.25/6 ~ 0.04
        ("centered_clipping", {"tau": 0.25, "iters": 50}),
        ("median", {"bucket_size": 2}),
        ("trimmed_mean", {"trim": 1, "bucket_size": 2}),
        ("krum", {"num_byzantine": 1, "bucket_size": 2}),
        # 4 bucket means, 3 honest: offset ~ 0.25/3
        ("centered_clipping", {"tau": 0.25, "iters": 50, "bucket_size": 2}),
    ],
)
def test_robust_rules_resist_one_byzantine_row(rule, options):
    ups = [{"w": row.astype(np.float32)} for row in BYZANTINE]
    if options.get("bucket_size"):
        options = {**options, "rng": np.random.default_rng(0)}
    out = robust_aggregate(ups, rule, **options)["w"]
    assert np.linalg.norm(out - HONEST.mean(axis=0)) < 0.2


def test_plain_mean_is_not_robust():
    out = robust_aggregate([{"w": row} for row in BYZANTINE], "mean")["w"]
    assert np.linalg.norm(out - HONEST.mean(axis=0)) > 100


@pytest.mark.parametrize(
    "rule",
    [
        coordinate_median,
        lambda X: trimmed_mean(X, 1),
        lambda X: krum(X, 1),
        lambda X: krum(X, 1, multi=5),
        lambda X: centered_clipping(X, np.median(X, axis=0), tau=1.0, iters=3),
    ],
    ids=["median", "trimmed_mean", "krum", "multi_krum", "centered_clipping"],
)
def test_array_rules_resist_one_byzantine_row(rule):
    assert np.linalg.norm(rule(BYZANTINE) - HONEST.mean(axis=0)) < 0.2


def test_robust_rules_constant_and_sorted_all():
    assert ROBUST_RULES == (
        "mean",
        "median",
        "trimmed_mean",
        "krum",
        "multi_krum",
        "centered_clipping",
    )
    assert agg.__all__ == sorted(agg.__all__)
