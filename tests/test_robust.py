"""Robust aggregation wired for every algorithm, and the SIMULATED Byzantine attacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import small_config
from test_ffgg import pl_config

from rayfed import ConfigError, Federation
from rayfed.algorithms.base import ClientUpdate, MeanAggregator, ServerState
from rayfed.algorithms.ffgg import FFGGAggregator, FFGGConfig
from rayfed.config import AggregationConfig, AttackConfig
from rayfed.data.info import ClientData
from rayfed.robust import Attack, RobustAggregator, byzantine_clients


def _robust(inner_cls, state, kind, values, **cfg):
    inner = inner_cls(state) if inner_cls is MeanAggregator else inner_cls(state, FFGGConfig(server_lr=1.0))
    agg = RobustAggregator(inner, state, AggregationConfig(**cfg), kind=kind, keys=["w"],
                           rng=np.random.default_rng(0))
    for i, v in enumerate(values):
        agg.add(ClientUpdate(i, 0, 10 * (i + 1), {"w": np.asarray(v, np.float32)}))
    return agg.finish()


W0 = {"w": np.array([1.0, 1.0], np.float32)}


def test_median_of_weight_deltas_then_the_algorithms_own_server_step():
    state = ServerState(dict(W0), {}, 0)
    ups = [[2.0, 3.0], [1.0, 5.0], [100.0, -50.0]]  # deltas [1,2], [0,4], [99,-51] -> median [1, 2]
    out = _robust(MeanAggregator, state, "weights", ups, rule="median")
    np.testing.assert_allclose(out.weights["w"], [2.0, 3.0])
    assert out.weights["w"].dtype == np.float32 and out.round == 1
    # the algorithm's server learning rate applies to the consensus: w + 0.5 * median(delta)
    agg = RobustAggregator(MeanAggregator(state, server_lr=0.5), state, AggregationConfig(rule="median"),
                           kind="weights", keys=["w"], rng=np.random.default_rng(0))
    for i, v in enumerate(ups):
        agg.add(ClientUpdate(i, 0, 1, {"w": np.asarray(v, np.float32)}))
    np.testing.assert_allclose(agg.finish().weights["w"], [1.5, 2.0])


def test_even_count_and_ties_in_the_wired_median():
    state = ServerState(dict(W0), {}, 0)
    # deltas per coordinate: [0, 2, 2, 9] -> (2 + 2) / 2 = 2 (tie);  [1, 3, 5, 100] -> (3 + 5) / 2 = 4
    ups = [[1.0, 2.0], [3.0, 4.0], [3.0, 6.0], [10.0, 101.0]]
    out = _robust(MeanAggregator, state, "weights", ups, rule="median")
    np.testing.assert_allclose(out.weights["w"], [3.0, 5.0])


def test_gradient_uploads_are_aggregated_as_sent():
    state = ServerState({"w": np.array([0.0, 0.0], np.float32)}, {}, 0)
    grads = [[1.0, -1.0], [2.0, -2.0], [3.0, 9.0], [4.0, -4.0], [-50.0, 50.0]]
    # trimmed mean, one value off each end: coord 0 [1,2,3] -> 2; coord 1 [-2,-1,9]... sorted
    # [-4,-2,-1,9,50] -> [-2,-1,9] -> 2;  x <- 0 - 1.0 * consensus
    out = _robust(FFGGAggregator, state, "gradient", grads, rule="trimmed_mean", trim=1)
    np.testing.assert_allclose(out.weights["w"], [-2.0, -2.0])
    frac = _robust(FFGGAggregator, state, "gradient", grads, rule="trimmed_mean", trim=0.2)  # floor(0.2*5) = 1
    np.testing.assert_allclose(frac.weights["w"], [-2.0, -2.0])
    # Krum (f=1): n - f - 2 = 2 neighbours; the closest pair of honest gradients wins
    kr = _robust(FFGGAggregator, state, "gradient", [[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [90.0, 90.0]],
                 rule="krum", num_byzantine=1)
    np.testing.assert_allclose(kr.weights["w"], [-1.0, 0.0])
    mk = _robust(FFGGAggregator, state, "gradient", [[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [90.0, 90.0]],
                 rule="multi_krum", num_byzantine=1, multi=3)  # mean of rows 0..2 -> [1, 0]
    np.testing.assert_allclose(mk.weights["w"], [-1.0, 0.0])
    cc = _robust(FFGGAggregator, state, "gradient", [[3.0, 4.0], [0.0, 0.0]], rule="centered_clipping", tau=1.0)
    np.testing.assert_allclose(cc.weights["w"], [-0.3, -0.4], rtol=1e-6)


def test_the_consensus_runs_on_the_servers_device():
    """ServerState.device (runtime.server_device) is where the robust rule runs: with a GPU the result
    is the CPU's; without one, asking for cuda reaches torch, which says it has none.
    """
    ups = [[2.0, 3.0], [1.0, 5.0], [100.0, -50.0]]
    cpu = _robust(MeanAggregator, ServerState(dict(W0), {}, 0), "weights", ups, rule="median")
    on_cuda = ServerState(dict(W0), {}, 0)
    on_cuda.device = "cuda"
    if not torch.cuda.is_available():
        with pytest.raises((AssertionError, RuntimeError), match="(?i)cuda"):
            _robust(MeanAggregator, on_cuda, "weights", ups, rule="median")
        return
    np.testing.assert_array_equal(_robust(MeanAggregator, on_cuda, "weights", ups, rule="median").weights["w"],
                                  cpu.weights["w"])


def test_bucketing_is_seeded_and_matches_the_pure_rule():
    from rayfed.robust_rules import bucketing, coordinate_median

    state = ServerState({"w": np.zeros(1, np.float32)}, {}, 0)
    vals = [[1.0], [2.0], [3.0], [4.0], [100.0], [6.0]]
    expected = bucketing(np.asarray(vals), 2, coordinate_median, np.random.default_rng(0))
    out = _robust(MeanAggregator, state, "weights", vals, rule="median", bucket_size=2)
    np.testing.assert_allclose(out.weights["w"], expected.astype(np.float32))


def test_entries_outside_the_robust_keys_pass_through_per_client():
    seen = []

    class Recorder(MeanAggregator):
        def add(self, update):
            seen.append(update.tensors)
            super().add(update)

    state = ServerState({"w": np.zeros(1, np.float32)}, {}, 0)
    agg = RobustAggregator(Recorder(state), state, AggregationConfig(rule="median"), kind="weights", keys=["w"],
                           rng=np.random.default_rng(0))
    for i, v in enumerate([1.0, 5.0, 9.0]):
        agg.add(ClientUpdate(i, 0, 1, {"w": np.array([v], np.float32), "aux/emb": np.array([float(i)])}))
    agg.finish()
    assert [float(t["w"][0]) for t in seen] == [5.0, 5.0, 5.0]
    assert [float(t["aux/emb"][0]) for t in seen] == [0.0, 1.0, 2.0]


def test_aggregation_config_validation():
    with pytest.raises(ConfigError, match="aggregation.tau"):
        small_config(aggregation__rule="centered_clipping")
    with pytest.raises(ConfigError, match="aggregation.rule"):
        small_config(aggregation__rule="geomed")
    with pytest.raises(ConfigError, match="aggregation.trim"):
        small_config(aggregation__trim=0.7)
    assert not AggregationConfig().robust and AggregationConfig(bucket_size=2).robust


# -- simulated attacks ------------------------------------------------------------------------------
def test_byzantine_set_is_seeded_and_sized():
    a = byzantine_clients(8, AttackConfig(fraction=0.25), seed=3)
    assert len(a) == 2 and a == byzantine_clients(8, AttackConfig(fraction=0.25), seed=3)
    assert byzantine_clients(8, AttackConfig(fraction=0.05), seed=3).__len__() == 1
    assert byzantine_clients(8, AttackConfig(clients=[1, 6]), seed=0) == frozenset({1, 6})
    assert byzantine_clients(8, AttackConfig(), seed=0) == frozenset()


def test_attacks_perturb_the_update_not_raw_weights():
    base = {"w": np.array([1.0, 2.0], np.float32)}
    sent = {"w": np.array([2.0, 2.5], np.float32), "aux/x": np.ones(1)}  # update [1, 0.5]
    flip = Attack(AttackConfig(clients=[0], kind="sign_flip", scale=2.0), 4, 0, 10, "weights")
    np.testing.assert_allclose(flip.poison_upload(0, 1, sent, base)["w"], [-1.0, 1.0])
    assert flip.poison_upload(1, 1, sent, base)["w"] is sent["w"]  # honest client untouched
    grad = Attack(AttackConfig(clients=[0], kind="scale", scale=3.0), 4, 0, 10, "gradient")
    np.testing.assert_allclose(grad.poison_upload(0, 1, {"w": np.array([1.0, -1.0])}, {})["w"], [3.0, -3.0])
    noise = Attack(AttackConfig(clients=[0], kind="noise", noise_std=0.5), 4, 0, 10, "weights")
    a, b = noise.poison_upload(0, 1, sent, base)["w"], noise.poison_upload(0, 1, sent, base)["w"]
    np.testing.assert_array_equal(a, b)  # seeded
    assert not np.allclose(a, sent["w"]) and np.array_equal(noise.poison_upload(0, 1, sent, base)["aux/x"], [1.0])


def test_label_flip_for_classification_and_regression():
    d = ClientData(0, np.zeros((3, 2), np.float32), np.array([0, 1, 9]), np.zeros((1, 2)), np.array([0]))
    att = Attack(AttackConfig(clients=[0], kind="label_flip"), 2, 0, 10, "weights")
    np.testing.assert_array_equal(att.poison_data(0, d).y_train, [9, 8, 0])
    assert att.poison_data(1, d) is d
    r = ClientData(0, d.x_train, np.array([1.5, -2.0, 0.5], np.float32), d.x_test, np.array([0.0], np.float32))
    np.testing.assert_array_equal(att.poison_data(0, r).y_train, [-1.5, 2.0, -0.5])


def test_attack_config_validation():
    with pytest.raises(ConfigError, match="attack.clients"):
        small_config(attack__clients=[0, 6])
    with pytest.raises(ConfigError, match="attack.scale"):
        small_config(attack__fraction=0.2, attack__kind="scale")
    with pytest.raises(ConfigError, match="attack.fraction"):
        small_config(attack__fraction=1.0)


def test_attackers_are_recorded_and_any_algorithm_runs_robustly():
    cfg = small_config(rounds=2, algorithm__name="fedper", aggregation__rule="median", aggregation__bucket_size=2,
                       attack__fraction=0.34, attack__kind="noise")
    res = Federation(cfg, run_dir=False).fit()
    m = res.metrics
    byz = m[(m.metric == "byzantine") & (m.stage == "train")]
    flagged = sorted(byz[byz.value == 1].client_id.unique())
    assert flagged == sorted(byzantine_clients(6, cfg.attack, cfg.seed)) and len(flagged) == 2
    assert set(byz.client_id) == set(range(6))  # honest clients report 0


@pytest.mark.slow
def test_bucketing_median_keeps_ffgg_near_clean_while_the_mean_fails():
    """A quarter of the clients send -3x their gradient (sign flip). Measured on honest clients'
    test MSE (seeds 0-3, 40 rounds, 32 clients): clean FFGG ~7e-13, bucketing(2) + median 3e-6..5e-5,
    plain mean diverges (1.6e10..2.2e11). With 8 clients and buckets of 2, half of the 4 buckets
    are usually contaminated and the median breaks down (measured: 1e6..7e7), hence 32 clients.
    """
    def honest(res):
        m = res.metrics
        byz = set(m[(m.metric == "byzantine") & (m.value == 1)].client_id)
        last = m[(m.stage == "eval") & (m.metric == "loss") & (m["round"] == m["round"].max())]
        return float(last[~last.client_id.isin(byz)].value.mean()), byz

    attack = {"fraction": 0.25, "kind": "sign_flip", "scale": 3.0}
    runs = {}
    for name, agg, att in (("clean", {}, {}), ("mean", {}, attack),
                           ("bucket_median", {"rule": "median", "bucket_size": 2}, attack)):
        cfg = pl_config(rounds=40, num_clients=32, aggregation=agg, attack=att,
                        data={"partial_linear": {"samples_per_client": 200}})
        runs[name] = honest(Federation(cfg, run_dir=False).fit())
    print({k: v[0] for k, v in runs.items()})
    assert len(runs["mean"][1]) == 8
    assert runs["clean"][0] < 1e-6
    assert runs["bucket_median"][0] < 1e-3
    assert runs["mean"][0] > 1e3


# -- the message-adding attack of the FFGG paper's official code ---------------------------------------
def _updates(values):
    return [ClientUpdate(c, 0, 10 + c, {"w": np.asarray(v, np.float32), "aux/e": np.ones(1)}) for c, v in values]


def test_official_attack_adds_floor_b_over_3_negated_honest_updates():
    att = Attack(AttackConfig(fraction=0.25, kind="extra_sign_flip"), 12, 5, 2, "gradient", on_server=True)
    assert [att.num_added(b) for b in range(13)] == [b // 3 for b in range(13)]
    assert att.byzantine == frozenset() and not att.is_byzantine(3)  # every client stays honest
    sent = {"w": np.array([1.0, 2.0], np.float32)}
    assert att.poison_upload(3, 0, sent, {})["w"] is sent["w"]
    honest = _updates([(c, [float(c), -2.0 * c]) for c in (4, 1, 7, 2, 9, 3, 8)])  # 7 updates -> 2 messages
    msgs = att.added_messages(honest, {}, ["w"], round=2, step=5)
    by_id = {u.client_id: u for u in honest}
    assert len(msgs) == 2 and len({m.client_id for m in msgs}) == 2  # two different honest clients
    for m in msgs:
        np.testing.assert_array_equal(m.tensors["w"], -by_id[m.client_id].tensors["w"])  # scale 1, negated
        assert m.num_samples == by_id[m.client_id].num_samples and set(m.tensors) == {"w"}
        assert m.metrics["byzantine"] == 1.0
    again = att.added_messages(list(reversed(honest)), {}, ["w"], round=2, step=5)
    assert [m.client_id for m in again] == [m.client_id for m in msgs]  # seeded, not by arrival order
    other = [att.added_messages(honest, {}, ["w"], round=r, step=5) for r in range(6)]
    assert len({tuple(m.client_id for m in o) for o in other}) > 1  # a new draw each round
    # weight uploads: the negated *update*, relative to the server's weights
    wts = Attack(AttackConfig(fraction=0.5, kind="extra_sign_flip", scale=2.0), 4, 0, 2, "weights", on_server=True)
    base = {"w": np.array([1.0, 1.0], np.float32)}
    (m,) = wts.added_messages(_updates([(0, [3.0, 0.0])]), base, ["w"], round=0, step=0)
    np.testing.assert_allclose(m.tensors["w"], [1.0 - 2.0 * 2.0, 1.0 + 2.0 * 1.0])
    with pytest.raises(ConfigError, match="attack.clients"):
        Attack(AttackConfig(clients=[1], kind="extra_sign_flip"), 4, 0, 2, "gradient", on_server=True)
    with pytest.raises(ConfigError, match="adds messages on the server"):  # never a silent no-op in a cohort
        Attack(AttackConfig(fraction=0.25, kind="extra_sign_flip"), 4, 0, 2, "gradient")


def test_added_messages_reach_the_robust_rule_and_the_mean():
    from rayfed.robust import AddedMessages

    state = ServerState({"w": np.zeros(1, np.float32)}, {}, 0)
    att = Attack(AttackConfig(fraction=0.25, kind="extra_sign_flip"), 3, 0, 2, "gradient", on_server=True)
    honest = [[1.0], [2.0], [4.0]]  # B = 3: one message, -1, -2 or -4; the median of the four is 1.5 in each case

    def run(rule_cfg):
        inner = FFGGAggregator(state, FFGGConfig(server_lr=1.0))
        if rule_cfg:
            inner = RobustAggregator(inner, state, AggregationConfig(**rule_cfg), kind="gradient", keys=["w"],
                                     rng=np.random.default_rng(0))
        agg = AddedMessages(inner, att, state, keys=["w"], round=0, step=0)
        for i, v in enumerate(honest):
            agg.add(ClientUpdate(i, 0, 1, {"w": np.asarray(v, np.float32)}))
        return agg.finish(), agg.metrics()

    med, metrics = run({"rule": "median"})
    np.testing.assert_allclose(med.weights["w"], [-1.5])  # x <- 0 - 1 * median
    assert metrics["byzantine_messages"] == 1.0
    (msg,) = att.added_messages([ClientUpdate(i, 0, 1, {"w": np.asarray(v, np.float32)})
                                 for i, v in enumerate(honest)], {}, ["w"], round=0, step=0)
    mean, _ = run({})  # FFGG's uniform mean of the 3 honest gradients and the message
    np.testing.assert_allclose(mean.weights["w"], [-(7.0 + float(msg.tensors["w"][0])) / 4], rtol=1e-6)


def test_official_attack_runs_end_to_end_on_the_server():
    """Through Federation: the cohorts stay honest, the server adds floor(B/3) messages per round."""
    cfg = pl_config(rounds=3, num_clients=7, aggregation={"rule": "median"},
                    attack={"fraction": 0.25, "kind": "extra_sign_flip"},
                    data={"partial_linear": {"samples_per_client": 20}})
    m = Federation(cfg, run_dir=False).fit().metrics
    added = m[m.metric == "server_byzantine_messages"]
    assert list(added.value) == [2.0] * 3  # 7 honest gradients -> floor(7/3) = 2, every round
    byz = m[(m.metric == "byzantine") & (m.stage == "train")]
    assert len(byz) == 0 or set(byz.value) == {0.0}  # no client attacks
