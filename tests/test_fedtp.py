"""FedTP (hypernetwork-generated attention) and Personalized-T (private attention)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import small_config
from torch import nn

from rayfed import ConfigError, Federation, Role
from rayfed.algorithms import create
from rayfed.algorithms.base import ClientUpdate, ServerState
from rayfed.algorithms.fedtp import (
    CLIENT_INDEX,
    HYPERNET,
    HYPERNET_OPT,
    FedTP,
    FedTPAggregator,
    FedTPConfig,
    GenerationTarget,
    HyperNetwork,
    PersonalizedT,
    PersonalizedTConfig,
    personalize_new_client,
)
from rayfed.data import FederatedDataset
from rayfed.data.info import DatasetInfo
from rayfed.models import build_model
from rayfed.runtime.executor import LocalExecutor
from rayfed.sampling import sample_clients

TARGETS = [GenerationTarget("a.q.weight", (2, 3), 0), GenerationTarget("a.v.weight", (2, 3), 0),
           GenerationTarget("b.k.weight", (3, 2), 1), GenerationTarget("b.k.bias", (3,), 1)]


def vit_config(**overrides):
    """A tiny ViT on synthetic 4x4 images (2 attention layers) and a small hypernetwork."""
    base = dict(data__synthetic__modality="image", data__synthetic__feature_shape="[1, 4, 4]",
                data__synthetic__num_classes=4, model__name="vit", model__hidden_size=8, model__num_heads=2,
                model__num_layers=2, model__intermediate_size=16, model__patch_size=2, algorithm__name="fedtp",
                algorithm__embedding_dim=8, algorithm__hypernet_hidden=16, algorithm__hypernet_layers=1)
    if overrides.get("algorithm__name", "fedtp") != "fedtp":
        base = {k: v for k, v in base.items() if not k.startswith("algorithm__")}
    return small_config(**{**base, **overrides})


def _state(hn: HyperNetwork, ids=(10, 11, 12)) -> ServerState:
    return ServerState({"shared": np.zeros(2, np.float32)},
                       {HYPERNET: hn, CLIENT_INDEX: {c: i for i, c in enumerate(ids)}, HYPERNET_OPT: None}, 0)


def _update(cid: int, n: int, shared, gen: dict) -> ClientUpdate:
    return ClientUpdate(cid, 0, n, {"shared": np.asarray(shared, np.float32), **gen})


# ---------------------------------------------------------------------------------------------
# the hypernetwork update
# ---------------------------------------------------------------------------------------------


def test_head_bias_step_is_minus_lr_times_weighted_mean_delta():
    """Hand-checkable: with plain SGD the last bias moves by -lr * sum_i (n_i / n) (gen_i - trained_i).

    Clients upload delta_i = received_i - trained_i (FedTP.upload), so the update is against the
    generation each client trained from."""
    torch.manual_seed(0)
    hn = HyperNetwork(3, TARGETS[:1], embedding_dim=2, hidden=3, layers=0)
    cfg = FedTPConfig(hypernet_optimizer="sgd", hypernet_lr=0.5, hypernet_momentum=0.0, hypernet_weight_decay=0.0)
    delta = {10: -np.ones((2, 3), np.float32), 12: np.full((2, 3), 2.0, np.float32)}  # trained gen+1, gen-2
    bias0 = hn.heads[0].out.bias.detach().clone()
    agg = FedTPAggregator(_state(hn), cfg)
    agg.add(_update(10, 3, [1, 2], {"a.q.weight": delta[10]}))
    agg.add(_update(12, 1, [5, 6], {"a.q.weight": delta[12]}))
    new = agg.finish()
    # weighted mean delta = (3 * -1 + 1 * 2) / 4 = -0.25, so the bias rises by 0.5 * 0.25
    torch.testing.assert_close(hn.heads[0].out.bias.detach(), bias0 + 0.125)
    np.testing.assert_allclose(new.weights["shared"], [2.0, 3.0])  # (3*[1,2] + [5,6]) / 4
    assert "a.q.weight" not in new.weights
    assert new.extra["hypernet_updates"] == {10: 1, 12: 1}


@pytest.mark.parametrize("head", ["full", "bottleneck", "factorized"])
def test_hypernetwork_steps_equal_direct_autograd(head):
    """Two rounds of SGD with momentum and weight decay == autograd on sum_i w_i <gen_i(phi), delta_i>."""
    torch.manual_seed(0)
    hn = HyperNetwork(3, TARGETS, embedding_dim=4, hidden=5, layers=2, head=head, rank=2)
    ref = copy.deepcopy(hn)
    lr, mom, wd = 0.1, 0.9, 0.01
    cfg = FedTPConfig(hypernet_optimizer="sgd", hypernet_lr=lr, hypernet_momentum=mom, hypernet_weight_decay=wd)
    state = _state(hn)
    rng = np.random.default_rng(0)
    sizes = {10: 3, 12: 1}
    bufs = None
    for _round in range(2):
        trained = {c: {t.name: rng.normal(size=t.shape).astype(np.float32) for t in TARGETS} for c in sizes}
        loss = 0.0
        for c, n in sizes.items():
            out = ref(torch.tensor([state.extra[CLIENT_INDEX][c]]))
            for k, g in out.items():
                delta = g[0].detach() - torch.from_numpy(trained[c][k])
                loss = loss + n / sum(sizes.values()) * (g[0] * delta).sum()
        grads = torch.autograd.grad(loss, list(ref.parameters()))
        with torch.no_grad():
            d = [g + wd * p for g, p in zip(grads, ref.parameters())]
            bufs = d if bufs is None else [mom * b + di for b, di in zip(bufs, d)]
            for p, b in zip(ref.parameters(), bufs):
                p -= lr * b
        agg = FedTPAggregator(state, cfg)
        for c, n in sizes.items():
            with torch.no_grad():  # what the client received this round, minus what it trained
                received = hn(torch.tensor([state.extra[CLIENT_INDEX][c]]))
            agg.add(_update(c, n, [0, 0], {k: received[k][0].numpy() - v for k, v in trained[c].items()}))
        state = agg.finish()
        for (name, p), q in zip(hn.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_low_rank_heads_generate_the_target_shapes_with_fewer_parameters():
    big = [GenerationTarget(f"l{i}.{k}.weight", (64, 64), i) for i in range(2) for k in "qkv"]
    counts = {}
    for head in ("full", "bottleneck", "factorized"):
        hn = HyperNetwork(5, big, embedding_dim=8, hidden=32, layers=1, head=head, rank=4)
        out = hn(torch.tensor([0, 3]))
        assert list(out) == [t.name for t in big]
        assert all(v.shape == (2, 64, 64) for v in out.values())
        assert not torch.allclose(out["l0.q.weight"][0], out["l0.q.weight"][1])  # clients differ
        counts[head] = sum(p.numel() for p in hn.heads.parameters())
    assert counts["bottleneck"] < counts["full"] / 4 and counts["factorized"] < counts["full"] / 4


# ---------------------------------------------------------------------------------------------
# roles, payloads and routing
# ---------------------------------------------------------------------------------------------


def test_roles_resolve_vit_qkv_weights_and_optionally_biases():
    cfg = vit_config()
    info = DatasetInfo(4, (1, 4, 4), "image")
    model = build_model(cfg.model, info, 0)
    roles = create(cfg.algorithm).roles(model)
    gen = roles.names(Role.GENERATED)
    assert gen == [f"vit.layers.{i}.attention.{k}_proj.weight" for i in range(2) for k in "qkv"]
    assert all(roles[k] == Role.SHARED for k in roles if k not in gen and roles[k] != Role.FROZEN)
    with_bias = FedTP(FedTPConfig(generate_bias=True)).roles(model).names(Role.GENERATED)
    assert set(with_bias) == set(gen) | {k.replace("weight", "bias") for k in gen}
    private = PersonalizedT(PersonalizedTConfig()).roles(model).names(Role.PRIVATE)
    assert private == gen
    per = FedTP(FedTPConfig(private=["preset:head"])).roles(model)  # FedTP-Per: private head too
    assert per.names(Role.PRIVATE) == ["classifier.weight", "classifier.bias"] and per.names(Role.GENERATED) == gen


class _CustomAttention(nn.Module):
    """A model whose projections have non-standard names (needs attention_patterns)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(2, 4)
        self.blocks = nn.ModuleList([nn.ModuleDict({n: nn.Linear(4, 4) for n in ("wq", "wk", "wv", "wo")})
                                     for _ in range(2)])
        self.classifier = nn.Linear(4, 3)


def test_attention_patterns_for_custom_models_and_errors():
    model = _CustomAttention()
    with pytest.raises(ConfigError, match="no attention"):
        FedTP().roles(model)
    pats = {"q": r"\.wq$", "k": r"\.wk$", "v": r"\.wv$"}
    cfg = FedTPConfig(attention_patterns=pats)
    gen = FedTP(cfg).roles(model).names(Role.GENERATED)
    assert gen == [f"blocks.{i}.w{k}.weight" for i in range(2) for k in "qkv"]
    state = FedTP(cfg).init_server(model, FedTP(cfg).roles(model), {0: 5, 1: 7}, seed=0)
    assert [len(h.targets) for h in state.extra[HYPERNET].heads] == [3, 3]  # one head per attention layer
    with pytest.raises(ConfigError, match="algorithm.attention_patterns"):
        small_config(algorithm__name="fedtp", algorithm__attention_patterns="{x: foo}")
    with pytest.raises(ConfigError, match="algorithm.head"):
        small_config(algorithm__name="fedtp", algorithm__head="huge")
    with pytest.raises(ConfigError, match="algorithm.hypernet_lr"):
        small_config(algorithm__name="fedtp", algorithm__hypernet_lr=0)


def test_payloads_in_batches_match_one_pass():
    model = _CustomAttention()
    pats = {"q": r"\.wq$", "k": r"\.wk$", "v": r"\.wv$"}
    ids = list(range(7))
    one = FedTP(FedTPConfig(attention_patterns=pats))
    state = one.init_server(model, one.roles(model), dict.fromkeys(ids, 5), seed=0)
    chunked = FedTP(FedTPConfig(attention_patterns=pats, payload_batch=3)).payloads(state, ids, 0)
    whole = one.payloads(state, ids, 0)
    assert list(chunked) == ids == list(whole)
    for c in ids:
        for k, v in whole[c].items():
            np.testing.assert_allclose(chunked[c][k], v, rtol=1e-6, atol=1e-7)
    with pytest.raises(KeyError, match="personalize_new_client"):
        one.payloads(state, [99], 0)


class _Recording(FedTP):
    """FedTP that records what each client trains from and what it uploads (local executor only)."""

    def __init__(self, config=None):
        super().__init__(config)
        self.start: dict[int, dict[str, torch.Tensor]] = {}
        self.uploads: dict[int, dict[str, np.ndarray]] = {}

    def local_update(self, ctx):
        sd = ctx.model.state_dict()
        self.start[ctx.client_id] = {k: sd[k].detach().clone() for k in ctx.roles.names(Role.GENERATED)}
        tensors, metrics = super().local_update(ctx)
        self.uploads[ctx.client_id] = {k: v.copy() for k, v in tensors.items()}
        return tensors, metrics


def _local(cfg, alg):
    ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    return ds, LocalExecutor(cfg, alg, ds)


def test_clients_train_from_exactly_their_hypernetwork_output():
    cfg = vit_config(rounds=1)
    alg = _Recording(cfg.algorithm)
    ds, ex = _local(cfg, alg)
    sampled = sample_clients(ds.client_ids, 3, cfg.seed, 0)
    hn = ex.server.state.extra[HYPERNET]
    index = ex.server.state.extra[CLIENT_INDEX]
    with torch.no_grad():  # the hypernetwork's own forward, before the round changes it
        batch = hn(torch.tensor([index[c] for c in sampled]))
        expected = {c: {k: v[i].clone() for k, v in batch.items()} for i, c in enumerate(sampled)}
        alone = {c: {k: v[0].clone() for k, v in hn(torch.tensor([index[c]])).items()} for c in sampled}
    ex.train_round(0, sampled)
    assert sorted(alg.start) == sampled
    for c in sampled:
        assert alg.start[c].keys() == expected[c].keys()
        for k, v in expected[c].items():
            assert torch.equal(alg.start[c][k], v), (c, k)  # bit for bit: the same batched pass
            torch.testing.assert_close(alg.start[c][k], alone[c][k])  # one client at a time: same up to rounding
    a, b = sampled[:2]
    assert not torch.equal(alg.start[a][next(iter(expected[a]))], alg.start[b][next(iter(expected[b]))])


def test_shared_averaged_generated_only_to_the_hypernetwork():
    cfg = vit_config(rounds=1, algorithm__hypernet_optimizer="adam", algorithm__hypernet_weight_decay=0.0)
    alg = _Recording(cfg.algorithm)
    ds, ex = _local(cfg, alg)
    gen_names = set(ex.server.roles.names(Role.GENERATED))
    shared = set(ex.server.roles.names(Role.SHARED))
    sampled = [0, 2, 3]
    state0 = ex.server.state
    emb0 = state0.extra[HYPERNET].embeddings.weight.detach().clone()
    broadcast, payloads = ex.server.broadcast(0), ex.server.payloads(0, sampled)
    assert not gen_names & set(broadcast)  # generated tensors are never broadcast
    assert sorted(payloads) == sampled and all(set(p) == gen_names for p in payloads.values())
    ex.train_round(0, sampled)
    state = ex.server.state
    assert not gen_names & set(state.weights) and set(state.weights) == shared
    sizes = ds.client_sizes()
    n = sum(sizes[c] for c in sampled)
    for k in shared:
        mean = sum(sizes[c] * alg.uploads[c][k].astype(np.float64) for c in sampled) / n
        np.testing.assert_allclose(state.weights[k], mean, rtol=1e-5, atol=1e-6)
    assert set(ex.server.received) == shared | gen_names  # generated ones only fed the hypernetwork
    # each client's upload moved only its own embedding row (no weight decay, first Adam step)
    emb1 = state.extra[HYPERNET].embeddings.weight.detach()
    moved = [i for i in range(len(emb0)) if not torch.equal(emb0[i], emb1[i])]
    assert moved == [state.extra[CLIENT_INDEX][c] for c in sampled]


def test_federation_privacy_fedtp_and_personalized_t():
    cfg = vit_config(rounds=2, sample_count=3)
    res = Federation(cfg, run_dir=False).fit()
    ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    model = build_model(cfg.model, ds.info, cfg.seed)
    roles = create(cfg.algorithm).roles(model)
    gen = set(roles.names(Role.GENERATED))
    assert gen <= set(res.server_received) and not gen & set(res.server_state.weights)
    assert res.summary["roles"]["generated"] == 6
    m = res.metrics
    assert {"server_hypernet_seconds", "server_payload_seconds"} <= set(m.metric)

    pt = Federation(cfg.with_algorithm("personalized_t"), run_dir=False).fit()
    assert not gen & set(pt.server_received) and not gen & set(pt.server_state.weights)
    assert pt.summary["roles"]["private"] == 6


def test_personalized_t_keeps_attention_in_each_clients_state():
    cfg = vit_config(rounds=1, algorithm__name="personalized_t")
    alg = create(cfg.algorithm)
    ds, ex = _local(cfg, alg)
    ex.train_round(0, [0, 1])
    private = ex.server.roles.names(Role.PRIVATE)
    s0, s1 = ex.cohort.states[0].private, ex.cohort.states[1].private
    assert sorted(s0) == sorted(private)
    assert not torch.equal(s0[private[0]], s1[private[0]])  # each trained its own
    assert not set(private) & ex.server.received


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------


def _frame(res):
    m = res.metrics
    return m[~m.metric.str.endswith("seconds")].reset_index(drop=True)  # timings vary


@pytest.mark.ray
def test_seed_determinism_one_and_two_actors_and_metrics_file(ray_cluster, tmp_path):
    base = dict(rounds=3, sample_count=4, eval_every=3, runtime__executor="ray", runtime__num_cpus_per_actor=0.5)
    from rayfed.runtime import warm_actors

    with warm_actors(vit_config(**base)):  # the second run reuses the first one's actor processes
        one = Federation(vit_config(**base, runtime__num_actors=1), run_dir=False).fit()
        two = Federation(vit_config(**base, runtime__num_actors=2), run_dir=tmp_path / "run").fit()
    pd.testing.assert_frame_equal(_frame(one), _frame(two))
    for k, v in one.server_state.weights.items():
        np.testing.assert_array_equal(v, two.server_state.weights[k])
    for (name, p), q in zip(one.server_state.extra[HYPERNET].named_parameters(),
                            two.server_state.extra[HYPERNET].parameters()):
        assert torch.equal(p, q), name
    table = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert set(table["round"]) == {1, 2, 3} and set(table.algorithm) == {"fedtp"}
    acc = table[(table.client_id == -1) & (table.metric == "accuracy_mean")]
    assert len(acc) == 1 and acc.value.item() == pytest.approx(two.summary["accuracy_mean"])  # the file = the result
    assert (table.metric == "server_hypernet_seconds").sum() == 3


def _digits(**overrides):
    return small_config(**{
        "data__source": "digits", "data__num_clients": 10, "data__partition__name": "pathological",
        "data__partition__classes_per_client": 2, "model__name": "vit", "model__hidden_size": 16,
        "model__num_heads": 2, "model__num_layers": 1, "model__intermediate_size": 32, "model__patch_size": 2,
        "train__lr": 0.003, "algorithm__name": "fedtp", **overrides})


@pytest.mark.slow
def test_fitting_a_new_clients_embedding_beats_the_mean_embedding():
    cfg = _digits(rounds=8, algorithm__holdout_clients=3)
    res = Federation(cfg, run_dir=False).fit()
    s = res.summary
    held = sorted(res.metrics[res.metrics.stage == "holdout"].client_id.unique())
    assert len(held) == 4 and held[0] == -1  # three clients plus the round-level summary
    trained = set(res.metrics[(res.metrics.stage == "train") & (res.metrics.client_id >= 0)].client_id)
    assert not trained & set(held[1:])  # held-out clients never trained
    assert s["holdout_clients"] == 3
    assert s["holdout_accuracy_mean"] > s["holdout_mean_embedding_accuracy"] + 0.1
    # the Python API on one of them: lower training loss and better test accuracy than the mean embedding
    ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    fit = personalize_new_client(res, None, ds.client_data(int(held[1])), epochs=20, lr=0.05)
    assert fit.metrics["train_loss"] < fit.metrics["train_loss_before"]
    assert fit.metrics["accuracy"] > fit.metrics["mean_embedding_accuracy"]
    assert fit.embedding.shape == (cfg.algorithm.embedding_dim,)
    assert set(fit.generated) == set(res.server_state.extra[HYPERNET].names)


def test_holdout_needs_fewer_than_all_clients():
    cfg = vit_config(algorithm__holdout_clients=6)
    with pytest.raises(ConfigError, match="algorithm.holdout_clients"):
        Federation(cfg, run_dir=False).fit()


def test_checkpoint_resume_restores_the_hypernetwork_and_its_optimizer(tmp_path):
    cfg = vit_config(rounds=3, sample_count=3, output__checkpoint_every=1, output__dir=str(tmp_path))
    full = Federation(cfg, run_dir=tmp_path / "full").fit()
    resumed = Federation(cfg, run_dir=tmp_path / "resumed").fit(
        resume_from=tmp_path / "full" / "checkpoints" / "round_1")
    a, b = full.server_state, resumed.server_state
    for k, v in a.weights.items():
        np.testing.assert_array_equal(v, b.weights[k])
    for (name, p), q in zip(a.extra[HYPERNET].named_parameters(), b.extra[HYPERNET].parameters()):
        assert torch.equal(p, q), name
    assert full.summary["accuracy_mean"] == resumed.summary["accuracy_mean"]


@pytest.mark.ray
def test_evaluation_in_payload_sized_waves_gives_the_same_results(ray_cluster, monkeypatch):
    """At real model sizes one client's generated Q/K/V is tens of MB: evaluation sends them in calls
    of at most CHUNK_BYTES per actor (here one client per call) with the same results."""
    from rayfed.runtime import ray_executor

    base = dict(rounds=2, sample_count=3, eval_every=1, runtime__executor="ray", runtime__num_actors=2,
                runtime__num_cpus_per_actor=0.5)
    whole = Federation(vit_config(**base), run_dir=False).fit()
    sizes = []
    real = ray_executor.RayExecutor._waves

    def spy(self, ids):
        out = real(self, ids)
        sizes.append((len(ids), [len(w) for w in out]))
        return out

    monkeypatch.setattr(ray_executor, "CHUNK_BYTES", 1)
    monkeypatch.setattr(ray_executor.RayExecutor, "_waves", spy)
    waves = Federation(vit_config(**base), run_dir=False).fit()
    assert sizes and all(w == [1] * n for n, w in sizes)  # one client's payload per call
    assert sum(n for n, _ in sizes) == 2 * 6  # every client of both evaluations
    pd.testing.assert_frame_equal(_frame(whole), _frame(waves))


# ---------------------------------------------------------------------------------------------
# the paper's settings and the official ViT
# ---------------------------------------------------------------------------------------------


def test_paper_preset_sets_the_official_hypernetwork_and_explicit_keys_win():
    cfg = small_config(algorithm__name="fedtp", algorithm__preset="paper").algorithm
    assert (cfg.hypernet_optimizer, cfg.hypernet_lr, cfg.hypernet_momentum, cfg.hypernet_weight_decay) == \
        ("sgd", 0.01, 0.9, 1e-3)
    assert (cfg.embedding_dim, cfg.hypernet_hidden, cfg.hypernet_layers, cfg.head, cfg.head_init) == \
        (128, 150, 3, "full", "default")
    plain = small_config(algorithm__name="fedtp").algorithm
    assert (plain.hypernet_optimizer, plain.hypernet_lr) == ("adam", 3e-3)  # the preset is what changed them
    own = small_config(algorithm__name="fedtp", algorithm__preset="paper", algorithm__hypernet_lr=0.05,
                       algorithm__embedding_dim=16).algorithm
    assert (own.hypernet_lr, own.embedding_dim, own.hypernet_optimizer) == (0.05, 16, "sgd")
    from rayfed.config import from_dict, to_dict

    assert from_dict(to_dict(small_config(algorithm__name="fedtp", algorithm__preset="paper"))).algorithm == cfg
    with pytest.raises(ConfigError, match="algorithm.preset"):
        small_config(algorithm__name="fedtp", algorithm__preset="official")


def test_paper_config_file_and_function_restore_the_official_training_keys(tmp_path):
    import rayfed
    from rayfed.algorithms.fedtp import paper_config
    from rayfed.config import load_config

    path = Path(rayfed.__file__).parent / "configs" / "fedtp_paper.yaml"
    as_file = load_config(path)  # what `rayfed run rayfed/configs/fedtp_paper.yaml` runs
    t = as_file.train
    assert (t.optimizer, t.lr, t.momentum, t.weight_decay, t.batch_size, t.local_epochs) == \
        ("sgd", 0.01, 0.9, 1e-5, 64, 1)
    assert as_file.sample_fraction == 0.1 and as_file.sample_count is None
    assert as_file.algorithm == small_config(algorithm__name="fedtp", algorithm__preset="paper").algorithm
    # over a user's own config: its data and FedTP options stay, the paper's keys replace its training keys
    mine = tmp_path / "mine.yaml"
    mine.write_text("data: {source: digits, num_clients: 30}\nsample_count: 5\ntrain: {lr: 0.5, max_steps: 3}\n"
                    "algorithm: {name: fedtp, attention_patterns: {q: 'to_qkv$'}}\n")
    cfg = paper_config(mine, ["rounds=7"])
    assert cfg.data.num_clients == 30 and cfg.rounds == 7 and cfg.sample_count is None
    assert cfg.train.lr == 0.01 and cfg.train.max_steps is None
    assert cfg.algorithm.attention_patterns == {"q": "to_qkv$"} and cfg.algorithm.hypernet_optimizer == "sgd"
    assert paper_config({"algorithm": {"name": "fedper"}}).algorithm.name == "fedtp"


def _official_vit():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import fedtp_vit

    return fedtp_vit


def test_official_vit_factory_has_the_official_fused_qkv_and_fedtp_generates_it():
    ex = _official_vit()
    info = DatasetInfo(4, (1, 4, 4), "image")
    factory = functools.partial(ex.official_vit, patch_size=2, dim=8, depth=2, heads=2, dim_head=4, mlp_dim=16)
    model = factory(info)
    sd = model.state_dict()
    assert tuple(sd["transformer.layers.1.0.fn.to_qkv.weight"].shape) == (3 * 2 * 4, 8)
    assert "transformer.layers.1.0.fn.to_qkv.bias" not in sd  # bias-free, as the official code
    assert model(torch.zeros(3, 1, 4, 4)).shape == (3, 4)
    cfg = vit_config(rounds=1, sample_count=3, algorithm__attention_patterns=ex.ATTENTION_PATTERNS)
    roles = create(cfg.algorithm).roles(model)
    assert roles.names(Role.GENERATED) == [f"transformer.layers.{d}.0.fn.to_qkv.weight" for d in range(2)]
    res = Federation(cfg, model_factory=factory, run_dir=False).fit()
    hn = res.server_state.extra[HYPERNET]
    assert hn.names == roles.names(Role.GENERATED) and [len(h.targets) for h in hn.heads] == [1, 1]
    assert not set(hn.names) & set(res.server_state.weights)  # generated, never averaged


# ---------------------------------------------------------------------------------------------
# asynchronous FedTP
# ---------------------------------------------------------------------------------------------


class _RecordingTrained(FedTP):
    """FedTP that keeps each client's generated tensors after local training (local executor only)."""

    def __init__(self, config=None):
        super().__init__(config)
        self.trained: dict[int, dict[str, np.ndarray]] = {}

    def local_update(self, ctx):
        tensors, metrics = super().local_update(ctx)
        sd = ctx.model.state_dict()
        self.trained[ctx.client_id] = {k: sd[k].detach().numpy().copy() for k in ctx.roles.names(Role.GENERATED)}
        return tensors, metrics


def test_async_fedtp_steps_the_hypernetwork_from_the_generation_the_client_trained_on():
    """A stale update moves the hypernetwork by -lr * step_scale * (received - trained) through the head
    bias (d generation / d bias = I): not by the current generation's difference, and scaled."""
    lr = 0.1
    cfg = vit_config(rounds=1, runtime__mode="async", algorithm__hypernet_optimizer="sgd", algorithm__hypernet_lr=lr,
                     algorithm__hypernet_momentum=0.0, algorithm__hypernet_weight_decay=0.0)
    alg = _RecordingTrained(cfg.algorithm)
    ds, ex = _local(cfg, alg)
    server = ex.server
    received = server.payloads(0, [0])
    stale = ex.cohort.train_async(0, 0, server.broadcast(0), received, nonce=0)
    names = server.state.extra[HYPERNET].names
    for k in names:  # the client sends what it received minus what it trained
        np.testing.assert_allclose(stale.tensors[k], received[0][k] - alg.trained[0][k], rtol=0, atol=1e-6)
    fresh = ex.cohort.train_async(0, 1, server.broadcast(0), server.payloads(0, [1]), nonce=1)
    server.apply_async(0, [fresh], [1.0])  # the server moves on before client 0's update arrives
    hn = server.state.extra[HYPERNET]
    now = server.payloads(0, [0])[0]
    assert not np.allclose(now[names[0]], received[0][names[0]], atol=1e-4)  # the generation moved
    bias = [h.out.bias.detach().clone() for h in hn.heads]
    server.apply_async(0, [stale], [0.5])
    for h, b in zip(hn.heads, bias):
        delta = torch.cat([torch.from_numpy(stale.tensors[t.name]).reshape(-1) for t in h.targets])
        torch.testing.assert_close(h.out.bias.detach(), b - lr * 0.5 * delta, rtol=1e-5, atol=1e-7)
