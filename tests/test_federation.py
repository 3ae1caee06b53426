"""The round loop with the local executor: privacy, byte counts, baselines, failures, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import small_config

from rayfed import ClientError, ConfigError, Federation, Role, register_algorithm
from rayfed.algorithms.base import ClientContext, ServerState
from rayfed.algorithms.fedavg import FedAvg, FedAvgConfig
from rayfed.data import FederatedDataset
from rayfed.models import build_model
from rayfed.sampling import sample_clients


def _model_and_roles(cfg):
    ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    model = build_model(cfg.model, ds.info, cfg.seed)
    from rayfed.algorithms import create

    return ds, model, create(cfg.algorithm).roles(model)


@pytest.mark.parametrize("name", ["fedavg", "fedper", "fedrep", "fedavg_ft", "local"])
def test_private_tensors_never_reach_server_and_bytes_match(name):
    cfg = small_config(rounds=2, algorithm__name=name)
    ds, model, roles = _model_and_roles(cfg)
    res = Federation(cfg, run_dir=False).fit()
    private = set(roles.names(Role.PRIVATE))
    shared = roles.names(Role.SHARED)
    assert not private & set(res.server_received)
    assert set(res.server_received) == set(shared)
    sd = model.state_dict()
    expected = sum(sd[k].numel() * sd[k].element_size() for k in shared)
    m = res.metrics
    up = m[(m.metric == "bytes_up") & (m.client_id >= 0)]["value"]
    down = m[(m.metric == "bytes_down") & (m.client_id >= 0)]["value"]
    assert len(up) == 2 * cfg.data.num_clients
    assert (up == expected).all() and (down == expected).all()
    assert res.summary["bytes_up"] == expected * len(up)
    if name == "local":
        assert expected == 0 and res.server_state.weights == {}


def test_fedavg_server_weights_are_the_sample_weighted_mean():
    """One round, one local step each: the new global weights equal the hand-computed weighted mean."""
    cfg = small_config(rounds=1, train__max_steps=1)
    ds, model, _ = _model_and_roles(cfg)
    sizes = ds.client_sizes()
    from rayfed.training import train_epochs

    trained = []
    from rayfed.runtime import client_seed

    for cid in ds.client_ids:  # replay each client's step in plain torch
        m = build_model(cfg.model, ds.info, cfg.seed)
        seed = client_seed(cfg.seed, 0, cid, "train")
        torch.manual_seed(seed)
        d = ds.client_data(cid)
        train_epochs(m, [n for n, _ in m.named_parameters()], d.x_train, d.y_train, cfg.train,
                     generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"))
        trained.append({k: v.detach().double().numpy() for k, v in m.state_dict().items()})
    w = np.array([sizes[c] for c in ds.client_ids], dtype=float)
    res = Federation(cfg, run_dir=False).fit()
    for k, v in res.server_state.weights.items():
        expected = sum(wi * t[k] for wi, t in zip(w, trained)) / w.sum()
        np.testing.assert_allclose(v, expected, rtol=1e-5, atol=1e-6)


def test_personalization_beats_fedavg_under_label_skew():
    cfg = small_config(rounds=4, data__partition__name="pathological", data__partition__classes_per_client=1,
                       data__synthetic__noise=2.0)
    accs = {n: Federation(cfg.with_algorithm(n), run_dir=False).fit().summary["accuracy_mean"]
            for n in ["fedavg", "fedper", "local"]}
    # one class per client: a private head is enough to be right everywhere, the global model is not
    assert accs["fedper"] > accs["fedavg"] + 0.2
    assert accs["local"] > accs["fedavg"] + 0.2


def test_fedrep_trains_head_with_body_frozen_then_body():
    cfg = small_config(rounds=1, algorithm__name="fedrep")
    res = Federation(cfg, run_dir=False).fit()
    m = res.metrics
    head = m[(m.metric == "head_loss") & (m.client_id >= 0)]
    assert len(head) == cfg.data.num_clients and np.isfinite(head.value).all()


def test_fedavg_ft_finetunes_after_training_and_reports_final():
    cfg = small_config(rounds=2, algorithm__name="fedavg_ft", algorithm__finetune_epochs=3)
    res = Federation(cfg, run_dir=False).fit()
    m = res.metrics
    final = m[(m.stage == "final") & (m.client_id == -1) & (m.metric == "accuracy_mean")].value.item()
    last = m[(m.stage == "eval") & (m.client_id == -1) & (m.metric == "accuracy_mean")].value.iloc[-1]
    assert res.summary["accuracy_mean"] == final
    assert final > last  # fine-tuning on each client's own skewed data helps its own test split


def test_sampling_is_seeded_and_sized():
    ids = list(range(20))
    a = sample_clients(ids, 5, seed=1, round=3)
    assert a == sample_clients(ids, 5, seed=1, round=3) and len(set(a)) == 5
    assert a != sample_clients(ids, 5, seed=1, round=4)
    cfg = small_config(rounds=3, sample_count=2)
    m = Federation(cfg, run_dir=False).fit().metrics
    trained = m[(m.stage == "train") & (m.client_id >= 0) & (m.metric == "bytes_up")]
    assert trained.groupby("round").size().tolist() == [2, 2, 2]


@register_algorithm
class _FailsOnClient3(FedAvg):
    name = "test_fails_on_client_3"
    config_class = FedAvgConfig

    def local_update(self, ctx: ClientContext):
        if ctx.client_id == 3 and ctx.round == 1:
            raise ValueError("boom on purpose")
        return super().local_update(ctx)


def test_failing_client_is_dropped_and_recorded():
    cfg = small_config(rounds=2, algorithm__name="test_fails_on_client_3")
    res = Federation(cfg, run_dir=False).fit()
    assert len(res.failures) == 1
    f = res.failures[0]
    assert (f.client_id, f.round, f.stage) == (3, 2, "train")  # rounds numbered as in the metrics table
    assert "boom on purpose" in str(f) and "ValueError" in f.detail
    trained = res.metrics[(res.metrics.stage == "train") & (res.metrics.metric == "train_loss")]
    by_round = trained.groupby("round").client_id.apply(set)
    assert 3 not in by_round[f.round] and 3 in by_round[1]


def test_failing_client_raises_client_error_when_asked():
    cfg = small_config(rounds=2, algorithm__name="test_fails_on_client_3", runtime__on_client_failure="raise")
    with pytest.raises(ClientError, match=r"client 3 failed in round 2 during train: ValueError: boom on purpose"):
        Federation(cfg, run_dir=False).fit()


def test_lost_quorum_raises():
    cfg = small_config(rounds=2, algorithm__name="test_fails_on_client_3", runtime__min_quorum=1.0)
    with pytest.raises(ClientError, match=r"client 3 failed in round 2 during train") as info:
        Federation(cfg, run_dir=False).fit()
    assert "1 of 6 clients failed in train; the quorum runtime.min_quorum=1.0 needs 6" in info.value.detail


def test_outputs_and_resume_from_checkpoint(tmp_path):
    cfg = small_config(rounds=4, algorithm__name="fedper", output__checkpoint_every=2, output__save_final=True,
                       output__plots=True, output__dir=str(tmp_path), output__name="run")
    full = Federation(cfg).fit()
    d = tmp_path / "run"
    for f in ["config.yaml", "metrics.parquet", "summary.json", "accuracy.png", "client_accuracy.png",
              "checkpoints/round_2/server.safetensors", "checkpoints/final/server.safetensors",
              "checkpoints/round_2/rayfed_checkpoint.json", "metrics/round_000004.parquet"]:
        assert (d / f).exists(), f
    # one safe file holds every client's state of the (local) cohort
    assert [p.name for p in (d / "checkpoints/round_2/clients").iterdir()] == ["local.safetensors"]
    table = pd.read_parquet(d / "metrics.parquet")
    assert list(table.columns) == ["algorithm", "round", "client_id", "stage", "task", "exit", "metric", "value"]
    assert (table.task == "").all() and (table.exit == -1).all()  # single-task data, no exits
    assert json.loads((d / "summary.json").read_text())["accuracy_mean"] == full.summary["accuracy_mean"]
    # resuming after round 2 reproduces the uninterrupted run exactly (server and client state restored)
    resumed = Federation(cfg, run_dir=tmp_path / "resumed").fit(resume_from=d / "checkpoints/round_2")
    assert resumed.summary["accuracy_mean"] == full.summary["accuracy_mean"]
    cols = ["round", "client_id", "stage", "task", "exit", "metric"]
    timeless = lambda m: m[~m.metric.str.contains("seconds")].sort_values(cols).reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(timeless(full.metrics), timeless(resumed.metrics))  # rows before round 2 kept
    for k, v in full.server_state.weights.items():
        np.testing.assert_array_equal(v, resumed.server_state.weights[k])


def test_model_factory_python_api():
    calls = []

    def factory(info):
        calls.append(info)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(info.feature_shape)), 16),
                                   torch.nn.ReLU(), torch.nn.Linear(16, info.num_classes))

    cfg = small_config(rounds=2, algorithm__name="fedper")
    res = Federation(cfg, model_factory=factory, run_dir=False).fit()
    assert calls and res.summary["roles"] == {"shared": 2, "private": 2}
    assert sorted(res.server_received) == ["1.bias", "1.weight"]


def test_server_state_type():
    res = Federation(small_config(rounds=2), run_dir=False).fit()
    assert isinstance(res.server_state, ServerState) and res.server_state.round == 2
    assert res.server_state.device == "cpu"  # every state the algorithm returns carries the server's device


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_a_cuda_server_without_a_gpu_is_a_clear_error():
    with pytest.raises(Exception, match=r"runtime.server_device='cuda' but this process sees no GPU.*"
                                        r"runtime.server_num_gpus.*runtime.server_device=cpu"):
        Federation(small_config(rounds=1, runtime__server_device="cuda"), run_dir=False).fit()


def test_text_federation_with_bert_from_config_and_from_local_weights(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    text = dict(rounds=2, algorithm__name="fedper", data__synthetic__modality="text",
                data__synthetic__feature_shape=[12], data__synthetic__vocab_size=60,
                model__name="bert", model__hidden_size=16, model__num_layers=1, model__num_heads=2,
                model__intermediate_size=32)
    res = Federation(small_config(**text), run_dir=False).fit()
    assert res.summary["accuracy_mean"] > 0.3
    assert "classifier.weight" not in res.server_received
    assert any(n.endswith("attention.self.query.weight") for n in res.server_received)
    # the same data through from_pretrained on a local folder (offline)
    hf = BertForSequenceClassification(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=32, num_labels=4))
    hf.save_pretrained(tmp_path / "bert")
    pre = {**text, "model__name": "pretrained", "model__path": str(tmp_path / "bert")}
    res2 = Federation(small_config(**pre), run_dir=False).fit()
    assert res2.summary["accuracy_mean"] > 0.3


def test_tensorboard_and_csv_loggers_write_the_round_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = small_config(rounds=3, output__loggers="[tensorboard, csv]")
    res = Federation(cfg, run_dir=tmp_path / "run").fit()
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("accuracy_mean")]
    values = [e.value for e in acc.Scalars("accuracy_mean")]
    assert steps == [1, 2, 3]
    rt = res.round_table()
    assert values == pytest.approx(list(rt[rt.stage == "eval"].sort_values("round").accuracy_mean), rel=1e-6)
    rows = pd.read_csv(tmp_path / "run" / "rounds.csv")
    assert list(rows["round"]) == [1, 2, 3] and "bytes_up" in rows.columns


def test_a_logger_without_its_package_is_a_config_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"the wandb logger needs the 'wandb' package.*rayfed-pfl\[wandb\]"):
        Federation(small_config(output__loggers="[wandb]"), run_dir=False).fit()


def test_the_run_directory_lists_its_clients_with_their_natural_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    writers = np.repeat(["ann", "bob", "cy"], 20)
    pq.write_table(pa.table({"features": pa.array(list(x), pa.list_(pa.float32())), "label": np.arange(60) % 2,
                             "writer": writers}), tmp_path / "w.parquet")
    cfg = small_config(data__source="parquet", data__path=str(tmp_path / "w.parquet"), data__group_column="writer",
                       data__partition__name="by_column", data__num_clients=3, rounds=1)
    Federation(cfg, run_dir=tmp_path / "run").fit()
    table = pd.read_csv(tmp_path / "run" / "clients.csv")
    assert list(table.group) == ["ann", "bob", "cy"] and list(table.client_id) == [0, 1, 2]
    assert (table.num_train + table.num_test == 20).all()
