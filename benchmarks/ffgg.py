"""FFGG (issue 4): the over-personalized synthetic problem, digits with a transformer, and the
throughput of synchronous vs asynchronous training on Ray.

Paper: Mishchenko, Islamov, Gorbunov, Horváth. *Partially Personalized Federated Learning:
Breaking the Curse of Data Heterogeneity.* TMLR 2025, arXiv 2305.18285.

Four parts (each prints a table; figures go to ``--out``):

1. **synthetic** (``data.source=partial_linear``, ``model.name=linear``: 8 clients, shared dim 100,
   private dim 50, no noise). Final test MSE against heterogeneity for FFGG (private ``y_i``),
   FedAvg on all parameters and asynchronous FFGG (simulated delays, delay-adaptive step).
2. **robust**: FFGG on the same problem (8 and 32 clients, all taking part each round) under the
   two attack styles of :mod:`rayfed.robust`: replace-style (a quarter of the clients send -3 x
   their gradient instead of it) and the official code's (``extra_sign_flip``: floor(B/3) extra
   messages, each the negated gradient of a random honest client, scale 1), with the plain mean,
   bucketing(2) + coordinate median (the official notebook's rule) and the coordinate median.
3. **digits**: scikit-learn digits, 10 clients with 2 classes each, a small ViT; FFGG with a
   private classifier head and a shared body (K local steps on the body) against FedAvg, FedPer
   and Local. Mean of the clients' test accuracies after ``--digits-rounds`` rounds.
4. **throughput**: FedAvg on digits (ViT, quantity-skewed clients so local work differs) with 2
   client actors on a Ray started here; client updates per second of the training loop, for
   ``runtime.mode=sync`` and ``async`` (real delays: ``ray.wait`` on in-flight clients), same
   number of updates. Evaluation only after the last round; the median of ``--repeats`` runs after
   a warm-up run is reported (this machine's load makes single runs noisy).

Usage::

    .venv/bin/python benchmarks/ffgg.py                    # all parts, several minutes on 2 cores
    .venv/bin/python benchmarks/ffgg.py --parts robust     # one part
    .venv/bin/python benchmarks/ffgg.py --quick            # smoke mode (fewer rounds and points)
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

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from rayfed import Federation  # noqa: E402
from rayfed.config import from_dict  # noqa: E402

OUTPUT = {"plots": False, "progress": False, "save_final": False}


def synthetic_config(alg: str, h: float, rounds: int, *, num_clients: int = 8, seed: int = 0, **sections: Any):
    d: dict[str, Any] = {
        "seed": seed, "rounds": rounds, "eval_every": max(1, rounds // 10),
        "data": {"source": "partial_linear", "num_clients": num_clients, "partial_linear": {"heterogeneity": h}},
        "model": {"name": "linear"},
        "train": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.0, "batch_size": 150},
        "algorithm": {"name": alg},
        "runtime": {"executor": "local", "torch_threads": 1},
        "output": OUTPUT,
    }
    if alg == "ffgg":
        d["algorithm"].update(tau=10, server_lr=0.5, grad_batches=None)
    for k, v in sections.items():
        d.setdefault(k, {}).update(v)
    return from_dict(d)


def honest_loss(res) -> float:
    m = res.metrics
    byz = set(m[(m.metric == "byzantine") & (m.value == 1)].client_id)
    last = m[(m.stage == "eval") & (m.metric == "loss") & (m["round"] == m["round"].max())]
    return float(last[~last.client_id.isin(byz)].value.mean())


def part_synthetic(args, out: Path) -> dict:
    hs = [0.0, 1.0, 4.0] if args.quick else [0.0, 0.5, 1.0, 2.0, 4.0]
    rounds = 20 if args.quick else args.rounds
    variants = {
        "ffgg": lambda h: synthetic_config("ffgg", h, rounds),
        "fedavg (all shared)": lambda h: synthetic_config("fedavg", h, rounds),
        "ffgg async (simulated)": lambda h: synthetic_config(
            "ffgg", h, rounds, algorithm={"server_lr": 0.05},
            runtime={"mode": "async", "asynchronous": {"staleness_scaling": True}}),
    }
    rows, curves = [], {}
    for h in hs:
        row = {"heterogeneity": h}
        for name, make in variants.items():
            t0 = time.perf_counter()
            res = Federation(make(h), run_dir=False).fit()
            tab = res.round_table()
            row[name] = float(tab.test_loss.iloc[-1])
            row[f"{name} s"] = time.perf_counter() - t0
            if h == hs[-1]:
                curves[name] = (tab["round"].to_numpy(), tab.test_loss.to_numpy())
        rows.append(row)
        print(f"  h={h}: " + ", ".join(f"{k}={v:.3g}" for k, v in row.items() if not k.endswith(" s")), flush=True)
    table = pd.DataFrame(rows)
    _plot_synthetic(table, curves, hs[-1], out / "ffgg_synthetic.png")
    return {"heterogeneity": table, "rounds": rounds}


#: the two attack styles of rayfed.robust, on FFGG's gradients (every client takes part each round)
ATTACKS = {
    "replace-style: 25% of the clients send -3 x their gradient (attack.kind sign_flip)":
        {"fraction": 0.25, "kind": "sign_flip", "scale": 3.0},
    "official: floor(B/3) extra messages, each -1 x a random honest client's gradient (extra_sign_flip)":
        {"fraction": 0.25, "kind": "extra_sign_flip", "scale": 1.0},
}
RULES = {"plain mean": {}, "bucketing(2) + coordinate median": {"rule": "median", "bucket_size": 2},
         "coordinate median": {"rule": "median"}}


def part_robust(args, out: Path) -> dict:
    """Honest clients' test MSE of FFGG (heterogeneity 1) under each attack style and aggregation rule."""
    rounds = 20 if args.quick else args.robust_rounds
    rows = []
    for n in (8, 32):
        clean = synthetic_config("ffgg", 1.0, rounds, num_clients=n)
        rows.append({"clients": n, "attack": "none", "aggregation": "plain mean",
                     "mse": honest_loss(Federation(clean, run_dir=False).fit()), "messages": 0.0})
        for att_name, att in ATTACKS.items():
            for rule_name, agg in RULES.items():
                cfg = synthetic_config("ffgg", 1.0, rounds, num_clients=n, aggregation=agg, attack=att)
                res = Federation(cfg, run_dir=False).fit()
                m = res.metrics
                added = m[m.metric == "server_byzantine_messages"].value
                byz = m[(m.metric == "byzantine") & (m.value == 1)]
                rows.append({"clients": n, "attack": att_name, "aggregation": rule_name, "mse": honest_loss(res),
                             # Byzantine messages per round: added by the server, or sent by attacking clients
                             "messages": float(added.mean()) if len(added) else len(byz) / cfg.rounds})
                print(f"  {n} clients, {att_name[:24]}..., {rule_name}: {rows[-1]['mse']:.3g}", flush=True)
    return {"table": pd.DataFrame(rows), "rounds": rounds}


def _plot_synthetic(table: pd.DataFrame, curves: dict, h_last: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("ffgg", "fedavg (all shared)", "ffgg async (simulated)"):
        axes[0].plot(table.heterogeneity, np.maximum(table[name], 1e-16), "o-", label=name)
        r, v = curves[name]
        axes[1].plot(r, np.maximum(v, 1e-16), label=name)
    axes[0].set(xlabel="heterogeneity (std of private optima)", ylabel="final test MSE", yscale="log",
                title="over-personalized linear problem")
    axes[1].set(xlabel="round (8 client updates)", ylabel="test MSE", yscale="log", title=f"heterogeneity {h_last}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def digits_config(alg: str, rounds: int, **algkw: Any):
    return from_dict({
        "seed": 0, "rounds": rounds, "eval_every": max(1, rounds // 4), "sample_fraction": 0.5,
        "data": {"source": "digits", "num_clients": 10, "partition": {"name": "pathological", "classes_per_client": 2}},
        "model": {"name": "vit", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64,
                  "patch_size": 2},
        "train": {"optimizer": "adam", "lr": 0.003, "batch_size": 16, "local_epochs": 1},
        "algorithm": {"name": alg, **algkw},
        "runtime": {"executor": "local", "torch_threads": 1},
        "output": OUTPUT})


def part_digits(args, out: Path) -> dict:
    rounds = 4 if args.quick else args.digits_rounds
    methods = {
        "fedavg": {}, "fedper": {}, "local": {},
        "ffgg (head private, K=20 body steps)": dict(name="ffgg", tau=10, local_steps=20, server_lr=1.0),
        "ffgg (head private, K=1 gradient, Adam server)": dict(name="ffgg", tau=10, grad_batches=4,
                                                               server_optimizer="adam", server_lr=0.003),
    }
    rows, metrics = [], []
    for label, kw in methods.items():
        kw = dict(kw)
        alg = kw.pop("name", label)
        t0 = time.perf_counter()
        res = Federation(digits_config(alg, rounds, **kw), run_dir=False).fit()
        s = res.summary
        rows.append({"method": label, "accuracy_mean": s["accuracy_mean"], "accuracy_p10": s["accuracy_p10"],
                     "MB_up": s["bytes_up"] / 1e6, "seconds": time.perf_counter() - t0})
        m = res.metrics.copy()
        m["algorithm"] = label
        metrics.append(m)
        print(f"  {label}: acc {s['accuracy_mean']:.3f}", flush=True)
    from rayfed.plots import plot_accuracy

    plot_accuracy(pd.concat(metrics, ignore_index=True), out / "ffgg_digits.png")
    return {"table": pd.DataFrame(rows), "rounds": rounds}


def part_throughput(args, out: Path) -> dict:
    import ray

    rounds = 3 if args.quick else args.tp_rounds
    base = {
        "seed": 0, "rounds": rounds, "eval_every": rounds, "sample_count": 8,
        "data": {"source": "digits", "num_clients": 16, "partition": {"name": "quantity_skew", "alpha": 1.0}},
        "model": {"name": "vit", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64,
                  "patch_size": 2},
        "train": {"optimizer": "adam", "lr": 0.003, "batch_size": 16, "local_epochs": 1},
        "algorithm": {"name": "fedavg"},
        "runtime": {"executor": "ray", "num_actors": 2, "num_cpus_per_actor": 1, "torch_threads": 1},
        "output": OUTPUT,
    }
    modes = {
        "sync": {},
        "async, buffer 1 (real delays)": {"mode": "async", "asynchronous": {"delays": "real", "max_in_flight": 8}},
        "async, buffer 4 (real delays)": {"mode": "async",
                                          "asynchronous": {"delays": "real", "max_in_flight": 8, "buffer_size": 4}},
    }
    rows = []
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        for label, rt in modes.items():
            d = json.loads(json.dumps(base))
            d["runtime"].update(rt)
            rates = []
            for i in range(1 + args.repeats):  # run 0 warms up (actor start, torch first-call costs)
                res = Federation(from_dict(d), run_dir=False).fit()
                m = res.metrics
                train = m[(m.client_id == -1) & (m.stage == "train")]
                loop = float(train[train.metric == "train_seconds"].value.sum())
                updates = int((m[(m.stage == "train") & (m.client_id >= 0)].metric == "train_loss").sum())
                if i or not args.repeats:
                    rates.append(updates / loop)
            rows.append({"mode": label, "updates": updates, "updates_per_s (median)": float(np.median(rates)),
                         "min": min(rates), "max": max(rates), "accuracy_mean": res.summary["accuracy_mean"]})
            print(f"  {label}: {np.median(rates):.2f} updates/s (runs: {', '.join(f'{r:.1f}' for r in rates)})",
                  flush=True)
    finally:
        if started:
            ray.shutdown()
    table = pd.DataFrame(rows)
    table["speed-up vs sync"] = table["updates_per_s (median)"] / table["updates_per_s (median)"].iloc[0]
    return {"table": table, "rounds": rounds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="synthetic,robust,digits,throughput")
    p.add_argument("--rounds", type=int, default=40, help="rounds of the synthetic runs")
    p.add_argument("--robust-rounds", type=int, default=40, help="rounds of the Byzantine runs")
    p.add_argument("--digits-rounds", type=int, default=30)
    p.add_argument("--tp-rounds", type=int, default=12, help="rounds (x 8 updates) of the throughput runs")
    p.add_argument("--repeats", type=int, default=3, help="measured runs per throughput mode (median reported)")
    p.add_argument("--out", default="runs/bench_ffgg", help="folder for the figures")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.repeats = min(args.repeats, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    pd.set_option("display.width", 160)
    if "synthetic" in parts:
        print("== synthetic over-personalized problem (8 clients, shared 100, private 50) ==", flush=True)
        r = part_synthetic(args, out)
        print(f"final test MSE after {r['rounds']} rounds:")
        print(r["heterogeneity"].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        print(f"figure: {out / 'ffgg_synthetic.png'}")
    if "robust" in parts:
        print("== Byzantine clients: FFGG on the synthetic problem (heterogeneity 1, every client each round) ==",
              flush=True)
        r = part_robust(args, out)
        t = r["table"]
        print(f"honest clients' test MSE after {r['rounds']} rounds (messages: Byzantine messages per round):")
        print(t.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        wide = t.pivot_table(index=["attack", "aggregation"], columns="clients", values="mse", sort=False)
        print("\n| attack | aggregation | 8 clients | 32 clients |\n|---|---|---|---|")
        for (att, rule), row in wide.iterrows():
            print(f"| {att} | {rule} | {row[8]:.2g} | {row[32]:.2g} |")
        t.to_csv(out / "ffgg_robust.csv", index=False)
    if "digits" in parts:
        print("== digits, ViT, 10 clients x 2 classes, half sampled per round ==", flush=True)
        r = part_digits(args, out)
        print(f"after {r['rounds']} rounds:")
        print(r["table"].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"figure: {out / 'ffgg_digits.png'}")
    if "throughput" in parts:
        print("== throughput, FedAvg on digits (ViT, quantity skew), 2 client actors on Ray ==", flush=True)
        r = part_throughput(args, out)
        print(r["table"].to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
