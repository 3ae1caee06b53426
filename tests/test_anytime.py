"""Anytime adapters (issue 12): the exit adapter's maths, the backbone wiring, depth tiers, roles and baselines."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import small_config
from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

from rayfed import Federation
from rayfed.algorithms.anytime import Anytime, AnytimeConfig, exit_weights
from rayfed.algorithms.base import ClientContext
from rayfed.clients import Structure
from rayfed.config import from_dict
from rayfed.data import FederatedDataset
from rayfed.errors import ConfigError
from rayfed.models.exits import ExitAdapter, anytime_model
from rayfed.models.prepare import build_structure
from rayfed.roles import SERVER_HELD, Role


def _only_here(monkeypatch, cls) -> None:
    from rayfed import registry

    monkeypatch.setitem(registry._REGISTRY, cls.name, cls)


# ---------------------------------------------------------------------------------------------
# the exit adapter and the model around it


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _lin(x, layer):
    return x @ layer.weight.T + layer.bias


def reference_adapter(a: ExitAdapter, cls_states: torch.Tensor, token: torch.Tensor):
    """The adapter's maths written out (module docstring of rayfed.models.exits), one sample at a time."""
    eps = a.norm.eps
    logits, new = [], []
    for c in cls_states:  # (l, D)
        ctx = torch.cat([c, token[None]], 0)
        u = _lin(_ln(ctx, a.norm_in.weight, a.norm_in.bias, eps), a.down) + a.position
        z = u[c.shape[0] - 1]
        for blk in a.stack:
            heads = blk.heads
            dh = z.shape[0] // heads
            cu = _ln(u, blk.norm1.weight, blk.norm1.bias, eps)
            q = _lin(_ln(z, blk.norm1.weight, blk.norm1.bias, eps), blk.query)
            k, v = _lin(cu, blk.key), _lin(cu, blk.value)
            parts = []
            for h in range(heads):
                s = slice(h * dh, (h + 1) * dh)
                scores = torch.stack([q[s] @ k[t, s] for t in range(k.shape[0])]) / math.sqrt(dh)
                p = torch.exp(scores - scores.max())
                p = p / p.sum()
                parts.append(sum(p[t] * v[t, s] for t in range(k.shape[0])))
            z = z + _lin(torch.cat(parts), blk.out)
            hid = _lin(_ln(z, blk.norm2.weight, blk.norm2.bias, eps), blk.fc1)
            hid = 0.5 * hid * (1 + torch.erf(hid / math.sqrt(2)))
            z = z + _lin(hid, blk.fc2)
        hz = _ln(z, a.norm.weight, a.norm.bias, eps)
        logits.append(_lin(hz, a.head))
        new.append(c[-1] + _lin(hz, a.up))
    return torch.stack(logits), torch.stack(new)


def test_exit_adapter_matches_a_hand_written_reference():
    torch.manual_seed(0)
    a = ExitAdapter(6, 3, 5, width=4, heads=2, depth=2, mlp_ratio=1.5).double()
    with torch.no_grad():  # every tensor non-trivial (up starts at zero, norms at 1/0)
        for p in a.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    cls_states, token = torch.randn(4, 3, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    logits, new_cls = a(cls_states, token)
    ref_logits, ref_new = reference_adapter(a, cls_states, token)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(new_cls, ref_new, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="reads 3"):
        a(cls_states[:, :2], token)


def test_an_untrained_adapter_writes_the_cls_back_unchanged():
    torch.manual_seed(0)
    a = ExitAdapter(6, 2, 3, width=4, heads=1)
    cls_states = torch.randn(3, 2, 6)
    _, new_cls = a(cls_states, torch.zeros(6))
    assert torch.equal(new_cls, cls_states[:, -1])  # up starts at exactly zero
    assert ExitAdapter(6, 2, 3, width=4, heads=1, write_back=False)(cls_states, torch.zeros(6))[1] is None


def tiny_bert(layers: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(1)
    return BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=layers,
                                                    num_attention_heads=2, intermediate_size=24, num_labels=3))


def tiny_vit(layers: int = 3) -> ViTForImageClassification:
    torch.manual_seed(1)
    return ViTForImageClassification(ViTConfig(image_size=8, num_channels=1, patch_size=4, hidden_size=16,
                                               num_hidden_layers=layers, num_attention_heads=2, intermediate_size=24,
                                               num_labels=3))


def _tokens() -> torch.Tensor:
    x = torch.randint(1, 40, (4, 9), generator=torch.Generator().manual_seed(2))
    x[2:, 6:] = 0  # padding
    return x


def test_the_backbone_runs_once_per_batch_and_reads_hf_s_own_states():
    hf = tiny_bert()
    hf.eval()
    x = _tokens()
    with torch.no_grad():
        ref = hf.bert(input_ids=x, attention_mask=(x != 0).long(), output_hidden_states=True).hidden_states
    torch.manual_seed(0)
    model = anytime_model(hf, depth=None, num_classes=3, width=8, heads=2)
    seen: list[torch.Tensor] = []
    calls = [0, 0, 0]

    def count(index):
        def hook(mod, args, out):
            calls[index] += 1
            seen.append(out)
        return hook

    for i, blk in enumerate(model.blocks()):
        blk.register_forward_hook(count(i))
    with torch.no_grad():
        outs = model.forward_exits(x)
    assert calls == [1, 1, 1] and len(outs) == 3  # one pass for all three exits
    for i in range(3):  # untrained adapters leave the pre-trained forward pass as it was
        torch.testing.assert_close(seen[i], ref[i + 1], rtol=0, atol=1e-6)
    assert torch.equal(model(x), outs[-1])
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert model.exits[2].up is None and model.exits[1].up is not None


def test_each_adapter_writes_its_modulated_cls_into_the_next_block():
    hf = tiny_bert()
    hf.eval()
    x = _tokens()
    torch.manual_seed(0)
    model = anytime_model(hf, depth=None, num_classes=3, width=8, heads=2)
    with torch.no_grad():
        for e in model.exits[:2]:
            e.up.weight.normal_()
            e.up.bias.normal_()
        model.client_token.normal_()
        got = model.forward_exits(x)
    # the reference: HF's own BertModel forward (its own embeddings and masks), with block l+1's
    # input [CLS] replaced by exit l's output, computed from the [CLS] states HF produced
    token, states, logits = model.client_token, [], []

    def pre_hook(index):
        def hook(mod, args, kwargs):
            h = args[0]
            if index:
                y, new = model.exits[index - 1](torch.stack(states, 1), token)
                logits.append(y)
                h = torch.cat([new[:, None], h[:, 1:]], 1)
            return (h, *args[1:]), kwargs
        return hook

    def post_hook(mod, args, out):
        states.append(out[:, 0])

    for i, blk in enumerate(model.blocks()):
        blk.register_forward_pre_hook(pre_hook(i), with_kwargs=True)
        blk.register_forward_hook(post_hook)
    with torch.no_grad():
        model.backbone(input_ids=x, attention_mask=(x != 0).long())
        logits.append(model.exits[2](torch.stack(states, 1), token)[0])
    for a, b in zip(got, logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.allclose(got[2], anytime_model(tiny_bert(), depth=None, num_classes=3, width=8, heads=2)(x))


def test_vit_backbone_states_and_depth_cuts_share_names_shapes_and_values():
    vit = tiny_vit()
    vit.eval()
    img = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = vit.vit(img, output_hidden_states=True).hidden_states
    torch.manual_seed(5)
    deep = anytime_model(vit, depth=None, num_classes=3, width=8, heads=2).eval()
    seen = []
    for blk in deep.blocks():
        blk.register_forward_hook(lambda mod, args, out: seen.append(out) and None)
    with torch.no_grad():
        deep.forward_exits(img)
    for i in range(3):
        torch.testing.assert_close(seen[i], ref[i + 1], rtol=0, atol=1e-6)
    vit2 = tiny_vit()
    torch.manual_seed(5)
    shallow = anytime_model(vit2, depth=1, num_classes=3, width=8, heads=2)
    sd, dd = shallow.state_dict(), deep.state_dict()
    assert set(sd) < set(dd) and not any(k.startswith(("exits.1.", "exits.2.", "backbone.layers.1")) for k in sd)
    for k, v in sd.items():  # the same seed gives the same token, first exit and blocks at every depth
        assert torch.equal(v, dd[k]), k
    assert shallow.depth == 1 and len(shallow.forward_exits(img)) == 1


# ---------------------------------------------------------------------------------------------
# federated runs: depth tiers, roles, bytes


def _vit_config(**kw):
    base = dict(data__source="digits", data__num_clients=6, data__partition__name="iid", model__name="vit",
                model__hidden_size=16, model__num_layers=3, model__num_heads=2, model__intermediate_size=16,
                model__patch_size=4, algorithm__name="anytime", algorithm__tiers="{1: 0.34, 2: 0.33, 3: 0.33}",
                algorithm__adapter_width=8, algorithm__adapter_heads=2, rounds=1, train__max_steps=3)
    base.update(kw)
    return small_config(**base)


def _tiers(cfg) -> dict[int, int]:
    from rayfed.plan import make_plan

    ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    plan = make_plan(cfg, Anytime(cfg.algorithm), ds)
    return {c: s.tier for c, s in plan.specs.items()}


class ConstAnytime(Anytime):
    """Receives like anytime, then uploads its server-held tensors filled with ``client_id + 1``."""

    name = "const_anytime"
    received: dict[int, list[str]] = {}
    sent: dict[int, list[str]] = {}

    def load_client_model(self, model, roles, broadcast, payload, state):
        type(self).received[state.client_id] = sorted(broadcast)
        super().load_client_model(model, roles, broadcast, payload, state)

    def local_update(self, ctx: ClientContext):
        sd = ctx.model.state_dict()
        with torch.no_grad():
            for k in ctx.roles.names(*SERVER_HELD):
                sd[k].fill_(float(ctx.client_id + 1))
        up = self.upload(ctx)
        type(self).sent[ctx.client_id] = sorted(up)
        return up, {"train_loss": 0.0}


def _exit_of(key: str) -> int:
    return int(key.split(".")[1]) + 1


def test_a_client_exchanges_only_its_exits_and_each_exit_is_averaged_over_its_holders(monkeypatch):
    _only_here(monkeypatch, ConstAnytime)
    ConstAnytime.received, ConstAnytime.sent = {}, {}
    cfg = _vit_config(algorithm__name="const_anytime")
    tiers = _tiers(cfg)
    assert sorted(tiers.values()) == [1, 1, 2, 2, 3, 3]
    result = Federation(cfg, run_dir=False).fit()
    w = result.server_state.weights
    assert {_exit_of(k) for k in w} == {1, 2, 3} and all(k.startswith("exits.") for k in w)
    for c, t in tiers.items():  # a depth-t client never receives or sends exit t+1's adapter
        for keys in (ConstAnytime.received[c], ConstAnytime.sent[c]):
            assert keys and {_exit_of(k) for k in keys} == set(range(1, t + 1)), (c, t)
    n = FederatedDataset.from_config(cfg.data, cfg.seed).client_sizes()
    for k, v in w.items():  # holder-count (sample-weighted) mean of exit e over the clients of depth >= e
        holders = [c for c, t in tiers.items() if t >= _exit_of(k)]
        expected = sum(n[c] * (c + 1) for c in holders) / sum(n[c] for c in holders)
        np.testing.assert_allclose(v, expected, rtol=1e-6, err_msg=k)
    roles = result.summary["structures"]
    assert {s: r["clients"] for s, r in roles.items()} == {"depth 1": 2, "depth 2": 2, "depth 3": 2}
    m = result.metrics
    rows = m[(m.stage == "train") & (m.client_id >= 0) & (m.exit == -1)]
    up = rows[rows.metric == "bytes_up"].set_index("client_id").value
    down = rows[rows.metric == "bytes_down"].set_index("client_id").value
    for c, t in tiers.items():  # bytes follow the depth: only its exits' float32 tensors, both ways
        nbytes = sum(v.nbytes for k, v in w.items() if _exit_of(k) <= t)
        assert up[c] == down[c] == nbytes


class RecordingAnytime(Anytime):
    """Anytime, recording each client's model before and after its local update."""

    name = "recording_anytime"
    before: dict[int, dict[str, torch.Tensor]] = {}
    after: dict[int, dict[str, torch.Tensor]] = {}
    roles_of: dict[int, dict[str, Role]] = {}
    finalized: dict[int, tuple[dict, dict]] = {}

    def local_update(self, ctx):
        type(self).before[ctx.client_id] = {k: v.clone() for k, v in ctx.model.state_dict().items()}
        out = super().local_update(ctx)
        type(self).after[ctx.client_id] = {k: v.clone() for k, v in ctx.model.state_dict().items()}
        type(self).roles_of[ctx.client_id] = dict(ctx.roles.roles)
        return out

    def finalize_client(self, ctx):
        b = {k: v.clone() for k, v in ctx.model.state_dict().items()}
        out = super().finalize_client(ctx)
        type(self).finalized[ctx.client_id] = (b, {k: v.clone() for k, v in ctx.model.state_dict().items()})
        return out


def _changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_training_changes_only_exits_and_token_and_nothing_frozen_or_private_is_sent(monkeypatch):
    _only_here(monkeypatch, RecordingAnytime)
    for d in (RecordingAnytime.before, RecordingAnytime.after, RecordingAnytime.roles_of):
        d.clear()
    cfg = _vit_config(algorithm__name="recording_anytime", rounds=2, sample_count=6)
    result = Federation(cfg, run_dir=False).fit()
    for c, roles in RecordingAnytime.roles_of.items():
        changed = _changed(RecordingAnytime.before[c], RecordingAnytime.after[c])
        frozen = {k for k, r in roles.items() if r == Role.FROZEN}
        assert frozen and all(k.startswith("backbone.") for k in frozen)
        assert not changed & frozen  # the backbone is unchanged by training
        assert changed <= {k for k, r in roles.items() if r in (Role.TIERED, Role.PRIVATE)}
        assert "client_token" in changed and roles["client_token"] == Role.PRIVATE
        assert any(k.startswith("exits.0.") for k in changed)
    received = set(result.server_received)  # what the server ever got
    assert received and all(k.startswith("exits.") for k in received)
    assert result.summary["roles"] == {"private": 1, "frozen": 54, "tiered": 79}
    tokens = [RecordingAnytime.after[c]["client_token"] for c in range(2)]
    assert not torch.equal(*tokens)  # each client keeps its own token
    losses = result.metrics[(result.metrics.metric == "train_loss") & (result.metrics.client_id == 0)]
    assert sorted(set(losses.exit)) == [-1, *range(1, _tiers(cfg)[0] + 1)]  # per-exit train losses


def test_personal_heads_stay_home_and_finetuning_touches_only_the_private_part(monkeypatch):
    _only_here(monkeypatch, RecordingAnytime)
    RecordingAnytime.finalized.clear()
    cfg = _vit_config(algorithm__name="recording_anytime", algorithm__personal="[client_token, heads]",
                      algorithm__finetune_epochs=1.0)
    result = Federation(cfg, run_dir=False).fit()
    received = set(result.server_received)
    assert received and not any(".head." in k for k in received)
    for before, after in RecordingAnytime.finalized.values():
        changed = _changed(before, after)
        assert changed and all(k == "client_token" or ".head." in k for k in changed), changed
    m = result.metrics
    final = m[(m.stage == "final") & (m.metric == "accuracy") & (m.client_id >= 0) & (m.exit == -1)]
    assert sorted(final.client_id) == list(range(6)) and "exits" in result.summary
    assert (m[m.metric == "finetune_loss"].value > 0).all()


def test_personal_adapters_stay_home_and_the_token_is_shared_when_not_personal():
    cfg = _vit_config(algorithm__personal="[adapters]")
    result = Federation(cfg, run_dir=False).fit()
    received = set(result.server_received)
    # only the heads and the (now shared) client token reach the server
    assert "client_token" in received and received - {"client_token"}
    assert all(k == "client_token" or ".head." in k for k in received), received
    assert result.summary["roles"]["shared"] == 1


def test_exclusive_trains_only_the_deepest_tier_and_inclusive_only_last_exits():
    cfg = _vit_config(algorithm__participation="exclusive", sample_count=6)
    tiers = _tiers(cfg)
    result = Federation(cfg, run_dir=False).fit()
    m = result.metrics
    rows = m[(m.stage == "train") & (m.client_id >= 0) & (m.exit == -1)]
    steps = rows[rows.metric == "steps"].set_index("client_id").value
    up = rows[rows.metric == "bytes_up"].set_index("client_id").value
    for c, t in tiers.items():
        assert (steps[c] > 0) == (t == 3) and (up[c] > 0) == (t == 3)
    evals = m[(m.stage == "eval") & (m.metric == "accuracy") & (m.exit == -1) & (m.client_id >= 0)]
    assert sorted(evals.client_id) == list(range(6))  # every client is still evaluated

    inclusive = _vit_config(algorithm__tiers="{2: 0.5, 3: 0.5}", algorithm__exit_loss="last", sample_count=6)
    res = Federation(inclusive, run_dir=False).fit()
    ds = FederatedDataset.from_config(inclusive.data, inclusive.seed)
    initial, _ = build_structure(inclusive.model, ds.info, inclusive.seed, Anytime(inclusive.algorithm),
                                 Structure(tier=3))
    init = initial.state_dict()
    w = res.server_state.weights
    # nobody's last exit is exit 1: its head never trains; exit 2 (depth-2 clients' last) does
    for k in ("exits.0.head.weight", "exits.0.head.bias"):
        np.testing.assert_array_equal(w[k], init[k].numpy())
    assert not np.array_equal(w["exits.1.head.weight"], init["exits.1.head.weight"].numpy())


def test_exit_weights_and_flops_follow_the_depth():
    assert exit_weights(AnytimeConfig(), 3) == [1.0, 1.0, 1.0]
    assert exit_weights(AnytimeConfig(exit_weights=[0.5, 1.0, 2.0]), 2) == [0.5, 1.0]
    assert exit_weights(AnytimeConfig(exit_loss="last"), 3) == [0.0, 0.0, 1.0]
    cfg = _vit_config(sample_count=6)
    tiers = _tiers(cfg)
    m = Federation(cfg, run_dir=False).fit().metrics
    rows = m[(m.stage == "train") & (m.client_id >= 0) & (m.exit == -1)]
    wide = rows.pivot_table(index="client_id", columns="metric", values="value")
    per_sample = {t: {float(wide.flops[c] / (wide.steps[c] * cfg.train.batch_size)) for c in tiers if tiers[c] == t}
                  for t in (1, 2, 3)}
    # every client trained max_steps full batches: FLOPs per sample are one number per depth, rising with it
    assert all(len(v) == 1 for v in per_sample.values())
    f1, f2, f3 = (next(iter(per_sample[t])) for t in (1, 2, 3))
    assert 0 < f1 < f2 < f3


def test_vision_run_from_a_local_vit_folder_reports_every_exit_and_plots_accuracy_by_exit(tmp_path):
    tiny_vit().save_pretrained(tmp_path / "vit")  # a ViT backbone loaded like a pre-trained one
    cfg = _vit_config(output__plots=True, rounds=2, model__name="pretrained", model__path=str(tmp_path / "vit"))
    tiers = _tiers(cfg)
    result = Federation(cfg, run_dir=tmp_path / "run").fit()
    m = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    acc = m[(m.stage == "eval") & (m.metric == "accuracy") & (m.client_id >= 0) & (m["round"] == 2)]
    for c, t in tiers.items():
        rows = acc[acc.client_id == c].set_index("exit").value
        assert sorted(rows.index) == [-1, *range(1, t + 1)] and rows[-1] == rows[t]  # headline = deepest exit
    assert set(result.summary["exits"]) == {1, 2, 3}
    assert (tmp_path / "run" / "exit_accuracy.png").exists()
    assert result.summary["roles"]["frozen"] == 54  # the loaded backbone, whole


def test_local_training_follows_the_train_section_through_the_stepper():
    # two accumulated batches of 8 are one step on the same 16 samples (the same shuffle): the
    # same exits as one batch of 16, so train.grad_accumulation reaches the exit loss
    sgd = dict(train__optimizer="sgd", train__lr=0.5, sample_count=6)  # linear in the gradient
    one = Federation(_vit_config(train__batch_size=16, train__max_steps=1, **sgd), run_dir=False).fit()
    two = Federation(_vit_config(train__batch_size=8, train__grad_accumulation=2, train__max_steps=2, **sgd),
                     run_dir=False).fit()
    w1, w2 = one.server_state.weights, two.server_state.weights
    assert set(w1) == set(w2)
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=0, atol=1e-6, err_msg=k)
    # without accumulation, two steps of 8 move the exits elsewhere
    plain = Federation(_vit_config(train__batch_size=8, train__max_steps=2, **sgd), run_dir=False).fit()
    assert not np.allclose(plain.server_state.weights["exits.0.head.weight"], w1["exits.0.head.weight"], atol=1e-5)


@pytest.mark.parametrize("override, match", [
    ({"tiers": {2: 0.5, 4: 0.4}}, "sum to 1"),
    ({"tiers": {0: 1.0}}, "algorithm.tiers"),
    ({"adapter_width": 10, "adapter_heads": 4}, "algorithm.adapter_width"),
    ({"participation": "exclusive"}, "needs algorithm.tiers"),
    ({"personal": ["heads", "heads"]}, "without repeats"),
    ({"personal": ["body"]}, "'body'"),
    ({"exit_weights": [0.0, 0.0]}, "not all zero"),
    ({"exit_loss": "mean"}, "valid choices"),
])
def test_config_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        from_dict({"algorithm": {"name": "anytime", **override}})


@pytest.mark.parametrize("kw, match", [
    ({"algorithm__tiers": "{2: 0.5, 4: 0.5}"}, r"algorithm.tiers.*depth 4 is not in 1..3"),
    ({"model__peft__type": "lora"}, "model.peft.type"),
    ({"algorithm__exit_weights": "[1.0, 2.0]"}, "algorithm.exit_weights"),
    ({"algorithm__exit_weights": "[0.0, 0.0, 1.0]"}, r"exits 1..1, whose weights \[0.0\] are all zero"),
    ({"model__name": "mlp"}, "BERT or ViT"),
])
def test_models_that_do_not_fit_are_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        Federation(_vit_config(**kw), run_dir=False).fit()


# ---------------------------------------------------------------------------------------------
# the real MiniLM on Ray, three tiers


@pytest.mark.ray
@pytest.mark.slow
def test_minilm_three_tiers_on_ray_report_every_exit_in_metrics_parquet(ray_cluster, minilm_path, tmp_path):
    words = ["good great fine nice happy", "bad awful poor sad angry", "red blue green pink gray"]
    rng = np.random.default_rng(0)
    labels = np.arange(72) % 3
    texts = [" ".join(rng.choice(words[y].split(), size=5)) for y in labels]
    pq.write_table(pa.table({"text": texts, "label": labels}), tmp_path / "text.parquet")
    cfg = small_config(data__source="parquet", data__path=str(tmp_path / "text.parquet"), data__text_column="text",
                       data__tokenizer=minilm_path, data__max_length=12, data__num_clients=6,
                       data__partition__name="iid", model__name="pretrained", model__path=minilm_path,
                       algorithm__name="anytime", algorithm__tiers="{2: 0.34, 4: 0.33, 6: 0.33}", rounds=2,
                       train__batch_size=8, runtime__executor="ray", runtime__num_actors=2,
                       runtime__num_cpus_per_actor=0.5, output__plots=True)
    tiers = _tiers(cfg)
    assert sorted(tiers.values()) == [2, 2, 4, 4, 6, 6]
    result = Federation(cfg, run_dir=tmp_path / "run").fit()
    m = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    acc = m[(m.stage == "eval") & (m.metric == "accuracy") & (m.client_id >= 0)]
    for r in (1, 2):
        for c, t in tiers.items():
            assert sorted(acc[(acc["round"] == r) & (acc.client_id == c)].exit) == [-1, *range(1, t + 1)]
    assert set(result.summary["exits"]) == set(range(1, 7))
    received = set(result.server_received)
    assert received and all(k.startswith("exits.") for k in received)  # no MiniLM weight, no token
    up = m[(m.stage == "train") & (m.metric == "bytes_up") & (m.client_id >= 0) & (m["round"] == 1)]
    by_tier = {t: set(up[up.client_id.isin([c for c in tiers if tiers[c] == t])].value) for t in (2, 4, 6)}
    assert all(len(v) == 1 for v in by_tier.values())
    assert next(iter(by_tier[2])) < next(iter(by_tier[4])) < next(iter(by_tier[6]))
    assert (tmp_path / "run" / "exit_accuracy.png").exists()
