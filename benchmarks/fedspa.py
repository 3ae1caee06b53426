"""FedSpa (issue 13): personalized sparse masks against dense baselines and a fixed-mask ablation.

Paper: Huang, Liu, Shen, He, Lin, Tao. *Achieving Personalized Federated Learning with Sparse
Local Models.* arXiv 2201.11380.

One experiment, every method on the same data, partition, model, seeds and rounds: MNIST (28x28,
from the package index; ``--max-samples`` of the 70,000 as a seeded subset), Dirichlet(0.3) label
skew over ``--clients`` clients, 10% sampled per round, a small ViT (patch 7: 16 patches + CLS).
Methods: FedSpa (density ``--density``, ERK, gradient regrowth), the fixed random mask ablation
(FedSpa with ``algorithm.evolve=false``: sparse training, no prune/regrow, sub-FedAvg-style),
FedAvg, FedPer, FedRep and Local; opt-in, FedSpa with ``algorithm.upload_mask=evolved``.

Reported per method (mean over ``--seeds``): client-mean test accuracy of the personalized models
after the last round, its 10th percentile over clients (p10), MB up and MB down per round (the
sum over the round's clients of what crossed the wire, ``rayfed.tensors.wire_nbytes``), and the
training FLOPs relative to dense (FedSpa's ``flops_relative``: masked layers' active weights, see
``rayfed.algorithms.fedspa``; 1 for the dense methods). Ratios against FedAvg and the issue's
claims are printed after the table, each marked held or NOT held.

Usage::

    .venv/bin/python benchmarks/fedspa.py                     # the README table (about 25 min on 2 cores)
    .venv/bin/python benchmarks/fedspa.py --rounds 40 --seeds 0 1
    .venv/bin/python benchmarks/fedspa.py --quick             # smoke mode (a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from rayfed import Federation  # noqa: E402
from rayfed.config import from_dict  # noqa: E402

#: label -> (algorithm name, algorithm options beyond the defaults)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedspa": ("fedspa", {}),
    "fixed mask": ("fedspa", {"evolve": False}),
    "fedavg": ("fedavg", {}),
    "fedper": ("fedper", {}),
    "fedrep": ("fedrep", {}),
    "local": ("local", {}),
    "fedspa evolved-upload": ("fedspa", {"upload_mask": "evolved"}),
}
#: what runs without --methods (the README table); the upload variant is opt-in
DEFAULT_METHODS = ["fedspa", "fixed mask", "fedavg", "fedper", "fedrep", "local"]


def make_config(method: str, args, seed: int):
    name, options = METHODS[method]
    alg: dict[str, Any] = {"name": name, **options}
    if name == "fedspa":
        alg.update(density=args.density, anneal_rounds=args.rounds)
    return from_dict({
        "seed": seed, "rounds": args.rounds, "sample_fraction": 0.1, "eval_every": max(1, args.rounds // 5),
        "data": {"source": args.source, "num_clients": args.clients, "packaged": {"max_samples": args.max_samples},
                 "partition": {"name": "dirichlet", "alpha": 0.3, "min_samples": 20}},
        "model": {"name": "vit", "hidden_size": args.hidden, "num_layers": 2, "num_heads": 4,
                  "intermediate_size": 2 * args.hidden, "patch_size": 7},
        "train": {"batch_size": 32, "optimizer": "adam", "lr": args.lr, "local_epochs": args.local_epochs},
        "algorithm": alg,
        "runtime": {"executor": "local", "torch_threads": 1},
        "output": {"plots": False, "progress": False, "save_final": False},
    })


def run_one(method: str, args, seed: int) -> dict[str, Any]:
    cfg = make_config(method, args, seed)
    t0 = time.perf_counter()
    res = Federation(cfg, run_dir=False).fit()
    m = res.metrics
    train = m[(m.stage == "train") & (m.client_id >= 0)]
    flops = train[train.metric == "flops_relative"].value
    s = res.summary
    return {"method": method, "seed": seed, "accuracy_mean": s["accuracy_mean"], "accuracy_p10": s["accuracy_p10"],
            "mb_up_per_round": s["bytes_up"] / cfg.rounds / 1e6,
            "mb_down_per_round": s["bytes_down"] / cfg.rounds / 1e6,
            "flops_relative": float(flops.mean()) if len(flops) else 1.0, "seconds": time.perf_counter() - t0}


def claims(table: pd.DataFrame) -> list[tuple[str, bool, str]]:
    """The issue's claims, each with whether it held and the numbers behind it."""
    t = table.set_index("method")
    spa, avg = t.loc["fedspa"], t.loc["fedavg"]
    bytes_ratio = (spa.mb_up_per_round + spa.mb_down_per_round) / (avg.mb_up_per_round + avg.mb_down_per_round)
    best_pfl = max(t.loc["fedper"].accuracy_mean, t.loc["fedrep"].accuracy_mean)
    return [
        ("FedSpa above FedAvg (client-mean accuracy)", spa.accuracy_mean > avg.accuracy_mean,
         f"{spa.accuracy_mean:.4f} vs {avg.accuracy_mean:.4f}"),
        ("FedSpa on par with FedPer/FedRep (within 2 points of the better)", spa.accuracy_mean >= best_pfl - 0.02,
         f"{spa.accuracy_mean:.4f} vs {best_pfl:.4f}"),
        ("FedSpa bytes per round <= 0.55x dense FedAvg", bytes_ratio <= 0.55, f"{bytes_ratio:.3f}x"),
        ("FedSpa training FLOPs about half of dense (<= 0.6x)", spa.flops_relative <= 0.6,
         f"{spa.flops_relative:.3f}x"),
        ("mask evolution beats the fixed mask", spa.accuracy_mean > t.loc["fixed mask"].accuracy_mean,
         f"{spa.accuracy_mean:.4f} vs {t.loc['fixed mask'].accuracy_mean:.4f}"),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=80)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--source", default="mnist", choices=["mnist", "animal_mnist"])
    p.add_argument("--max-samples", type=int, default=20000, help="seeded subset of the data set (null: all)")
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--hidden", type=int, default=64, help="ViT hidden size (MLP: twice that)")
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS),
                   help="e.g. --methods 'fedspa evolved-upload' for the upload variant (algorithm.upload_mask)")
    p.add_argument("--out", type=Path, default=Path("runs/fedspa"))
    p.add_argument("--quick", action="store_true", help="smoke mode: 4 rounds, 20 clients, 4,000 samples")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.clients, args.max_samples = 4, 20, 4000
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for method in args.methods:
            rows.append(run_one(method, args, seed))
            r = rows[-1]
            print(f"seed {seed} {method:<11} acc {r['accuracy_mean']:.4f} p10 {r['accuracy_p10']:.4f} "
                  f"up {r['mb_up_per_round']:.3f} MB down {r['mb_down_per_round']:.3f} MB "
                  f"flops {r['flops_relative']:.3f}x ({r['seconds']:.0f} s)", flush=True)
    runs = pd.DataFrame(rows)
    table = runs.groupby("method", sort=False).agg(
        accuracy_mean=("accuracy_mean", "mean"), accuracy_std=("accuracy_mean", "std"),
        accuracy_p10=("accuracy_p10", "mean"), mb_up_per_round=("mb_up_per_round", "mean"),
        mb_down_per_round=("mb_down_per_round", "mean"), flops_relative=("flops_relative", "mean"),
        seconds=("seconds", "mean")).reset_index()
    avg = table.set_index("method").loc["fedavg"] if "fedavg" in set(table.method) else None
    if avg is not None:
        table["bytes_vs_fedavg"] = ((table.mb_up_per_round + table.mb_down_per_round)
                                    / (avg.mb_up_per_round + avg.mb_down_per_round))
    print(f"\nFedSpa benchmark: {args.source} ({args.max_samples} samples), Dirichlet(0.3) over {args.clients} "
          f"clients, "
          f"10% per round, ViT hidden {args.hidden} patch 7, {args.rounds} rounds, {args.local_epochs} local epochs, "
          f"seeds {args.seeds}")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    verdicts = claims(table) if set(DEFAULT_METHODS) <= set(table.method) else []
    for text, held, numbers in verdicts:
        print(f"CLAIM {text}: {numbers} -> {'held' if held else 'NOT held'}")
    runs.to_csv(args.out / "runs.csv", index=False)
    table.to_csv(args.out / "table.csv", index=False)
    (args.out / "results.json").write_text(json.dumps({
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": rows, "table": table.replace({np.nan: None}).to_dict("records"),
        "claims": [{"claim": c, "held": bool(h), "numbers": n} for c, h, n in verdicts]}, indent=2))
    print(f"\nwrote {args.out}/results.json, table.csv, runs.csv")


if __name__ == "__main__":
    main()
