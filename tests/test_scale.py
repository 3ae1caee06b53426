"""Many clients: actors hold only their shards, states spill under a memory budget, evaluation samples."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import small_config

from rayfed import Federation
from rayfed.algorithms import create
from rayfed.data import FederatedDataset
from rayfed.runtime.executor import LocalExecutor

COLS = ["round", "client_id", "stage", "task", "exit", "metric"]


def _timeless(m):
    return m[~m.metric.str.contains("seconds")].sort_values(COLS).reset_index(drop=True)


@pytest.mark.ray
def test_each_actor_holds_only_its_own_clients_shards(ray_cluster):
    import ray

    from rayfed.runtime.ray_executor import RayExecutor

    cfg = small_config(runtime__executor="ray", runtime__num_actors=3, runtime__num_cpus_per_actor=0.3,
                       data__num_clients=9)
    ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    ex = RayExecutor(cfg, create(cfg.algorithm), ds)
    try:
        held = ray.get([a.data_nbytes.remote() for a in ex.actors])
        for group, nbytes in zip(ex.groups, held):
            assert nbytes == sum(ds.client_data(c).nbytes() for c in group)
        assert sum(held) == ds.nbytes() and max(held) < ds.nbytes() / 2
    finally:
        ex.close(reuse=False)


def test_spilled_states_give_the_same_metrics_as_states_in_memory(tmp_path):
    base = dict(algorithm__name="fedper", rounds=3, data__num_clients=8, sample_count=4)
    calm = Federation(small_config(**base), run_dir=False).fit()
    cfg = small_config(**base, runtime__state_memory_mb=0.001, runtime__state_dir=str(tmp_path / "s"))
    fed = Federation(cfg, run_dir=False)
    spills = []
    fed.callbacks.append(lambda r, m: spills.append(fed.executor.cohort.states.spills))
    tight = fed.fit()
    assert spills[-1] > 10  # the budget holds about one state: every other one went to disk and came back
    pd.testing.assert_frame_equal(_timeless(calm.metrics), _timeless(tight.metrics))
    for k, v in calm.server_state.weights.items():
        assert (v == tight.server_state.weights[k]).all()


def test_client_states_are_made_on_first_use_only():
    cfg = small_config(algorithm__name="fedper", data__num_clients=8, sample_count=2, rounds=1, eval_fraction=0.25)
    ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    ex = LocalExecutor(cfg, create(cfg.algorithm), ds)
    assert len(ex.cohort.states) == 0
    ex.train_round(0, [1, 5])
    assert ex.cohort.states.ids() == [1, 5]


def test_intermediate_evaluations_sample_clients_and_the_last_covers_everyone():
    cfg = small_config(algorithm__name="fedper", data__num_clients=8, rounds=3, eval_fraction=0.25)
    res = Federation(cfg, run_dir=False).fit()
    ev = res.metrics[(res.metrics.stage == "eval") & (res.metrics.metric == "accuracy") & (res.metrics.client_id >= 0)]
    per_round = ev.groupby("round").client_id.apply(sorted)
    assert len(per_round[1]) == len(per_round[2]) == 2 and per_round[1] != per_round[2]
    assert per_round[3] == list(range(8))
    assert res.summary["eval_fraction"] == 0.25 and res.summary["clients_evaluated"] == 8


@pytest.mark.ray
@pytest.mark.slow
def test_two_thousand_clients_end_to_end(ray_cluster, tmp_path):
    cfg = small_config(algorithm__name="fedper", rounds=2, sample_count=40, eval_fraction=0.02,
                       data__num_clients=2000, data__synthetic__num_samples=16000,
                       data__partition__min_samples=4, runtime__executor="ray", runtime__num_actors=2,
                       runtime__num_cpus_per_actor=0.5, output__dir=str(tmp_path), output__name="big",
                       output__save_final=True)
    res = Federation(cfg).fit()
    m = res.metrics
    trained = m[(m.stage == "train") & (m.metric == "train_loss") & (m.client_id >= 0)]
    assert trained.groupby("round").size().tolist() == [40, 40]
    assert res.summary["clients_evaluated"] == 2000 and res.summary["num_failures"] == 0
    files = sorted(p.name for p in (tmp_path / "big" / "checkpoints" / "final" / "clients").iterdir())
    assert files == ["actor_0.safetensors", "actor_1.safetensors"]  # a few files per actor, not one per client
