"""Durable state, safe files, guarded resume, validated updates and data, and client actor recovery."""

from __future__ import annotations

import os
import pickle
import signal
import stat
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import small_config

from rayfed import ClientError, ConfigError, Federation
from rayfed.algorithms.base import ClientState, ClientUpdate
from rayfed.algorithms.fedavg import FedAvg, FedAvgConfig
from rayfed.data import FederatedDataset
from rayfed.errors import ActorError
from rayfed.runtime.state_store import ClientStateStore, read_client_states
from rayfed.runtime.validation import UpdateValidator
from rayfed.safe_io import UnsafeStateError, read_state, write_state

COLS = ["round", "client_id", "stage", "task", "exit", "metric"]


def _timeless(m: pd.DataFrame) -> pd.DataFrame:
    m = m[~m.metric.str.contains("seconds|per_second|arrival_time")]
    return m.sort_values(COLS).reset_index(drop=True)


def _only_here(monkeypatch, cls) -> None:
    from rayfed import registry

    monkeypatch.setitem(registry._REGISTRY, cls.name, cls)


# ---------------------------------------------------------------------------------------------
# the client state store and safe files


def test_state_store_round_trip_permissions_and_atomic_writes(tmp_path, monkeypatch):
    store = ClientStateStore()
    store[2] = ClientState(2, {"head.weight": torch.arange(4.0).reshape(2, 2)}, {"losses": [0.5, 0.25], "n": 3,
                                                                               "by_round": {1: np.ones(2)}},
                           rounds_trained=4, masks={"w": torch.tensor([True, False])})
    store[7] = ClientState(7)
    [path] = store.save(tmp_path / "states", "actor_0", round=3)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    back = read_client_states(tmp_path / "states")
    assert sorted(back) == [2, 7]
    assert torch.equal(back[2].private["head.weight"], store[2].private["head.weight"])
    assert back[2].extra["losses"] == [0.5, 0.25] and back[2].extra["by_round"][1].tolist() == [1.0, 1.0]
    assert back[2].rounds_trained == 4 and back[2].masks["w"].tolist() == [True, False]
    # a crash mid-write leaves the previous file readable
    store[2].extra["losses"].append(0.1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.save(tmp_path / "states", "actor_0", round=4)
    monkeypatch.undo()
    assert read_client_states(tmp_path / "states")[2].extra["losses"] == [0.5, 0.25]
    assert [p.name for p in (tmp_path / "states").iterdir()] == ["actor_0.safetensors"]  # no temporary left


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_crafted_pickle_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "actor_0.safetensors").write_bytes(pickle.dumps({"x": _Boom()}))
    with pytest.raises(UnsafeStateError, match="not a rayfed state file"):
        read_client_states(tmp_path / "s")
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(UnsafeStateError, match="cannot be stored safely"):
        write_state(tmp_path / "bad.safetensors", {"fn": print})


def test_modules_load_into_the_template_and_nothing_else(tmp_path):
    net = torch.nn.Linear(3, 2)
    write_state(tmp_path / "s.safetensors", {"net": net, "opt": torch.optim.SGD(net.parameters(), 0.1).state_dict()})
    fresh = torch.nn.Linear(3, 2)
    back = read_state(tmp_path / "s.safetensors", {"net": fresh})
    assert back["net"] is fresh and torch.equal(fresh.weight, net.weight)
    with pytest.raises(UnsafeStateError, match="resume with the same config"):
        read_state(tmp_path / "s.safetensors")


# ---------------------------------------------------------------------------------------------
# guarded, exact resume


def _resume_case(tmp_path, stop_at: int, **overrides):
    cfg = small_config(rounds=4, output__checkpoint_every=1, output__dir=str(tmp_path), output__name="full",
                       **overrides)
    full = Federation(cfg).fit()
    # an interrupted run: the same config stopped after `stop_at` rounds (its later files are removed)
    part = small_config(rounds=4, output__checkpoint_every=1, output__dir=str(tmp_path), output__name="cut",
                        **overrides)
    Federation(part).fit()
    cut = tmp_path / "cut"
    import shutil

    for r in range(stop_at + 1, 5):
        shutil.rmtree(cut / "checkpoints" / f"round_{r}")
        (cut / "metrics" / f"round_{r:06d}.parquet").unlink()
    shutil.rmtree(cut / "checkpoints" / "final", ignore_errors=True)
    (cut / "metrics.parquet").unlink()
    resumed = Federation(part, run_dir=cut).fit(resume_from=cut)
    return full, resumed


@pytest.mark.slow
@pytest.mark.parametrize("case", [
    {"algorithm__name": "fedper"},
    {"algorithm__name": "fedtp", "data__source": "digits", "model__name": "vit", "model__hidden_size": 16,
     "model__num_layers": 1, "model__num_heads": 2, "model__intermediate_size": 16, "model__patch_size": 4},
    {"algorithm__name": "ffgg", "aggregation__rule": "median", "aggregation__bucket_size": 2, "sample_count": 4},
    {"algorithm__name": "fedavg", "runtime__mode": "async", "runtime__asynchronous__buffer_size": 2,
     "runtime__asynchronous__staleness_scaling": True, "sample_count": 3},
], ids=["fedper", "fedtp", "ffgg-robust", "async"])
def test_resume_after_round_k_equals_the_uninterrupted_run(tmp_path, case):
    full, resumed = _resume_case(tmp_path, 2, **case)
    pd.testing.assert_frame_equal(_timeless(full.metrics), _timeless(resumed.metrics))
    for k, v in full.server_state.weights.items():
        np.testing.assert_array_equal(v, resumed.server_state.weights[k])
    on_disk = pd.read_parquet(tmp_path / "cut" / "metrics.parquet")
    pd.testing.assert_frame_equal(_timeless(full.metrics), _timeless(on_disk))


def test_resume_refuses_another_config_and_incomplete_checkpoints(tmp_path):
    cfg = small_config(rounds=2, output__checkpoint_every=1, output__dir=str(tmp_path), output__name="run")
    Federation(cfg).fit()
    run = tmp_path / "run"
    other = small_config(rounds=2, seed=5, train__lr=0.5, output__dir=str(tmp_path), output__name="x")
    with pytest.raises(ConfigError, match=r"seed: checkpoint 0, this run 5.*train.lr: checkpoint 0.01, this run 0.5"):
        Federation(other).fit(resume_from=run)
    longer = small_config(rounds=3, output__checkpoint_every=1, output__dir=str(tmp_path), output__name="y")
    more = Federation(longer, run_dir=tmp_path / "y").fit(resume_from=run / "checkpoints/round_2")
    assert more.summary["rounds"] == 3  # training longer is not a different config
    (run / "checkpoints/round_1/clients/local.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"incomplete: clients/local.safetensors \(missing\)"):
        Federation(cfg).fit(resume_from=run / "checkpoints/round_1")
    (run / "checkpoints/round_2/server.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=r"server.safetensors \(changed or corrupt\)"):
        Federation(cfg).fit(resume_from=run / "checkpoints/round_2")
    with pytest.raises(ConfigError, match="does not exist"):
        Federation(cfg).fit(resume_from=tmp_path / "nowhere")


def test_cli_resume_continues_the_run_directory(tmp_path, capsys):
    from rayfed.cli import main

    base = ["--set", "rounds=3", "--set", "output.checkpoint_every=1", "--set", "data.num_clients=5",
            "--set", "model.num_layers=1", "--set", "output.plots=false", "--set", "output.progress=false",
            "--set", "output.name=r", "--executor", "local", "--out", str(tmp_path), "--set", "algorithm.name=fedper"]
    assert main(["run", *base]) == 0
    import shutil

    shutil.rmtree(tmp_path / "r" / "checkpoints" / "round_3")
    shutil.rmtree(tmp_path / "r" / "checkpoints" / "final")
    assert main(["run", "--resume", str(tmp_path / "r")]) == 0
    m = pd.read_parquet(tmp_path / "r" / "metrics.parquet")
    assert sorted(set(m["round"])) == [1, 2, 3]
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# validated updates and data


def test_the_validator_names_each_bad_update():
    v = UpdateValidator({"w": ((2,), np.dtype("float32")), "b": ((1,), np.dtype("float32"))},
                        {0: frozenset({"w", "b"})}, aux=frozenset({"embedding_grad"}))
    ok = {"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}

    def check(t, cid=0):
        return v.check(ClientUpdate(cid, 0, 10, t))

    assert check(ok) is None and check({**ok, "aux/embedding_grad": np.zeros(3)}) is None
    assert "NaN or infinite" in check({**ok, "w": np.array([np.inf, 0], np.float32)})
    assert "shape [3]" in check({**ok, "w": np.zeros(3, np.float32)})
    assert "dtype float64" in check({**ok, "w": np.zeros(2)})
    assert "missing" in check({"w": ok["w"]})
    assert "may not leave" in check({**ok, "head.weight": np.zeros(2, np.float32)})
    assert "'aux/'" in check({**ok, "aux/head": np.zeros(2, np.float32)})
    assert "not a client" in check(ok, cid=9)


class _BadUploads(FedAvg):
    """Client 1 sends NaN, client 2 a wrong shape, client 3 misses a key, client 4 smuggles its head."""

    name = "test_bad_uploads"

    def local_update(self, ctx):
        up, m = super().local_update(ctx)
        up = dict(up)
        k = sorted(up)[0]
        if ctx.client_id == 1:
            up[k] = np.full_like(up[k], np.nan)
        elif ctx.client_id == 2:
            up[k] = np.zeros((7,), up[k].dtype)
        elif ctx.client_id == 3:
            del up[k]
        elif ctx.client_id == 4:
            up["aux/head"] = np.ones(3, np.float32)
        return up, m


@pytest.mark.parametrize("executor", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_bad_updates_are_refused_with_their_reason_and_the_round_goes_on(executor, monkeypatch, request):
    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    _only_here(monkeypatch, _BadUploads)
    cfg = small_config(algorithm__name="test_bad_uploads", rounds=2, runtime__executor=executor,
                       runtime__min_quorum=0.3, runtime__num_actors=2, runtime__num_cpus_per_actor=0.5)
    res = Federation(cfg, run_dir=False).fit()
    by = {(f.client_id, f.round): f for f in res.failures if isinstance(f, ClientError)}
    for r in (1, 2):
        assert "NaN or infinite" in by[(1, r)].detail and by[(1, r)].stage == "validate"
        assert "shape [7]" in by[(2, r)].detail
        assert "missing" in by[(3, r)].detail
        assert "aux/head" in by[(4, r)].detail  # the client-side guard stops it before it leaves
    assert np.isfinite(np.concatenate([v.ravel() for v in res.server_state.weights.values()])).all()
    assert not any(k.startswith("aux/") for k in res.server_received)
    ok = res.metrics[(res.metrics.stage == "train") & (res.metrics.metric == "train_loss")
                     & (res.metrics.client_id >= 0)]
    assert sorted(set(ok.client_id)) == [0, 5]  # the rest were aggregated


def test_bad_data_is_refused_when_the_dataset_is_built(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    x[3, 1] = np.nan
    x[5, 0] = np.inf
    pq.write_table(pa.table({"features": pa.array(list(x), pa.list_(pa.float32())), "label": np.arange(40) % 2}),
                   tmp_path / "nan.parquet")
    with pytest.raises(ConfigError, match="2 of 40 rows have NaN or infinite inputs"):
        FederatedDataset.from_config(small_config(data__source="parquet", data__path=str(tmp_path / "nan.parquet"),
                                                  data__num_clients=2).data, 0)
    y = np.arange(40) % 3
    y[[1, 2]] = -3
    pq.write_table(pa.table({"features": pa.array(list(np.nan_to_num(x)), pa.list_(pa.float32())), "label": y}),
                   tmp_path / "neg.parquet")
    with pytest.raises(ConfigError, match="2 negative label"):
        FederatedDataset.from_config(small_config(data__source="parquet", data__path=str(tmp_path / "neg.parquet"),
                                                  data__num_clients=2).data, 0)


# ---------------------------------------------------------------------------------------------
# client actors that die or freeze (Ray)


@dataclass
class _OnceConfig(FedAvgConfig):
    marker: str = field(default="", metadata={"help": "a file: the fault happens only while it does not exist"})


class _KillsOnce(FedAvg):
    """Kills its actor's process the first time it trains client 1 in round 1 (a marker file says so)."""

    name = "test_kills_once"
    config_class = _OnceConfig

    def _first_time(self, ctx) -> bool:
        m = self.config.marker
        if ctx.client_id == 1 and ctx.round == 1 and m and not os.path.exists(m):
            open(m, "w").close()
            return True
        return False

    def local_update(self, ctx):
        if self._first_time(ctx):
            os._exit(3)
        return super().local_update(ctx)


class _FreezesOnce(_KillsOnce):
    name = "test_freezes_once"

    def local_update(self, ctx):
        if self._first_time(ctx):
            os.kill(os.getpid(), signal.SIGSTOP)  # a frozen process: alive, never answering
        return FedAvg.local_update(self, ctx)


def _ray_cfg(name, **kw):
    return small_config(algorithm__name=name, rounds=3, runtime__executor="ray", runtime__num_actors=2,
                        runtime__num_cpus_per_actor=0.5, algorithm__private="['preset:head']", **kw)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("cls", [_KillsOnce, _FreezesOnce], ids=["killed", "frozen"])
def test_a_lost_client_actor_is_restarted_and_the_run_equals_an_uninterrupted_one(ray_cluster, monkeypatch, tmp_path,
                                                                                   cls):
    _only_here(monkeypatch, cls)
    extra = {"algorithm__marker": str(tmp_path / "marker")}
    if cls is _FreezesOnce:
        extra["runtime__round_timeout_s"] = 6.0
    (tmp_path / "marker").touch()  # the uninterrupted run: the marker exists, nothing happens
    calm = Federation(_ray_cfg(cls.name, **extra), run_dir=False).fit()
    (tmp_path / "marker").unlink()
    hit = Federation(_ray_cfg(cls.name, **extra), run_dir=False).fit()
    assert (tmp_path / "marker").exists()  # it did happen
    lost = [f for f in hit.failures if isinstance(f, ActorError)]
    assert len(lost) == 1 and lost[0].recovered and lost[0].round == 2 and 1 in lost[0].clients
    assert "\n" not in lost[0].cause and (cls is _KillsOnce or "deadline" in lost[0].cause)
    assert not [f for f in hit.failures if isinstance(f, ClientError)]
    a, b = _timeless(calm.metrics), _timeless(hit.metrics)
    b = b[b.metric != "actors_lost"].reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.ray
def test_a_dead_server_stops_the_run_with_the_resume_command(ray_cluster, tmp_path):
    import ray

    from rayfed.errors import RunStopped

    cfg = small_config(rounds=4, runtime__executor="ray", runtime__num_actors=1, runtime__num_cpus_per_actor=0.5,
                       output__checkpoint_every=1, output__dir=str(tmp_path), output__name="run")
    fed = Federation(cfg)

    def kill_server(round, metrics):
        if round == 2:
            ray.kill(fed.executor.server)

    fed.callbacks.append(kill_server)
    with pytest.raises(RunStopped, match=r"stopped in round 3: the server actor failed.*--resume .*run") as info:
        fed.fit()
    assert "\n" not in str(info.value) and "checkpoints/round_2" in str(info.value)
    kept = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "run" / "metrics").glob("*.parquet"))])
    assert sorted(set(kept["round"])) == [1, 2]
    resumed = Federation(cfg, run_dir=tmp_path / "run").fit(resume_from=tmp_path / "run")
    assert resumed.summary["rounds"] == 4 and sorted(set(resumed.metrics["round"])) == [1, 2, 3, 4]


@pytest.mark.ray
def test_actors_that_cannot_be_placed_are_an_error_within_the_timeout(ray_cluster):
    import time

    cfg = small_config(runtime__executor="ray", runtime__num_actors=1, runtime__num_gpus_per_actor=1,
                       runtime__placement_timeout_s=3, rounds=1)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"did not start within runtime.placement_timeout_s=3.*'GPU': 1.*the cluster "
                                          r"has"):
        Federation(cfg, run_dir=False).fit()
    assert time.monotonic() - t0 < 30


def test_ctrl_c_stops_after_the_round_with_metrics_a_checkpoint_and_the_resume_command(tmp_path):
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "rayfed.cli", "run", "--executor", "local", "--out", str(tmp_path),
            "--set", "output.name=r", "--set", "rounds=200", "--set", "data.num_clients=5", "--set",
            "model.num_layers=1", "--set", "output.plots=false", "--set", "output.progress=false",
            "--set", "algorithm.name=fedper"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    parts = tmp_path / "r" / "metrics"
    deadline = time.monotonic() + 120
    while not (parts.exists() and len(list(parts.glob("*.parquet"))) >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 30  # the round in progress, a checkpoint, and out
    assert proc.returncode == 130, err
    assert "interrupted after round" in err and "--resume" in err
    done = pd.read_parquet(tmp_path / "r" / "metrics.parquet")
    last = int(done["round"].max())
    assert (tmp_path / "r" / "checkpoints" / f"round_{last}" / "rayfed_checkpoint.json").exists()
