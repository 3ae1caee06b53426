"""The round pipeline: schedule-aware placement, packed uploads, cached model views, and the Ray
round (streamed aggregation, split training calls, lost quorum, a client actor dying mid-round).
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import small_config

from rayfed import ClientError, register_algorithm
from rayfed.aggregate import PackedTensors, StreamingMean, holder_mean
from rayfed.algorithms import create
from rayfed.algorithms.fedavg import FedAvg, FedAvgConfig
from rayfed.data import FederatedDataset
from rayfed.models.views import forget, named_params, set_mode, tensors
from rayfed.runtime.placement import Workload, assign_clients, balance_groups, plan_for_cluster, round_loads
from rayfed.sampling import client_cost, sample_clients, sampling_schedule


# -- placement ---------------------------------------------------------------------------------
def _work(n: int, k: int, rounds: int, seed: int = 0) -> Workload:
    ids = list(range(n))
    return Workload(sampling_schedule(ids, k, seed, rounds), {c: 1.0 for c in ids})


def test_balanced_groups_split_every_round_evenly_with_equal_sizes():
    work = _work(100, 10, 20)
    groups = balance_groups(range(100), 2, work, seed=0)
    assert sorted(c for g in groups for c in g) == list(range(100))  # disjoint and complete
    assert [len(g) for g in groups] == [50, 50]
    loads = round_loads(groups, work)
    assert loads.max(axis=1).tolist() == [5.0] * 20  # every round 5 + 5
    before = round_loads(assign_clients(range(100), 2), work)
    assert before.max(axis=1).mean() > 5.5  # round-robin leaves it to chance (58% on average)
    assert balance_groups(range(100), 2, work, seed=0) == groups  # deterministic


def test_balancing_weighs_clients_by_their_work_and_never_makes_rounds_worse():
    ids = list(range(40))
    cost = client_cost({c: 10 + 30 * (c % 4) for c in ids}, batch_size=10, local_epochs=1)
    assert cost[0] == 1 and cost[3] == 10
    work = Workload(sampling_schedule(ids, 8, 3, 200), cost)
    groups = balance_groups(ids, 3, work, seed=3)
    assert sorted(len(g) for g in groups) == [13, 13, 14]
    after, before = round_loads(groups, work), round_loads(assign_clients(ids, 3), work)
    assert after.max(axis=1).sum() < before.max(axis=1).sum()


def test_full_participation_balances_the_clients_work():
    cost = {0: 5.0, 1: 1.0, 2: 5.0, 3: 1.0, 4: 1.0, 5: 1.0}
    work = Workload([list(range(6))], cost)
    assert round_loads(assign_clients(range(6), 2), work).tolist() == [[11.0, 3.0]]
    groups = balance_groups(range(6), 2, work)
    assert [len(g) for g in groups] == [3, 3] and round_loads(groups, work).tolist() == [[7.0, 7.0]]


def test_the_schedule_is_capped_by_rounds_and_by_draws(monkeypatch):
    from rayfed import sampling

    assert len(sampling_schedule(range(10), 2, 0, 5000)) == sampling.SCHEDULE_ROUNDS
    monkeypatch.setattr(sampling, "SCHEDULE_DRAWS", 50)
    assert len(sampling_schedule(range(10), 2, 0, 5000)) == 5


def test_without_a_schedule_placement_is_round_robin():
    assert balance_groups(range(7), 2, None) == assign_clients(range(7), 2) == [[0, 2, 4, 6], [1, 3, 5]]
    assert balance_groups(range(7), 1, _work(7, 2, 5)) == [list(range(7))]


def test_cluster_plan_uses_the_schedule():
    cfg = small_config(data__num_clients=20, sample_count=4, rounds=10, runtime__num_actors=2)
    work = _work(20, 4, 10)
    plan = plan_for_cluster(cfg, list(range(20)), 4.0, work)
    assert [p.clients for p in plan.actors] == balance_groups(range(20), 2, work, cfg.seed)
    assert round_loads([p.clients for p in plan.actors], work).max(axis=1).tolist() == [2.0] * 10


def test_sampling_schedule_is_what_the_round_loop_samples():
    ids = [0, 2, 3, 5, 8, 9]
    assert sampling_schedule(ids, 3, 4, 5, start=2) == [sample_clients(ids, 3, 4, r) for r in range(2, 7)]


# -- packed uploads ------------------------------------------------------------------------------
def _packed(rng, layout_shapes, dtype=np.float32) -> tuple[PackedTensors, dict]:
    layout, off = [], 0
    for name, shape in layout_shapes:
        layout.append((name, off, shape))
        off += int(np.prod(shape))
    flat = rng.standard_normal(off).astype(dtype)
    p = PackedTensors(flat, tuple(layout))
    return p, {k: flat[o:o + int(np.prod(s))].reshape(s).copy() for k, o, s in layout}


def test_packed_tensors_is_a_mapping_of_views():
    p = PackedTensors(np.arange(7.0), (("w", 0, (2, 3)), ("b", 6, (1,))))
    assert list(p) == ["w", "b"] and len(p) == 2 and "b" in p and "x" not in p
    np.testing.assert_array_equal(p["w"], [[0, 1, 2], [3, 4, 5]])
    assert p.nbytes == 56 and np.shares_memory(p["w"], p.flat)


def test_streaming_mean_of_packed_updates_is_bitwise_the_per_key_mean():
    rng = np.random.default_rng(0)
    shapes = [("a", (3, 4)), ("b", (4,)), ("c", (2, 2, 2))]
    ups = [_packed(rng, shapes) for _ in range(5)]
    weights = [3.0, 1.0, 7.0, 2.0, 5.0]
    fast, slow = StreamingMean(), StreamingMean()
    for (p, d), w in zip(ups, weights):
        fast.add(p, w)
        slow.add(d, w)
    assert fast._flat is not None  # the vector path was taken
    got, ref = fast.result(), slow.result()
    assert list(got) == list(ref)
    for k in ref:
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], ref[k])
    np.testing.assert_array_equal(got["a"], holder_mean([d for _, d in ups], weights)["a"])


def test_streaming_mean_mixes_packed_other_layouts_and_dicts():
    rng = np.random.default_rng(1)
    p1, d1 = _packed(rng, [("a", (2,)), ("b", (3,))])
    p2, d2 = _packed(rng, [("b", (3,)), ("a", (2,))])  # same keys, other layout
    d3 = {"a": np.array([1.0, 2.0], np.float32), "head": np.array([4.0], np.float32)}
    fast = StreamingMean()
    for t, w in ((p1, 1.0), (p2, 2.0), (d3, 3.0)):
        fast.add(t, w)
    ref = holder_mean([d1, d2, d3], [1.0, 2.0, 3.0])
    got = fast.result()
    assert set(got) == {"a", "b", "head"}
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])
    with pytest.raises(ValueError, match="shape"):
        fast.add(PackedTensors(np.zeros(4, np.float32), (("a", 0, (4,)),)), 1.0)


def test_upload_batch_hands_out_packed_tensors_per_client():
    import pickle

    from rayfed.runtime.ray_executor import _UploadBatch

    rng = np.random.default_rng(2)
    ups = {c: {"w": rng.standard_normal((3, 2)).astype(np.float32),
               "b": rng.standard_normal(2).astype(np.float32)} for c in (4, 1)}
    ups[9] = {"w": np.ones((3, 2), np.float32), "n": np.arange(2)}  # two dtypes: a plain dict
    batch = pickle.loads(pickle.dumps(_UploadBatch(ups), protocol=5))
    for c in (4, 1):
        got = batch.tensors(c)
        assert isinstance(got, PackedTensors) and got.flat.size == 8
        for k, v in ups[c].items():
            np.testing.assert_array_equal(got[k], v)
    assert not isinstance(batch.tensors(9), PackedTensors)
    np.testing.assert_array_equal(batch.tensors(9)["n"], [0, 1])


# -- cached model views --------------------------------------------------------------------------
def test_model_views_are_taken_once_and_track_in_place_writes():
    m = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Dropout(0.1), torch.nn.Linear(3, 1))
    sd = tensors(m)
    assert sd is tensors(m) and list(sd) == list(m.state_dict())
    with torch.no_grad():
        sd["0.weight"].copy_(torch.ones(3, 2))
    assert torch.equal(m[0].weight, torch.ones(3, 2))
    assert [n for n, _ in named_params(m)] == [n for n, _ in m.named_parameters()]
    set_mode(m, False)
    assert not any(x.training for x in m.modules())
    m[1].train()  # one module out of step: the next call fixes it
    set_mode(m, False)
    assert not m[1].training
    m[2] = torch.nn.Linear(3, 2)  # restructured: forget, then the views are new
    forget(m)
    assert tensors(m)["2.weight"].shape == (2, 3)


# -- the Ray round -------------------------------------------------------------------------------
def _frame(res):
    m = res.metrics
    return m[~m.metric.str.endswith("seconds")].reset_index(drop=True)


@pytest.mark.ray
def test_split_training_calls_give_the_same_results(ray_cluster, monkeypatch):
    from rayfed import Federation
    from rayfed.runtime import ray_executor

    base = dict(rounds=3, sample_count=5, data__num_clients=8, runtime__executor="ray", runtime__num_actors=2,
                runtime__num_cpus_per_actor=0.5)
    whole = Federation(small_config(**base), run_dir=False).fit()
    # every client in a call of its own (byte cap), and always a split (any aggregation is worth it)
    monkeypatch.setattr(ray_executor, "CHUNK_BYTES", 1)
    monkeypatch.setattr(ray_executor, "SPLIT_WORTH_S", 0.0)
    split = Federation(small_config(**base), run_dir=False).fit()
    pd.testing.assert_frame_equal(_frame(whole), _frame(split))
    local = Federation(small_config(**{**base, "runtime__executor": "local"}), run_dir=False).fit()
    pd.testing.assert_frame_equal(_frame(local), _frame(split))


@register_algorithm
class _FailsInRoundOne(FedAvg):
    name = "test_fails_in_round_one"
    config_class = FedAvgConfig

    def local_update(self, ctx):
        if ctx.round == 1 and ctx.client_id % 2 == 0:
            raise RuntimeError("round one boom")
        return super().local_update(ctx)


class _KillsItsActor(FedAvg):  # registered only inside its test (see _only_here): it ends its process
    name = "test_kills_its_actor"
    config_class = FedAvgConfig

    def local_update(self, ctx):
        if ctx.client_id == 1 and ctx.round == 0:
            os._exit(3)  # the whole client actor process dies mid-round
        return super().local_update(ctx)


def _only_here(monkeypatch, cls) -> None:
    """Register ``cls`` for one test: registry-wide checks (every algorithm asynchronously, in this
    process) must not pick up an algorithm that kills or stalls the process it runs in."""
    from rayfed import registry

    monkeypatch.setitem(registry._REGISTRY, cls.name, cls)


def _executor(cfg):
    from rayfed.runtime import make_executor

    ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    return make_executor(cfg, create(cfg.algorithm), ds)


@pytest.mark.ray
def test_a_lost_quorum_leaves_the_server_state_as_it_was(ray_cluster):
    cfg = small_config(algorithm__name="test_fails_in_round_one", runtime__executor="ray", runtime__num_actors=2,
                       runtime__num_cpus_per_actor=0.5, runtime__min_quorum=0.9)
    ex = _executor(cfg)
    try:
        ok = ex.train_round(0, [0, 1, 2, 3])
        assert not ok.failures and [u["client_id"] for u in ok.updates] == [0, 1, 2, 3]
        before = ex.server_state()
        with pytest.raises(ClientError, match=r"2 of 4 clients failed in train; the quorum "
                           r"runtime.min_quorum=0.9 needs 4") as err:
            ex.train_round(1, [0, 1, 2, 3])
        assert "round one boom" in err.value.detail
        after = ex.server_state()
        assert after.round == before.round == 1
        for k, v in before.weights.items():
            np.testing.assert_array_equal(v, after.weights[k])
    finally:
        ex.close(reuse=False)


@pytest.mark.ray
def test_a_client_actor_dying_mid_round_fails_its_clients_by_name(ray_cluster, monkeypatch):
    _only_here(monkeypatch, _KillsItsActor)
    cfg = small_config(algorithm__name="test_kills_its_actor", runtime__executor="ray", runtime__num_actors=2,
                       runtime__num_cpus_per_actor=0.5, runtime__min_quorum=0.25, runtime__recovery="drop")
    ex = _executor(cfg)
    try:
        dead = ex.groups[ex.owner[1]]
        out = ex.train_round(0, list(range(6)))
        failed = sorted((f.client_id, f.round, f.stage) for f in out.failures)
        assert failed == [(c, 1, "train") for c in dead]
        assert f"client actor {ex.owner[1]} lost" in out.failures[0].detail
        (lost,) = ex.drain_actor_failures()  # recorded once, for the actor, with a one-line cause
        assert lost.clients == dead and lost.round == 1 and not lost.recovered and "\n" not in lost.cause
        assert sorted(u["client_id"] for u in out.updates) == sorted(set(range(6)) - set(dead))
        assert ex.server_state().round == 1  # the surviving half met the quorum and was aggregated
    finally:
        ex.close(reuse=False)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_multi_tensor_optimizers_step_bitwise_like_the_per_tensor_loop(name):
    from rayfed.config import TrainConfig
    from rayfed.training import make_optimizer

    cfg = TrainConfig(optimizer=name, lr=0.01, momentum=0.9, weight_decay=0.01)
    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    base = torch.nn.Sequential(*[torch.nn.Linear(5 if i == 0 else 8, 8) for i in range(5)], torch.nn.Linear(8, 3))
    models = [base, copy.deepcopy(base)]
    opts = [make_optimizer(models[0].parameters(), cfg)]
    cls = type(opts[0])
    kw = {k: v for k, v in opts[0].defaults.items() if k != "decoupled_weight_decay" or cls is torch.optim.Adam}
    opts.append(cls(models[1].parameters(), **{**kw, "foreach": False}))
    assert opts[0].defaults["foreach"] is True  # 12 tensors
    assert make_optimizer(torch.nn.Linear(2, 2).parameters(), cfg).defaults["foreach"] is None  # 2: the default
    for _ in range(5):
        for m, opt in zip(models, opts):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)


class _SlowClientThree(FedAvg):  # registered only inside its test (see _only_here)
    name = "test_slow_client_three"
    config_class = FedAvgConfig

    def local_update(self, ctx):
        if ctx.client_id == 3 and ctx.round == 0:
            import time

            time.sleep(4.0)
        return super().local_update(ctx)


@pytest.mark.ray
def test_round_timeout_drops_the_late_actors_clients_and_aggregates_the_rest(ray_cluster, monkeypatch):
    _only_here(monkeypatch, _SlowClientThree)
    cfg = small_config(algorithm__name="test_slow_client_three", runtime__executor="ray", runtime__num_actors=2,
                       runtime__num_cpus_per_actor=0.5, runtime__min_quorum=0.25, runtime__round_timeout_s=1.5,
                       runtime__recovery="drop")
    ex = _executor(cfg)
    try:
        late = ex.groups[ex.owner[3]]
        out = ex.train_round(0, list(range(6)))
        assert sorted((f.client_id, f.stage) for f in out.failures) == [(c, "timeout") for c in late]
        assert "runtime.round_timeout_s=1.5" in out.failures[0].detail
        assert sorted(u["client_id"] for u in out.updates) == sorted(set(range(6)) - set(late))
        assert ex.server_state().round == 1
    finally:
        ex.close(reuse=False)
