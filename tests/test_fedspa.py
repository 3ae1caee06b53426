"""FedSpa: ERK densities, prune/regrow, sparse-to-sparse training, holder means, sparse bytes, mask privacy."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import small_config

from rayfed import Federation
from rayfed.algorithms import create
from rayfed.algorithms.base import ClientContext, ClientUpdate, ServerState
from rayfed.algorithms.fedspa import (
    DENSITIES,
    MASK_SEED,
    MASKED_KEYS,
    POSITIONS,
    FedSpaAggregator,
    anneal_rate,
    erk_densities,
    initial_masks,
    layer_uses,
    masked_gradients,
    prune_and_regrow,
    samples_seen,
    training_flops,
)
from rayfed.config import from_dict
from rayfed.data import FederatedDataset
from rayfed.errors import ConfigError
from rayfed.models import build_model
from rayfed.roles import SERVER_HELD, Role
from rayfed.runtime.executor import LocalExecutor
from rayfed.tensors import SparseTensor, is_sparse, wire_nbytes
from rayfed.training import train_client
from rayfed.tune import load_space

SPACE = Path(__file__).resolve().parent.parent / "tune_spaces" / "fedspa.yaml"


def _config(**kw):
    """Digits (8x8) on a one-block ViT with patch 4: 4 patches + CLS = 5 tokens per image."""
    base = dict(data__source="digits", data__num_clients=4, data__partition__name="iid", model__name="vit",
                model__hidden_size=16, model__num_layers=1, model__num_heads=2, model__intermediate_size=32,
                model__patch_size=4, rounds=2, algorithm__name="fedspa", algorithm__anneal_rounds=2,
                train__batch_size=32, train__max_steps=3)
    base.update(kw)
    return small_config(**base)


def _executor(**kw):
    cfg = _config(**kw)
    ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    alg = create(cfg.algorithm)
    return cfg, ds, alg, LocalExecutor(cfg, alg, ds)


def _context(cfg, cid: int = 0):
    """A client's context as the runtime builds it: its download loaded into a fresh model."""
    ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    model = build_model(cfg.model, ds.info, cfg.seed)
    alg = create(cfg.algorithm)
    roles = alg.roles(model)
    server = alg.init_server(model, roles, ds.client_sizes(), cfg.seed)
    payload = alg.payloads(server, [cid], 0)[cid]
    state = alg.init_client(cid, model, roles)
    alg.load_client_model(model, roles, alg.broadcast(server, 0), payload, state)
    ctx = ClientContext(cid, 0, model, roles, ds.client_data(cid), cfg.train, state, payload, torch.device("cpu"),
                        torch.Generator().manual_seed(0), ds.num_clients)
    return alg, ctx, server


# -- ERK and initial masks ------------------------------------------------------------------------
def test_erk_densities_match_hand_numbers():
    # scores (sum of dims / product): a 12/32, b 10/16; 0.5 * 48 = 24 = eps (12 + 10) -> eps = 12/11
    d = erk_densities({"a": (8, 4), "b": (2, 8)}, 0.5)
    assert d == pytest.approx({"a": 12 / 11 * 12 / 32, "b": 12 / 11 * 10 / 16})
    # density 0.9: b would get 43.2/22 * 10/16 = 1.23 > 1, so b is dense and 0.9 * 48 - 16 = 27.2 = eps * 12
    d = erk_densities({"a": (8, 4), "b": (2, 8)}, 0.9)
    assert d["b"] == 1.0 and d["a"] == pytest.approx(27.2 / 32)
    # a kernel counts its kernel dims: conv (4, 2, 3, 3) scores 12/72, fc (10, 4) 14/40; 0.5 * 112 = eps * 26
    d = erk_densities({"conv": (4, 2, 3, 3), "fc": (10, 4)}, 0.5)
    assert d == pytest.approx({"conv": 56 / 26 * 12 / 72, "fc": 56 / 26 * 14 / 40})
    # the power of the score (DisPFL's erk_power_scale): power 0 is uniform
    assert erk_densities({"conv": (4, 2, 3, 3), "fc": (10, 4)}, 0.5, power=0.0) == pytest.approx(
        {"conv": 0.5, "fc": 0.5})
    assert erk_densities({"a": (8, 4), "b": (2, 8)}, 0.3, distribution="uniform") == {"a": 0.3, "b": 0.3}
    assert erk_densities({"a": (8, 4), "b": (2, 8)}, 1.0) == {"a": 1.0, "b": 1.0}


def test_initial_masks_follow_the_densities_and_the_seed():
    shapes = {"a": (8, 4), "b": (2, 8)}
    dens = erk_densities(shapes, 0.5)
    m = initial_masks(shapes, dens, seed=0, client_id=1)
    assert {k: int(v.sum()) for k, v in m.items()} == {"a": 13, "b": 11}  # round(13.09), round(10.91): 24 in all
    assert all(v.dtype == bool and v.shape == shapes[k] for k, v in m.items())
    again = initial_masks(shapes, dens, seed=0, client_id=1)
    other = initial_masks(shapes, dens, seed=0, client_id=2)
    shared = initial_masks(shapes, dens, seed=0)
    assert all(np.array_equal(m[k], again[k]) for k in shapes)
    assert not np.array_equal(m["a"], other["a"]) and not np.array_equal(m["a"], shared["a"])


def test_the_vit_masks_every_weight_matrix_at_the_configured_global_density():
    cfg = _config(model__num_layers=2)
    ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    model = build_model(cfg.model, ds.info, cfg.seed)
    alg = create(cfg.algorithm)
    roles = alg.roles(model)
    sd = model.state_dict()
    masked = roles.names(Role.MASKED)
    linear_or_conv = [n + ".weight" for n, m in model.named_modules()
                      if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert sorted(masked) == sorted(linear_or_conv) and len(masked) == 2 * 6 + 2  # 6 per block, patch conv, head
    assert all(sd[k].dim() == 1 for k in roles.names(Role.SHARED) if "embeddings" not in k)  # biases, norms
    state = alg.init_server(model, roles, ds.client_sizes(), cfg.seed)
    sizes = {k: sd[k].numel() for k in masked}
    dens = state.extra[DENSITIES]
    assert sum(dens[k] * sizes[k] for k in masked) == pytest.approx(0.5 * sum(sizes.values()))
    assert dens["classifier.weight"] > dens["vit.layers.0.mlp.fc1.weight"]  # ERK: small layers denser
    m = alg.server_masks(state, 3)
    active = sum(int(v.sum()) for v in m.values())
    assert abs(active - 0.5 * sum(sizes.values())) <= len(masked) / 2  # rounding: half an entry per tensor
    # private and frozen tensors are never masked
    alg = create(from_dict({"algorithm": {"name": "fedspa", "private": ["preset:head"]}}).algorithm)
    roles = alg.roles(model)
    assert roles["classifier.weight"] == Role.PRIVATE and roles["vit.layers.0.mlp.fc1.weight"] == Role.MASKED


# -- the mask update --------------------------------------------------------------------------------
def test_anneal_schedule():
    assert anneal_rate(0, 10, 0.5) == 0.5
    assert anneal_rate(2, 10, 0.5) == pytest.approx(0.25 * (1 + math.cos(0.2 * math.pi)))  # 0.45225
    assert anneal_rate(5, 10, 0.5) == pytest.approx(0.25)
    assert anneal_rate(10, 10, 0.5) == 0.0 and anneal_rate(14, 10, 0.5) == 0.0  # after T: no change
    assert anneal_rate(0, 10, 0.2) == pytest.approx(0.2)


def test_prune_and_regrow_on_a_hand_case():
    w = torch.tensor([0.5, -0.1, 0.0, 0.3, 0.0, -0.2, 0.0, 0.0])
    m = torch.tensor([True, True, False, True, False, True, False, False])
    g = torch.tensor([0.0, 0.95, 0.9, 0.0, -0.05, 0.0, 0.4, -0.7])
    # a = 0.5 of 4 active: positions 1 (|-0.1|) and 5 (|-0.2|) go; of the inactive 2, 4, 6, 7 the largest
    # gradients, 2 (0.9) and 7 (0.7), come
    new = prune_and_regrow(w, m, 0.5, scores=g.abs())
    assert new.nonzero().flatten().tolist() == [0, 2, 3, 7]
    assert m.tolist() == [True, True, False, True, False, True, False, False]  # the input is not modified
    # the just-pruned may compete when asked: position 1's gradient (0.95) beats position 7's
    assert prune_and_regrow(w, m, 0.5, scores=g.abs(), regrow_pruned=True).nonzero().flatten().tolist() == [0, 1, 2, 3]
    # floor(0.3 * 4) = 1: only position 1 goes, position 2 comes
    assert prune_and_regrow(w, m, 0.3, scores=g.abs()).nonzero().flatten().tolist() == [0, 2, 3, 5]
    assert torch.equal(prune_and_regrow(w, m, 0.0, scores=g.abs()), m)
    # ties go to the lower position: equal magnitudes prune position 0 first, equal scores grow 2 first
    tie = prune_and_regrow(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([True, True, False, False]), 0.5,
                           scores=torch.zeros(4))
    assert tie.tolist() == [False, True, True, False]
    # random regrowth: only from the inactive positions, seeded, the count kept
    r1 = prune_and_regrow(w, m, 0.5, generator=torch.Generator().manual_seed(3))
    r2 = prune_and_regrow(w, m, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(r1, r2) and int(r1.sum()) == 4
    assert r1[[0, 3]].all() and not r1[[1, 5]].any()
    # a dense tensor (ERK density 1) has nothing to regrow into, so it does not change
    full = torch.ones(6, dtype=torch.bool)
    assert torch.equal(prune_and_regrow(torch.arange(6.0), full, 0.5, scores=torch.ones(6)), full)
    # a 2-D mask keeps its shape and density
    w2, m2 = torch.randn(8, 4), torch.rand(8, 4) < 0.5
    out = prune_and_regrow(w2, m2, 0.5, scores=torch.randn(8, 4).abs())
    assert out.shape == (8, 4) and int(out.sum()) == int(m2.sum()) and not torch.equal(out, m2)


# -- the client step ------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer, extra", [("adam", {}), ("adamw", {"train__weight_decay": 0.1}),
                                              ("sgd", {"train__momentum": 0.9, "train__weight_decay": 0.01,
                                                       "train__grad_clip": 0.5})])
def test_off_mask_weights_and_gradients_stay_exactly_zero(optimizer, extra):
    cfg = _config(train__optimizer=optimizer, train__lr=0.05, **extra)
    alg, ctx, server = _context(cfg)
    masks = {k: v.clone() for k, v in ctx.state.masks.items()}
    assert masks and all(np.array_equal(masks[k].numpy(), ctx.payload[k].mask()) for k in masks)  # adopted
    params = dict(ctx.model.named_parameters())
    before = {k: params[k].detach().clone() for k in masks}
    seen: list[bool] = []  # per backward pass: was every masked gradient zero off its mask?

    def record(p, k):
        seen.append(bool((p.grad[~masks[k]] == 0).all()))

    hooks = [params[k].register_post_accumulate_grad_hook(lambda p, k=k: record(p, k)) for k in masks]
    try:
        up, metrics = alg.local_update(ctx)
    finally:
        for h in hooks:
            h.remove()
    steps = int(metrics["steps"])
    assert steps == 3 and len(seen) == (steps + 1) * len(masks)
    assert all(seen[:steps * len(masks)])  # every training step: exactly zero off the mask
    assert not all(seen[steps * len(masks):])  # the one dense batch of the mask update is dense (the check bites)
    for k, m in masks.items():
        w = params[k].detach()
        assert torch.equal(w[~m], torch.zeros_like(w[~m])), k  # exactly 0.0 after training
        assert not torch.equal(w[m], before[k][m]), k  # the active weights did train
        assert is_sparse(up[k]) and np.array_equal(up[k].mask(), m.numpy())  # the trained positions go up
        np.testing.assert_array_equal(up[k].values, w[m].numpy())
        assert int(ctx.state.masks[k].sum()) == int(m.sum()), k  # density kept by the mask update
    assert 0 < metrics["mask_turnover"] <= 0.5 and metrics["anneal_rate"] == 0.5


def test_an_evolved_upload_covers_the_new_mask_and_sends_regrown_weights_as_zero():
    cfg = _config(algorithm__upload_mask="evolved")
    alg, ctx, server = _context(cfg)
    old = {k: v.clone() for k, v in ctx.state.masks.items()}
    up, _ = alg.local_update(ctx)
    sd = ctx.model.state_dict()
    for k, m in old.items():
        new = ctx.state.masks[k]
        assert np.array_equal(up[k].mask(), new.numpy()), k  # the server will know the evolved mask
        regrown = (new & ~m).numpy()[new.numpy()]  # among the sent values, in position order
        kept = (new & m).numpy()[new.numpy()]
        assert (up[k].values[regrown] == 0).all()
        np.testing.assert_array_equal(up[k].values[kept], sd[k][new & m].numpy())
    agg = alg.aggregator(server, 0)
    agg.add(ClientUpdate(0, 0, len(ctx.data.y_train), dict(up)))
    after = agg.finish()
    # the next download is exactly the client's current mask
    assert all(np.array_equal(alg.server_masks(after, 0)[k], ctx.state.masks[k].numpy()) for k in old)


def test_masked_gradients_hooks_are_removed_on_exit():
    lin = torch.nn.Linear(3, 1, bias=False)
    with masked_gradients(lin, {"weight": torch.tensor([[True, False, True]])}):
        lin(torch.ones(1, 3)).sum().backward()
    assert lin.weight.grad.tolist() == [[1.0, 0.0, 1.0]]
    lin.weight.grad = None
    lin(torch.ones(1, 3)).sum().backward()
    assert lin.weight.grad.tolist() == [[1.0, 1.0, 1.0]]


def test_fixed_masks_of_the_ablation_do_not_change():
    cfg = _config(algorithm__evolve=False)
    alg, ctx, _ = _context(cfg)
    masks = {k: v.clone() for k, v in ctx.state.masks.items()}
    with masked_gradients(ctx.model, masks):  # what local_update trains under (checked above)
        train_client(ctx.model, alg.trained_names(ctx.roles), ctx.data, ctx.train, generator=ctx.generator,
                     device=ctx.device)
    _, metrics = alg.local_update(ctx)
    assert all(torch.equal(ctx.state.masks[k], masks[k]) for k in masks)
    assert metrics["mask_turnover"] == 0 and metrics["anneal_rate"] == 0


def test_flops_count_active_weights_per_token():
    cfg = _config()
    alg, ctx, _ = _context(cfg)
    x = torch.as_tensor(ctx.data.x_train[:2])
    keys = list(ctx.state.masks)
    uses = layer_uses(ctx.model, keys, x)
    assert uses["vit.embeddings.patch_embeddings.projection.weight"] == 4  # one per 4x4 patch of the 8x8 image
    assert uses["vit.layers.0.attention.q_proj.weight"] == uses["vit.layers.0.mlp.fc2.weight"] == 5  # + CLS
    assert uses["classifier.weight"] == 1  # the head reads the CLS token only
    assert samples_seen(10, 4, 4) == 14 and samples_seen(10, 4, 3) == 10 and samples_seen(0, 4, 3) == 0
    # f_S = 2 (5 * 1 + 2 * 3) = 22, f_D = 2 (10 * 1 + 4 * 3) = 44 per sample
    sparse, dense = training_flops({"a": 1.0, "b": 3.0}, {"a": 5, "b": 2}, {"a": 10, "b": 4}, samples=7,
                                   grad_samples=2)
    assert (sparse, dense) == (3 * 22 * 7 + (2 * 22 + 44) * 2, 3 * 44 * 7)
    active = {k: int(v.sum()) for k, v in ctx.state.masks.items()}
    sizes = {k: v.numel() for k, v in ctx.state.masks.items()}
    _, metrics = alg.local_update(ctx)
    n = len(ctx.data.y_train)
    s, d = training_flops(uses, active, sizes, samples=samples_seen(n, 32, 3), grad_samples=32)
    assert metrics["train_flops"] == pytest.approx(s) and metrics["train_flops_dense"] == pytest.approx(d)
    assert metrics["flops_relative"] == pytest.approx(s / d)
    assert metrics["inference_flops_relative"] == pytest.approx(
        sum(active[k] * uses[k] for k in keys) / sum(sizes[k] * uses[k] for k in keys))
    assert 0.4 < metrics["inference_flops_relative"] < 0.6


# -- the server -----------------------------------------------------------------------------------
def _state(w):
    return ServerState({"w": np.asarray(w, np.float32), "b": np.zeros(1, np.float32)},
                       {MASKED_KEYS: ["w"], DENSITIES: {"w": 0.5}, MASK_SEED: 0, POSITIONS: {}}, 0)


def test_holder_mean_of_overlapping_masks_and_the_position_record():
    state = _state([10.0, 10.0, 10.0, 10.0])
    agg = FedSpaAggregator(state)
    agg.add(ClientUpdate(1, 0, 1, {"w": SparseTensor.from_positions((4,), [0, 1], np.float32([1, 2])),
                                   "b": np.float32([1.0])}))
    agg.add(ClientUpdate(2, 0, 3, {"w": SparseTensor.from_positions((4,), [1, 2], np.float32([4, 8])),
                                   "b": np.float32([5.0])}))
    assert state.extra[POSITIONS] == {} and state.weights["w"].tolist() == [10.0] * 4  # add never mutates
    new = agg.finish()
    # position 0: client 1 only; 1: (1 * 2 + 3 * 4) / 4; 2: client 2 only; 3: nobody, keeps 10
    np.testing.assert_allclose(new.weights["w"], [1.0, 3.5, 8.0, 10.0])
    np.testing.assert_allclose(new.weights["b"], [(1 * 1 + 3 * 5) / 4])
    alg = create(from_dict({"algorithm": {"name": "fedspa"}}).algorithm)
    assert alg.server_masks(new, 1)["w"].tolist() == [True, True, False, False]
    assert alg.server_masks(new, 2)["w"].tolist() == [False, True, True, False]
    p = alg.payloads(new, [1, 2, 7], 1)
    assert p[1]["w"].positions().tolist() == [0, 1] and p[1]["w"].values.tolist() == [1.0, 3.5]
    assert p[2]["w"].positions().tolist() == [1, 2] and p[2]["w"].values.tolist() == [3.5, 8.0]
    # a client the server never heard from gets its seeded initial mask
    assert np.array_equal(p[7]["w"].mask(), initial_masks({"w": (4,)}, {"w": 0.5}, 0, 7)["w"])
    assert alg.broadcast(new, 1).keys() == {"b"}  # masked tensors never go to everyone


def test_same_init_mask_gives_every_new_client_one_mask():
    alg = create(from_dict({"algorithm": {"name": "fedspa", "same_init_mask": True}}).algorithm)
    state = _state(np.arange(64.0))
    state.weights["w"] = np.arange(64.0, dtype=np.float32).reshape(8, 8)
    p = alg.payloads(state, [0, 5], 0)
    assert np.array_equal(p[0]["w"].mask(), p[5]["w"].mask()) and p[0]["w"].nnz == 32


# -- a round end to end: bytes, downloads, privacy ----------------------------------------------------
def _sparse_bytes(mask: np.ndarray) -> int:
    """float32 values + the cheaper of int32 indices and a bitmap (SparseTensor's auto encoding)."""
    nnz = int(mask.sum())
    return 4 * nnz + min(4 * nnz, math.ceil(mask.size / 8))


def test_bytes_are_the_sparse_encoding_and_masks_reach_the_server_only_as_upload_positions():
    cfg, ds, alg, ex = _executor()
    server, cohort = ex.server, ex.cohort
    ids = [0, 1, 2, 3]
    sd = build_model(cfg.model, ds.info, cfg.seed).state_dict()
    masked = server.state.extra[MASKED_KEYS]
    dense_keys = [k for k in server.roles.names(*SERVER_HELD) if k not in masked]
    dense_bytes = sum(sd[k].numel() * 4 for k in dense_keys)
    initial = {c: initial_masks({k: tuple(sd[k].shape) for k in masked}, server.state.extra[DENSITIES], cfg.seed, c)
               for c in ids}
    history = []
    for r in range(2):
        b, p = server.broadcast(r), server.payloads(r, ids)
        known = {c: alg.server_masks(server.state, c) for c in ids}
        ups = cohort.train(r, ids, b, p)
        assert all(isinstance(u, ClientUpdate) for u in ups), ups
        server.aggregate(r, ups)
        history.append((p, known, ups))
    for r, (p, known, ups) in enumerate(history):
        for u in ups:
            c = u.client_id
            # the download: the dense tensors and this client's slice at the positions the server knows
            assert set(p[c]) == set(masked) and all(is_sparse(v) for v in p[c].values())
            assert all(np.array_equal(p[c][k].mask(), known[c][k]) for k in masked)
            if r == 0:  # a new client: the seeded initial mask, as sparse as every later download
                assert all(np.array_equal(known[c][k], initial[c][k]) for k in masked)
            else:  # then the positions of its own previous upload
                prev = history[r - 1][2][c].tensors
                assert all(np.array_equal(known[c][k], prev[k].mask()) for k in masked)
            assert u.metrics["bytes_down"] == dense_bytes + sum(_sparse_bytes(known[c][k]) for k in masked)
            # the upload: sparse at the trained positions, bytes = values + encoding, and so in the object store
            assert u.metrics["bytes_up"] == wire_nbytes(u.tensors) == dense_bytes + sum(
                _sparse_bytes(u.tensors[k].mask()) for k in masked)
            assert u.metrics["bytes_up"] < 0.6 * (dense_bytes + sum(sd[k].numel() * 4 for k in masked))
            assert len(pickle.dumps(u.tensors, protocol=5)) < wire_nbytes(u.tensors) + 250 * len(u.tensors)
    # privacy: the server holds, per client, exactly the positions of its last upload, and has received
    # tensors of server-held names only (no mask, no aux entry); the client's evolved mask stays with it
    last = history[-1][2]
    assert set(server.received_names()) == set(server.roles.names(*SERVER_HELD))
    for u in last:
        c = u.client_id
        record = server.state.extra[POSITIONS][c]
        assert set(record) == set(masked)
        assert all(np.array_equal(alg.server_masks(server.state, c)[k], u.tensors[k].mask()) for k in masked)
        assert all(v.dtype == np.uint8 for v in record.values())  # bits, and nothing else of the client
        own = cohort.states[c].masks
        assert any(not np.array_equal(own[k].numpy(), u.tensors[k].mask()) for k in masked)  # evolved since


def test_config_errors_name_the_key():
    for key, value, match in [("density", 0.0, "algorithm.density"), ("density", 1.5, "algorithm.density"),
                              ("anneal", -0.1, "algorithm.anneal"), ("anneal_rounds", 0, "algorithm.anneal_rounds"),
                              ("regrow", "magnitude", "regrow"), ("masked", [], "algorithm.masked"),
                              ("grad_batch_size", 0, "algorithm.grad_batch_size")]:
        with pytest.raises(ConfigError, match=match):
            from_dict({"algorithm": {"name": "fedspa", key: value}})
    with pytest.raises(ConfigError, match="data.tiers"):
        Federation(_config(data__tiers="{1: 0.5, 2: 0.5}", model__num_layers=2), run_dir=False).fit()
    with pytest.raises(ConfigError, match="algorithm.masked"):
        Federation(_config(algorithm__masked="['type:Embedding']"), run_dir=False).fit()


def test_tune_space_sweeps_density_anneal_and_regrow():
    sp = load_space(SPACE)
    assert sp.algorithm == "fedspa"
    assert {"algorithm.density", "algorithm.anneal", "algorithm.regrow"} <= set(sp.space)
    for params in sp.sample(4, seed=0):
        cfg = from_dict({"algorithm": {"name": "fedspa", **{k.split(".")[1]: v for k, v in params.items()
                                                             if k.startswith("algorithm.")}}})
        assert 0 < cfg.algorithm.density <= 1 and cfg.algorithm.regrow in ("gradient", "random")


@pytest.mark.ray
def test_two_rounds_on_ray_write_metrics_and_match_local(ray_cluster, tmp_path):
    kw = dict(rounds=2, runtime__num_actors=2, runtime__num_cpus_per_actor=0.5)
    local = Federation(_config(**kw), run_dir=False).fit()
    remote = Federation(_config(runtime__executor="ray", **kw), run_dir=tmp_path / "run").fit()
    written = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert {"flops_relative", "bytes_up", "bytes_down", "accuracy"} <= set(written.metric)
    cols = ["round", "client_id", "stage", "task", "metric"]
    a = local.metrics[~local.metrics.metric.str.contains("seconds")].sort_values(cols).reset_index(drop=True)
    b = written[~written.metric.str.contains("seconds")].sort_values(cols).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    for k, v in local.server_state.weights.items():
        np.testing.assert_array_equal(v, remote.server_state.weights[k])


def test_resume_from_a_checkpoint_restores_masks_and_the_position_record(tmp_path):
    cfg = _config(rounds=4, algorithm__anneal_rounds=4, sample_count=2, output__checkpoint_every=2,
                  output__dir=str(tmp_path), output__name="run")
    full = Federation(cfg).fit()
    resumed = Federation(cfg, run_dir=tmp_path / "resumed").fit(resume_from=tmp_path / "run/checkpoints/round_2")
    cols = ["round", "client_id", "stage", "task", "exit", "metric"]
    timeless = lambda m: m[~m.metric.str.contains("seconds")].sort_values(cols).reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(timeless(full.metrics), timeless(resumed.metrics))
    for k, v in full.server_state.weights.items():
        np.testing.assert_array_equal(v, resumed.server_state.weights[k])
    a, b = full.server_state.extra[POSITIONS], resumed.server_state.extra[POSITIONS]
    assert a.keys() == b.keys() and all(np.array_equal(a[c][k], b[c][k]) for c in a for k in a[c])
