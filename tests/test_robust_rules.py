"""Exact-value tests for rayfed.robust_rules (every expectation below is computed by hand), and the
same rules on torch tensors: equal to a numpy reference on the CPU, and on a GPU when one is present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayfed import robust_rules as rr
from rayfed.robust_rules import (
    ROBUST_RULES,
    bucketing,
    centered_clipping,
    coordinate_median,
    krum,
    krum_scores,
    robust_aggregate,
    trimmed_mean,
)


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


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
    np.testing.assert_array_equal(krum_scores(KRUM_X, 1), KRUM_SCORES)


def test_krum_selects_lowest_score():
    np.testing.assert_array_equal(krum(KRUM_X, num_byzantine=1), [1.0, 0.0])


def test_multi_krum_averages_lowest_scores():
    # scores 10, 5, 13, 34, 38245: the 2 best are rows 1, 0 ; the 3 best add row 2
    np.testing.assert_array_equal(krum(KRUM_X, 1, multi=2), [0.5, 0.0])
    np.testing.assert_allclose(krum(KRUM_X, 1, multi=3), [4.0 / 3.0, 0.0], rtol=0, atol=1e-15)


def test_krum_ties_break_by_lowest_index():
    # unit square plus an outlier: every corner scores 1 + 1 = 2 with n-f-2 = 2 neighbours
    X = np.array([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [10.0, 10.0]])
    np.testing.assert_array_equal(krum_scores(X, 1)[:4], [2.0, 2.0, 2.0, 2.0])
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
# robust_aggregate


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
    assert rr.__all__ == sorted(rr.__all__)


# ------------------------------------------------------------------------------------------------
# one implementation on every device: the torch rules against plain numpy references


def _numpy_krum_scores(X: np.ndarray, f: int) -> np.ndarray:
    n = X.shape[0]
    d2 = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    return np.array([np.sort(np.delete(d2[i], i))[: n - f - 2].sum() for i in range(n)])


def _numpy_clipping(X: np.ndarray, center: np.ndarray, tau: float, iters: int) -> np.ndarray:
    v = center.astype(np.float64)
    for _ in range(iters):
        z = X - v
        norms = np.linalg.norm(z, axis=1)
        v = v + np.mean([zi * min(1.0, tau / n) if n > 0 else zi * 0 for zi, n in zip(z, norms)], axis=0)
    return v


@pytest.fixture(params=[(7, 33), (8, 40)], ids=["odd_n", "even_n"])
def cloud(request):
    n, d = request.param
    X = np.random.default_rng(n).normal(size=(n, d))
    X[0] *= 50  # one far row
    return X


def test_median_is_bitwise_numpys(cloud):
    np.testing.assert_array_equal(coordinate_median(cloud), np.median(cloud, axis=0))


def test_rules_match_numpy_references(cloud):
    n = cloud.shape[0]
    b = 2
    np.testing.assert_allclose(trimmed_mean(cloud, b), np.sort(cloud, axis=0)[b:n - b].mean(0), rtol=1e-12, atol=0)
    ref = _numpy_krum_scores(cloud, 2)
    np.testing.assert_allclose(krum_scores(cloud, 2), ref, rtol=1e-12)
    order = np.argsort(ref, kind="stable")
    np.testing.assert_array_equal(krum(cloud, 2), cloud[order[0]])
    np.testing.assert_allclose(krum(cloud, 2, multi=4), cloud[np.sort(order[:4])].mean(0), rtol=1e-12, atol=1e-15)
    center = np.median(cloud, axis=0)
    np.testing.assert_allclose(centered_clipping(cloud, center, tau=0.7, iters=3),
                               _numpy_clipping(cloud, center, 0.7, 3), rtol=1e-12, atol=1e-15)


def test_tensor_input_gives_a_tensor_of_its_dtype_equal_to_the_numpy_result(cloud):
    T = torch.from_numpy(cloud).to(torch.float32)
    X32 = cloud.astype(np.float32)
    for name, rule in [("median", coordinate_median), ("trimmed", lambda A: trimmed_mean(A, 1)),
                       ("krum", lambda A: krum(A, 1)), ("multi_krum", lambda A: krum(A, 1, multi=3)),
                       ("clipping", lambda A: centered_clipping(A, A[1], tau=1.0, iters=2))]:
        out = rule(T)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.device == T.device, name
        np.testing.assert_allclose(out.numpy(), rule(X32), rtol=1e-6, err_msg=name)
    scores = krum_scores(T, 1)
    assert isinstance(scores, torch.Tensor) and scores.dtype == torch.float64
    # in float64, sorting and selection give numpy's bits; the reductions agree to rounding
    T64 = torch.from_numpy(cloud.copy())
    np.testing.assert_array_equal(coordinate_median(T64).numpy(), coordinate_median(cloud))
    np.testing.assert_array_equal(krum(T64, 1).numpy(), krum(cloud, 1))
    np.testing.assert_allclose(krum_scores(T64, 1).numpy(), krum_scores(cloud, 1), rtol=1e-12)
    np.testing.assert_allclose(trimmed_mean(T64, 2).numpy(), trimmed_mean(cloud, 2), rtol=1e-12, atol=1e-15)


def test_bucketing_hands_the_rule_the_callers_kind_of_array(cloud):
    seen = []

    def rule(Y):
        seen.append(type(Y))
        return coordinate_median(Y)

    a = bucketing(cloud, 3, rule, np.random.default_rng(5))
    t = bucketing(torch.from_numpy(cloud), 3, rule, np.random.default_rng(5))
    assert seen == [np.ndarray, torch.Tensor]
    np.testing.assert_array_equal(t.numpy(), a)


def test_integer_and_read_only_input():
    X = np.array([[1, 2], [3, 4], [5, 9]])
    X.setflags(write=False)  # as arrays from Ray's object store arrive
    out = coordinate_median(X)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [3.0, 4.0])
    np.testing.assert_array_equal(X, [[1, 2], [3, 4], [5, 9]])


RULE_OPTIONS = [
    ("median", {}),
    ("trimmed_mean", {"trim": 1}),
    ("krum", {"num_byzantine": 1}),
    ("multi_krum", {"num_byzantine": 1}),
    ("centered_clipping", {"tau": 0.25, "iters": 5}),
    ("median", {"bucket_size": 2}),
]


def _aggregate(rule, options, **device):
    """``robust_aggregate`` of nine updates (one at 1e4), with a fresh seeded generator when bucketing."""
    rows = np.random.default_rng(0).normal(size=(9, 12)).astype(np.float32)
    rows[3] = 1e4
    ups = [{"a": r[:8].reshape(2, 4), "b": r[8:]} for r in rows]
    rng = {"rng": np.random.default_rng(1)} if options.get("bucket_size") else {}
    return robust_aggregate(ups, rule, **options, **rng, **device)


@pytest.mark.parametrize(("rule", "options"), RULE_OPTIONS)
def test_robust_aggregate_device_argument_on_cpu(rule, options):
    host = _aggregate(rule, options)
    same = _aggregate(rule, options, device=torch.device("cpu"))
    for k in host:
        assert isinstance(same[k], np.ndarray) and same[k].dtype == np.float32
        np.testing.assert_array_equal(same[k], host[k])


@pytest.mark.parametrize(("rule", "options"), RULE_OPTIONS)
def test_robust_aggregate_on_cuda(rule, options):
    """On a GPU: the same aggregate as on the CPU (the median and Krum bitwise); without one, the rule
    really is sent to the device asked for, and torch says it has none.
    """
    if not torch.cuda.is_available():
        with pytest.raises((AssertionError, RuntimeError), match="(?i)cuda"):
            _aggregate(rule, options, device="cuda")
        return
    host = _aggregate(rule, options)
    gpu = _aggregate(rule, options, device="cuda")
    for k in host:
        assert isinstance(gpu[k], np.ndarray)
        if rule in ("median", "krum"):
            np.testing.assert_array_equal(gpu[k], host[k])
        else:
            np.testing.assert_allclose(gpu[k], host[k], rtol=1e-6, atol=1e-6)
