"""Tune sweeps on the session's Ray: trials in placement groups, ASHA, PBT with checkpoint resume, CLI."""

from __future__ import annotations

import importlib.util
import json

import pandas as pd
import pytest
import yaml
from conftest import small_config

from rayfed import Federation
from rayfed.cli import main
from rayfed.errors import ConfigError
from rayfed.runtime.placement import trial_bundles
from rayfed.tune import load_space, make_tuner, trial_resources, write_results

BASE = {
    "seed": 0, "rounds": 3,
    "data": {"source": "synthetic", "num_clients": 6,
             "synthetic": {"num_samples": 360, "num_classes": 4, "feature_shape": [8]},
             "partition": {"name": "dirichlet", "alpha": 0.5, "min_samples": 10}},
    "model": {"name": "mlp", "mlp_hidden": [16]},
    "train": {"local_epochs": 1, "batch_size": 16, "optimizer": "adam", "lr": 0.01},
    # one trial = 0.5 (trial) + 0.1 (server) + 0.4 (client actor) = 1 CPU of the session's 4
    "runtime": {"executor": "ray", "num_actors": 1, "num_cpus_per_actor": 0.4, "torch_threads": 1},
    "output": {"plots": False, "progress": False, "save_final": False},
}


@pytest.mark.ray
def test_federation_actors_run_inside_the_trials_placement_group(ray_cluster):
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cfg = small_config(rounds=1, runtime__executor="ray", runtime__num_actors=2, runtime__num_cpus_per_actor=0.3)
    bundles = trial_bundles(cfg, list(range(6)), driver_cpus=0.2)
    assert trial_resources(cfg, driver_cpus=0.2).bundles == bundles
    pg = ray.util.placement_group(bundles, strategy="PACK")
    ray.get(pg.ready(), timeout=120)

    @ray.remote(num_cpus=0.2)
    def drive(cfg):  # like a Tune trial: runs in bundle 0 and passes its own group to the federation
        seen = {}

        def record(rnd, metrics):
            ex = fed.executor
            seen.update(pg=ray.util.get_current_placement_group().id.hex(),
                        actor_pgs=ray.get([a.placement_group_id.remote() for a in [*ex.actors, ex.server]]),
                        bundles=[a.bundle_index for a in ex.placement.actors], server=ex.placement.server_bundle_index)

        fed = Federation(cfg, run_dir=False, placement_group=ray.util.get_current_placement_group(),
                         callbacks=[record])
        seen["accuracy"] = fed.fit().summary["accuracy_mean"]
        return seen

    try:
        seen = ray.get(drive.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=0)).remote(cfg), timeout=300)
        assert seen["pg"] == pg.id.hex()
        assert seen["server"] == 1 and sorted(seen["bundles"]) == [2, 3]
        assert seen["actor_pgs"] == [pg.id.hex()] * 3  # Ray's own record: server and clients in the group
        assert seen["accuracy"] > 0.25
    finally:
        ray.util.remove_placement_group(pg)


@pytest.mark.ray
@pytest.mark.slow
def test_cli_sweep_asha_stops_trials_and_best_config_runs(ray_cluster, tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(BASE))
    space = tmp_path / "space.yaml"
    # grid order fixes which trials start first (2 at a time): the two good learning rates set the
    # rung cutoffs, so the two hopeless ones are stopped by ASHA after round 1
    space.write_text(yaml.safe_dump({
        "algorithm": "fedper", "metric": "accuracy_mean", "mode": "max",
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "space": {"train.lr": {"grid": [0.03, 0.01, 0.00001, 0.000003]}}}))
    rc = main(["tune", str(space), "--config", str(base), "--num-samples", "1", "--scheduler", "asha",
               "--out", str(tmp_path / "sweeps"), "--max-concurrent", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "Trial status" in out  # Tune's progress table
    (exp,) = list((tmp_path / "sweeps").glob("tune-*-fedper"))
    trials = pd.read_parquet(exp / "trials.parquet")
    rounds = pd.read_parquet(exp / "rounds.parquet")
    assert len(trials) == 4 and set(trials["status"]) == {"TERMINATED"}
    assert trials["stopped_early"].sum() >= 2 and trials["rounds_completed"].max() == 3
    slow = trials[trials["config/train.lr"] < 1e-4]
    assert slow["stopped_early"].all() and (slow["rounds_completed"] == 1).all()
    assert set(rounds.columns) >= {"trial_id", "round", "accuracy_mean", "training_iteration", "config/train.lr"}
    assert (rounds["round"] == rounds["training_iteration"]).all()

    best = yaml.safe_load((exp / "best.yaml").read_text())
    full = trials[~trials.stopped_early]
    top = full.loc[full["accuracy_mean"].idxmax()]
    assert best["train"]["lr"] == top["config/train.lr"] and best["algorithm"]["name"] == "fedper"
    # the best config runs with `rayfed run` and, same seed, reproduces the trial's accuracy
    assert main(["run", str(exp / "best.yaml"), "--out", str(tmp_path / "runs"), "--set", "output.plots=false",
                 "--set", "output.progress=false"]) == 0
    (run_dir,) = list((tmp_path / "runs").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["accuracy_mean"] == pytest.approx(top["accuracy_mean"], abs=1e-9)


@pytest.mark.ray
@pytest.mark.slow
def test_pbt_exploit_resumes_the_federation_from_the_checkpoint(ray_cluster, tmp_path):
    space = {"algorithm": "fedavg", "metric": "accuracy_mean", "mode": "max",
             "scheduler": {"name": "pbt", "perturbation_interval": 1, "synchronous": True, "quantile_fraction": 0.5},
             "space": {"train.lr": {"grid": [0.03, 0.000003]}, "train.local_epochs": {"choice": [1, 2]}}}
    # the in-process executor: this test is about Tune's checkpoint/restore path, which is the same
    # Federation.checkpoint / fit(resume_from=) for both executors (trial actors are reused)
    base = {**BASE, "rounds": 2, "runtime": {"executor": "local", "torch_threads": 1}}
    tuner = make_tuner(space, base, num_samples=1, storage_path=tmp_path, name="pbt", verbose=0)
    results = tuner.fit()  # the returned Tuner is an ordinary one: fit() runs it
    assert not results.errors
    configs = [r.config for r in results]
    assert all(c["train.lr"] == 0.03 for c in configs)  # the weak trial exploited the strong one
    paths = write_results(results, tmp_path / "out", load_space(space), base)
    rounds = pd.read_parquet(paths["rounds"])
    assert len(rounds) == 4
    # after the exploit the weak trial went on from the strong one's checkpoint (server state and
    # client states), not from round 0: the federation's round equals Tune's iteration, and its
    # accuracy jumps from the weak trial's to the strong trial's level
    assert (rounds["round"] == rounds["training_iteration"]).all()
    by_round = rounds.pivot_table(index="round", columns="trial_id", values="accuracy_mean")
    assert by_round.loc[1].min() < 0.5 < by_round.loc[2].min()


@pytest.mark.skipif(importlib.util.find_spec("optuna") is not None, reason="optuna is installed")
def test_optuna_without_the_package_gives_an_install_hint():
    with pytest.raises(ConfigError, match=r"pip install 'rayfed-pfl\[optuna\]'"):
        make_tuner({"algorithm": "fedavg", "space": {"train.lr": {"loguniform": [0.001, 0.1]}}}, BASE,
                   search="optuna")


def test_grid_with_optuna_and_pbt_without_mutations_are_config_errors(tmp_path):
    grid_only = {"algorithm": "fedavg", "space": {"train.lr": {"grid": [0.01, 0.1]}}}
    with pytest.raises(ConfigError, match="every key is a grid"):
        make_tuner(grid_only, BASE, scheduler="pbt")
    with pytest.raises(ConfigError, match="grace_period=5 exceeds max_t=3"):
        make_tuner({**grid_only, "scheduler": {"name": "asha", "grace_period": 5}}, BASE)
    if importlib.util.find_spec("optuna") is not None:
        with pytest.raises(ConfigError, match="grid samplers"):
            make_tuner(grid_only, BASE, search="optuna")


def test_trial_resources_follow_the_runtime_config():
    from rayfed.tune import trainable

    assert trial_resources(BASE).bundles == [{"CPU": 0.5}, {"CPU": 0.1}, {"CPU": 0.4}]
    sites = {**BASE, "runtime": {**BASE["runtime"], "sites": {"site_a": [0, 1, 2]}}}
    assert trial_resources(sites, driver_cpus=0.2).bundles == [
        {"CPU": 0.2}, {"CPU": 0.1}, {"CPU": 0.4, "site_a": 0.001}, {"CPU": 0.4}]
    local = {**BASE, "runtime": {"executor": "local"}}
    assert trial_resources(local).bundles == [{"CPU": 0.5}]
    assert trainable(BASE).__name__ == "rayfed_fedavg"
    with pytest.raises(ConfigError, match="checkpoint_every"):
        trainable(BASE, checkpoint_every=-1)
