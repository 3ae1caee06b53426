"""Clients that differ: depth tiers, sparse (masked) uploads and downloads, several tasks, PEFT models."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import small_config

from rayfed import Federation
from rayfed.algorithms.base import ClientContext, ClientState
from rayfed.algorithms.fedavg import FedAvg, FedAvgConfig, FedPer
from rayfed.clients import ClientSpec, Structure, assign_tiers
from rayfed.config import ModelConfig
from rayfed.data import FederatedDataset
from rayfed.models import build_model
from rayfed.models.prepare import num_blocks
from rayfed.plan import plan_run
from rayfed.roles import SERVER_HELD, Role
from rayfed.runtime.executor import LocalExecutor
from rayfed.tensors import SparseTensor, is_sparse, wire_nbytes


def _only_here(monkeypatch, cls) -> None:
    from rayfed import registry

    monkeypatch.setitem(registry._REGISTRY, cls.name, cls)


def _fill(ctx: ClientContext, value: float) -> None:
    """Every server-held tensor of the client's model set to ``value`` (instead of training)."""
    sd = ctx.model.state_dict()
    with torch.no_grad():
        for k in ctx.roles.names(*SERVER_HELD):
            sd[k].fill_(value)


class ConstUpload(FedAvg):
    """Uploads its server-held tensors filled with ``client_id + 1``: averages are hand-computable."""

    name = "const_upload"
    uploads: dict[int, list[str]] = {}

    def local_update(self, ctx: ClientContext):
        _fill(ctx, float(ctx.client_id + 1))
        up = self.upload(ctx)
        type(self).uploads[ctx.client_id] = list(up)
        return up, {"train_loss": 0.0}


def _tier_config(**kw):
    base = dict(data__source="digits", data__num_clients=6, data__partition__name="iid",
                data__tiers="{1: 0.5, 2: 0.5}", model__name="vit", model__hidden_size=16, model__num_layers=2,
                model__num_heads=2, model__intermediate_size=16, model__patch_size=4, rounds=1,
                algorithm__name="const_upload")
    base.update(kw)
    return small_config(**base)


def test_tier_assignment_is_seeded_and_follows_the_fractions():
    specs = [ClientSpec(c) for c in range(10)]
    a = assign_tiers(specs, {2: 0.34, 4: 0.33, 6: 0.33}, seed=3)
    assert assign_tiers(specs, {2: 0.34, 4: 0.33, 6: 0.33}, seed=3) == a
    assert sorted(s.tier for s in a) == [2] * 4 + [4] * 3 + [6] * 3
    assert [s.tier for s in assign_tiers(specs, {2: 0.34, 4: 0.33, 6: 0.33}, seed=4)] != [s.tier for s in a]
    assert Structure.union([s.structure for s in a]).tier == 6


def test_two_depth_tiers_aggregate_deep_keys_over_deep_clients_only(monkeypatch):
    _only_here(monkeypatch, ConstUpload)
    ConstUpload.uploads = {}
    cfg = _tier_config()
    ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    plan, roles = plan_run(cfg, ConstUpload(FedAvgConfig(name="const_upload")), ds)
    shallow = sorted(c for c, s in plan.specs.items() if s.tier == 1)
    deep = sorted(c for c, s in plan.specs.items() if s.tier == 2)
    assert len(shallow) == len(deep) == 3
    deep_keys = {k for k in roles[plan.union].names() if k.startswith("vit.layers.1.")}
    assert deep_keys and plan.partial_keys == deep_keys
    assert set(roles[plan.union].names(Role.TIERED)) == deep_keys  # tiered where only some clients hold them

    result = Federation(cfg, run_dir=False).fit()
    for c in shallow:
        assert ConstUpload.uploads[c] and not any(k.startswith("vit.layers.1.") for k in ConstUpload.uploads[c])
    for c in deep:
        assert deep_keys <= set(ConstUpload.uploads[c])
    n = ds.client_sizes()
    w = result.server_state.weights
    mean_all = sum(n[c] * (c + 1) for c in n) / sum(n.values())
    mean_deep = sum(n[c] * (c + 1) for c in deep) / sum(n[c] for c in deep)
    for k, v in w.items():
        np.testing.assert_allclose(v, mean_deep if k in deep_keys else mean_all, rtol=1e-6, err_msg=k)

    # each client's bytes follow what it holds
    model = build_model(cfg.model, ds.info, cfg.seed)
    sizes = {k: v.numel() * v.element_size() for k, v in model.state_dict().items()}
    held_all = sum(sizes.values())
    held_shallow = held_all - sum(sizes[k] for k in deep_keys)
    rows = result.metrics[(result.metrics.stage == "train") & (result.metrics.client_id >= 0)]
    up = rows[rows.metric == "bytes_up"].set_index("client_id").value
    down = rows[rows.metric == "bytes_down"].set_index("client_id").value
    for c in shallow:
        assert up[c] == down[c] == held_shallow
    for c in deep:
        assert up[c] == down[c] == held_all
    assert result.summary["structures"]["depth 1"]["clients"] == 3


@pytest.mark.ray
def test_shallow_clients_hold_fewer_blocks_and_ray_matches_local(ray_cluster, monkeypatch):
    _only_here(monkeypatch, ConstUpload)
    cfg = _tier_config(algorithm__name="fedavg", rounds=2, runtime__num_actors=2, runtime__num_cpus_per_actor=0.5)
    ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    ex = LocalExecutor(cfg, FedAvg(FedAvgConfig()), ds)
    blocks = {s.tier: num_blocks(b.model) for s, b in ex.cohort.built.items()}
    assert blocks == {1: 1, 2: 2}
    local = Federation(cfg, run_dir=False).fit()
    ray_cfg = _tier_config(algorithm__name="fedavg", rounds=2, runtime__executor="ray", runtime__num_actors=2,
                           runtime__num_cpus_per_actor=0.5)
    remote = Federation(ray_cfg, run_dir=False).fit()
    cols = ["round", "client_id", "stage", "task", "metric"]
    a = local.metrics[~local.metrics.metric.str.contains("seconds")].sort_values(cols).reset_index(drop=True)
    b = remote.metrics[~remote.metrics.metric.str.contains("seconds")].sort_values(cols).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    for k, v in local.server_state.weights.items():
        np.testing.assert_array_equal(v, remote.server_state.weights[k])


# ---------------------------------------------------------------------------------------------
# masked tensors: sparse uploads and per-client sparse downloads


MASKED = "classifier.weight"


def _mask(cid: int, shape) -> np.ndarray:
    """Client ``cid`` holds flat positions p with p % 3 != cid % 3, except position 0 (held by nobody)."""
    p = np.arange(int(np.prod(shape)))
    return ((p % 3 != cid % 3) & (p != 0)).reshape(shape)


class MaskedConst(FedAvg):
    """``classifier.weight`` masked per client; uploads filled with ``client_id + 1``; downloads a
    client's sparse slice of the masked tensor as its payload."""

    name = "masked_const"
    uploads: dict[int, dict] = {}

    def role_rules(self):
        return [(MASKED, Role.MASKED)]

    def init_client(self, client_id, model, roles) -> ClientState:
        state = super().init_client(client_id, model, roles)
        state.masks[MASKED] = torch.from_numpy(_mask(client_id, model.state_dict()[MASKED].shape))
        return state

    def broadcast(self, state, round):
        return {k: v for k, v in state.weights.items() if k != MASKED}

    def payloads(self, state, client_ids, round):
        w = state.weights[MASKED]
        return {c: {MASKED: SparseTensor.from_dense(w, _mask(c, w.shape))} for c in client_ids}

    def local_update(self, ctx: ClientContext):
        type(self).uploads.setdefault(ctx.client_id, {})["loaded"] = ctx.model.state_dict()[MASKED].clone()
        _fill(ctx, float(ctx.client_id + 1))
        up = self.upload(ctx)
        type(self).uploads[ctx.client_id]["sent"] = dict(up)
        return up, {"train_loss": 0.0}


def test_sparse_uploads_average_each_coordinate_over_its_holders(monkeypatch):
    _only_here(monkeypatch, MaskedConst)
    MaskedConst.uploads = {}
    cfg = small_config(algorithm__name="masked_const", rounds=1, data__num_clients=4)
    ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    initial = build_model(cfg.model, ds.info, cfg.seed).state_dict()[MASKED].numpy()
    result = Federation(cfg, run_dir=False).fit()
    n = ds.client_sizes()
    shape = initial.shape
    rows = result.metrics[(result.metrics.stage == "train") & (result.metrics.client_id >= 0)]
    up = rows[rows.metric == "bytes_up"].set_index("client_id").value
    down = rows[rows.metric == "bytes_down"].set_index("client_id").value
    dense = {k: v.nbytes for k, v in result.server_state.weights.items() if k != MASKED}
    for c in range(4):
        sent = MaskedConst.uploads[c]["sent"]
        assert is_sparse(sent[MASKED]) and np.array_equal(sent[MASKED].mask(), _mask(c, shape))
        expected = SparseTensor.from_dense(np.full(shape, c + 1.0, np.float32), _mask(c, shape))
        assert sent[MASKED].nbytes == expected.nbytes < 4 * np.prod(shape)
        assert up[c] == sum(dense.values()) + expected.nbytes == wire_nbytes(sent)
        # download: the dense broadcast plus this client's sparse slice (its mask positions only)
        assert down[c] == sum(dense.values()) + SparseTensor.from_dense(initial, _mask(c, shape)).nbytes
        loaded = MaskedConst.uploads[c]["loaded"].numpy()
        np.testing.assert_array_equal(loaded, np.where(_mask(c, shape), initial, 0.0))
    got = result.server_state.weights[MASKED]
    num = sum(n[c] * (c + 1) * _mask(c, shape) for c in range(4))
    den = sum(n[c] * _mask(c, shape) for c in range(4))
    expected = np.where(den > 0, num / np.where(den > 0, den, 1), initial)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got.flat[0] == initial.flat[0]  # held by nobody: keeps its value
    mean_all = sum(n[c] * (c + 1) for c in n) / sum(n.values())
    np.testing.assert_allclose(result.server_state.weights["classifier.bias"], mean_all, rtol=1e-6)


def test_a_sparse_upload_is_smaller_in_the_object_store():
    from rayfed.runtime.ray_executor import _UploadBatch

    w = np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)
    mask = np.random.default_rng(1).random(w.shape) < 0.1
    dense = len(pickle.dumps(_UploadBatch({0: {"w": np.where(mask, w, 0)}}), protocol=5))
    sparse_batch = _UploadBatch({0: {"w": SparseTensor.from_dense(w, mask)}})
    sparse = len(pickle.dumps(sparse_batch, protocol=5))
    assert sparse < 0.2 * dense  # values + int32 positions at 10% density: about 8% of the dense bytes
    back = pickle.loads(pickle.dumps(sparse_batch, protocol=5)).tensors(0)["w"]
    np.testing.assert_array_equal(back.to_dense(), np.where(mask, w, 0))


# ---------------------------------------------------------------------------------------------
# two tasks on one client


@pytest.fixture(scope="module")
def digits_two_targets(tmp_path_factory):
    from sklearn.datasets import load_digits

    d = load_digits()
    path = tmp_path_factory.mktemp("tasks") / "digits.parquet"
    x = (d.data / 16.0).astype(np.float32)
    pq.write_table(pa.table({"features": pa.array(list(x), pa.list_(pa.float32())),
                             "label": d.target, "parity": d.target % 2}), path)
    return str(path)


def _task_config(path, **kw):
    base = dict(data__source="parquet", data__path=path, data__num_clients=6, data__partition__name="iid",
                data__tasks="[{name: digit, label_column: label}, {name: parity, label_column: parity, "
                            "clients: [0, 1, 2]}]",
                data__image_shape="[1, 8, 8]", model__name="mlp", model__mlp_hidden="[32]", rounds=4,
                train__local_epochs=2)
    base.update(kw)
    return small_config(**base)


def test_two_tasks_per_client_have_their_own_heads_metrics_and_plots(digits_two_targets, tmp_path):
    cfg = _task_config(digits_two_targets, output__plots=True)
    ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    assert ds.client_tasks(0) == ["digit", "parity"] and ds.client_tasks(5) == ["digit"]
    c0 = ds.client_data(0)
    np.testing.assert_array_equal(c0.tasks["parity"].y_train, c0.tasks["digit"].y_train % 2)  # same samples
    result = Federation(cfg, run_dir=tmp_path / "run").fit()
    m = result.metrics
    last = m[(m.stage == "eval") & (m["round"] == cfg.rounds) & (m.metric == "accuracy")]
    assert sorted(last[last.task == "digit"].client_id) == list(range(6))
    assert sorted(last[last.task == "parity"].client_id) == [0, 1, 2]
    per = result.summary["tasks"]
    assert set(per) == {"digit", "parity"}
    assert per["parity"]["accuracy_mean"] == pytest.approx(last[last.task == "parity"].value.mean())
    assert per["digit"]["accuracy_mean"] == pytest.approx(last[last.task == "digit"].value.mean())
    assert per["parity"]["accuracy_mean"] > 0.75 and per["digit"]["accuracy_mean"] > 0.5  # both really learn
    rnd = m[(m.client_id == -1) & (m.stage == "eval") & (m.metric == "accuracy_mean")]
    assert set(rnd.task) == {"", "digit", "parity"}
    # the parity head is held (and averaged) by clients 0-2 only: tiered; the body by everyone
    roles = result.summary["roles"]
    assert roles["tiered"] == 2 and result.summary["structures"]["tasks digit"]["clients"] == 3
    train = m[(m.stage == "train") & (m.client_id >= 0) & (m.metric == "train_loss")]
    assert set(train[train.client_id == 0].task) == {"", "digit", "parity"}
    for name in ("accuracy.png", "accuracy_digit.png", "accuracy_parity.png", "client_accuracy_parity.png"):
        assert (tmp_path / "run" / name).exists(), name


def test_task_config_errors(digits_two_targets):
    from rayfed.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.tasks.parity.label_column.*'nope' not found"):
        Federation(_task_config(digits_two_targets, data__tasks="[{name: digit}, {name: parity, "
                                                                 "label_column: nope}]"), run_dir=False).fit()
    with pytest.raises(ConfigError, match=r"data.tasks.parity.clients.*unknown: \[9\]"):
        _task_config(digits_two_targets, data__tasks="[{name: digit}, {name: parity, clients: [9]}]")
    with pytest.raises(ConfigError, match="algorithm 'fedrep' trains single-task models"):
        Federation(_task_config(digits_two_targets, algorithm__name="fedrep"), run_dir=False).fit()


# ---------------------------------------------------------------------------------------------
# LoRA on the real pre-trained MiniLM


class RecordingFedPer(FedPer):
    name = "recording_fedper"
    sent: dict[int, dict[str, np.ndarray]] = {}

    def local_update(self, ctx):
        up, metrics = super().local_update(ctx)
        type(self).sent[ctx.client_id] = {k: np.array(v) for k, v in up.items()}
        return up, metrics


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # PeftModel.from_pretrained
def test_lora_minilm_frozen_base_never_sent_adapters_averaged_and_exported(minilm_path, tmp_path, monkeypatch):
    import peft

    from rayfed.training import evaluate

    _only_here(monkeypatch, RecordingFedPer)
    RecordingFedPer.sent = {}
    words = ["good great fine nice happy", "bad awful poor sad angry"]
    rng = np.random.default_rng(0)
    labels = np.arange(48) % 2
    texts = [" ".join(rng.choice(words[y].split(), size=4)) for y in labels]
    pq.write_table(pa.table({"text": texts, "label": labels}), tmp_path / "text.parquet")
    cfg = small_config(data__source="parquet", data__path=str(tmp_path / "text.parquet"), data__text_column="text",
                       data__tokenizer=minilm_path, data__max_length=12, data__num_clients=3,
                       data__partition__name="iid", model__name="pretrained", model__path=minilm_path,
                       model__peft__type="lora", model__peft__r=8, algorithm__name="recording_fedper",
                       rounds=1, train__batch_size=8, train__lr=0.01, output__export="all")
    result = Federation(cfg, run_dir=tmp_path / "run").fit()
    received = result.server_received
    assert received and all("lora_" in k for k in received)  # adapters only: no base weight, no private head
    assert result.summary["roles"]["frozen"] > 100
    ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    n = ds.client_sizes()
    for k in received:
        mean = sum(n[c] * RecordingFedPer.sent[c][k].astype(np.float64) for c in n) / sum(n.values())
        np.testing.assert_allclose(result.server_state.weights[k], mean, rtol=1e-5, atol=1e-7)
    # a client's personalized model, exported as a PEFT adapter folder, reloads to its recorded accuracy
    m = result.metrics
    recorded = m[(m.stage == "eval") & (m.client_id == 1) & (m.metric == "accuracy")].value.iloc[-1]
    folder = tmp_path / "run" / "export" / "client_1"
    assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()
    base = build_model(ModelConfig(name="pretrained", path=minilm_path), ds.info, cfg.seed)
    reloaded = peft.PeftModel.from_pretrained(base, str(folder))
    data = ds.client_data(1)
    assert evaluate(reloaded, data.x_test, data.y_test, device=torch.device("cpu"))["accuracy"] == recorded


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
@pytest.mark.parametrize("kind", ["lora", "ia3", "prompt_tuning"])
def test_peft_from_config_sends_only_adapter_tensors(kind):
    from rayfed.models.peft import adapter_state, apply_peft

    cfg = small_config(data__synthetic__modality="text", data__synthetic__feature_shape="[10]",
                       data__synthetic__vocab_size=30, model__name="bert", model__hidden_size=16, model__num_layers=2,
                       model__num_heads=2, model__intermediate_size=16, model__peft__type=kind, model__peft__r=2,
                       rounds=2)
    result = Federation(cfg, run_dir=False).fit()
    ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    peft_model = apply_peft(build_model(cfg.model, ds.info, cfg.seed), cfg.model.peft, sequence_length=10)
    trainable = set(adapter_state(peft_model))
    assert set(result.server_received) == trainable  # adapters (and the head PEFT trains in full), nothing else
    assert result.summary["roles"]["frozen"] > 0
    accuracy = result.metrics[(result.metrics.metric == "accuracy") & (result.metrics.client_id >= 0)]
    assert len(accuracy) == 2 * cfg.data.num_clients


class TwoExits(FedAvg):
    """Reports its test metrics at two exits (the deeper one as the headline), as anytime models do."""

    name = "two_exits"

    def evaluate_client(self, ctx):
        m = super().evaluate_client(ctx)
        shallow = {**m, "accuracy": m["accuracy"] / 2, "correct": m["correct"] // 2}
        return {**m, "exits": {1: shallow, 2: dict(m)}}


def test_per_exit_metrics_have_an_exit_column_summary_and_plot(monkeypatch, tmp_path):
    _only_here(monkeypatch, TwoExits)
    result = Federation(small_config(algorithm__name="two_exits", output__plots=True), run_dir=tmp_path).fit()
    m = result.metrics
    per_client = m[(m.client_id >= 0) & (m.metric == "accuracy") & (m["round"] == 2)]
    assert sorted(set(per_client.exit)) == [-1, 1, 2]
    for c in range(6):
        rows = per_client[per_client.client_id == c].set_index("exit").value
        assert rows[1] == rows[2] / 2 and rows[-1] == rows[2]
    exits = result.summary["exits"]
    assert exits[2]["accuracy_mean"] == pytest.approx(result.summary["accuracy_mean"])
    assert exits[1]["accuracy_mean"] == pytest.approx(exits[2]["accuracy_mean"] / 2)
    assert (tmp_path / "exit_accuracy.png").exists()
    assert len(result.round_table()) == 2  # the headline rows only


def test_frozen_selector_trains_and_sends_only_the_rest():
    cfg = small_config(algorithm__frozen="['preset:body']")
    result = Federation(cfg, run_dir=False).fit()
    assert result.server_received == ["classifier.bias", "classifier.weight"]
    ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    initial = build_model(cfg.model, ds.info, cfg.seed).state_dict()
    head = {"classifier.bias", "classifier.weight"}
    assert set(result.server_state.weights) == head
    assert not np.array_equal(result.server_state.weights["classifier.weight"], initial["classifier.weight"].numpy())
