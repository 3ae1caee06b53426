"""The same code on real Ray actors: determinism, baselines end to end, joining a running Ray."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import small_config

from rayfed import ClientError, Federation, register_algorithm, run_comparison
from rayfed.algorithms.fedavg import FedAvg, FedAvgConfig

pytestmark = pytest.mark.ray


def _metric_frame(res):
    m = res.metrics
    keep = ~m.metric.str.endswith("seconds")  # timings (train, round, server aggregate/payload) vary
    return m[keep].reset_index(drop=True)


def test_same_seed_same_metrics_local_one_actor_two_actors(ray_cluster):
    base = dict(rounds=3, algorithm__name="fedper", sample_count=4)
    runs = {
        "local": small_config(**base),
        "ray1": small_config(**base, runtime__executor="ray", runtime__num_actors=1,
                             runtime__num_cpus_per_actor=0.5),
        "ray2": small_config(**base, runtime__executor="ray", runtime__num_actors=2,
                             runtime__num_cpus_per_actor=0.5),
    }
    results = {k: Federation(c, run_dir=False).fit() for k, c in runs.items()}
    ref = _metric_frame(results["local"])
    for k in ("ray1", "ray2"):
        pd.testing.assert_frame_equal(ref, _metric_frame(results[k]))
        for name, v in results["local"].server_state.weights.items():
            np.testing.assert_array_equal(v, results[k].server_state.weights[name])


def test_each_baseline_end_to_end_on_ray(ray_cluster, tmp_path):
    cfg = small_config(rounds=2, runtime__executor="ray", runtime__num_actors=2, runtime__num_cpus_per_actor=0.5,
                       output__dir=str(tmp_path), output__name="cmp", output__plots=True)
    names = ["fedavg", "fedavg_ft", "fedper", "fedrep", "local"]
    comp = run_comparison(cfg, names)
    for n in names:
        table = pd.read_parquet(tmp_path / "cmp" / n / "metrics.parquet")
        assert set(table["round"]) >= {1, 2}
        acc = table[(table.client_id == -1) & (table.metric == "accuracy_mean")]
        assert len(acc) >= 1 and acc.value.iloc[-1] == pytest.approx(comp.results[n].summary["accuracy_mean"])
        assert comp.results[n].summary["accuracy_mean"] > 0.3  # 4 classes: better than chance
    assert (tmp_path / "cmp" / "metrics.parquet").exists() and (tmp_path / "cmp" / "accuracy.png").exists()
    assert list(comp.table().algorithm) == names


def test_python_api_inside_existing_ray_leaves_it_running(ray_cluster):
    import ray

    cfg = small_config(rounds=1, runtime__executor="ray", runtime__num_actors=1, runtime__num_cpus_per_actor=0.5)
    Federation(cfg, run_dir=False).fit()
    assert ray.is_initialized()

    @ray.remote(num_cpus=0.1)
    def ping():
        return "pong"

    assert ray.get(ping.remote()) == "pong"
    # the federation's actors are gone: all CPUs are back
    assert ray.available_resources().get("CPU", 0) >= ray.cluster_resources()["CPU"] - 0.2


@register_algorithm
class _FailsRemotely(FedAvg):
    name = "test_fails_remotely"
    config_class = FedAvgConfig

    def local_update(self, ctx):
        if ctx.client_id == 4:
            raise RuntimeError("remote boom")
        return super().local_update(ctx)


def test_failing_client_on_ray_names_client_round_stage(ray_cluster):
    cfg = small_config(rounds=2, algorithm__name="test_fails_remotely", runtime__executor="ray",
                       runtime__num_actors=2, runtime__num_cpus_per_actor=0.5)
    res = Federation(cfg, run_dir=False).fit()
    assert [(f.client_id, f.round, f.stage) for f in res.failures] == [(4, 1, "train"), (4, 2, "train")]
    assert "remote boom" in res.failures[0].detail
    cfg = small_config(rounds=2, algorithm__name="test_fails_remotely", runtime__executor="ray",
                       runtime__num_actors=2, runtime__num_cpus_per_actor=0.5, runtime__on_client_failure="raise")
    with pytest.raises(ClientError, match=r"client 4 failed in round 1 during train: RuntimeError: remote boom"):
        Federation(cfg, run_dir=False).fit()


def test_actor_setup_error_is_a_client_error(ray_cluster):
    def bad_factory(info):
        if _in_worker():  # the driver's validation build works; the actor's fails
            raise OSError("weights missing on this node")
        import torch

        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, info.num_classes))

    cfg = small_config(rounds=1, runtime__executor="ray", runtime__num_actors=1, runtime__num_cpus_per_actor=0.5)
    with pytest.raises(ClientError, match=r"client 0 failed in round -1 during setup: OSError: weights missing"):
        Federation(cfg, model_factory=bad_factory, run_dir=False).fit()


def _in_worker() -> bool:
    import ray

    return ray.get_runtime_context().worker.mode == ray._private.worker.WORKER_MODE
