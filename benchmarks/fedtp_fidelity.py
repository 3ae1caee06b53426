"""FedTP fidelity: does the paper's ranking FedTP >= Personalized-T > FedAvg hold on our data?

Li et al., *FedTP: Federated Learning by Transformer Personalization*, IEEE TNNLS 2023
(arXiv 2211.01572) report, under label skew, FedTP >= Personalized-T (private Q/K/V) > FedAvg.

Setup (the same for every method; partition, model init and sampled clients fixed by the seed):
scikit-learn digits (bundled), 20 clients, either pathological label skew (2 classes per client)
or Dirichlet(0.3); a small ViT (8x8 images, patch 2, hidden 32, 2 layers, 4 heads); 20 rounds,
half the clients per round; local training Adam lr 3e-3, 2 epochs, batch 16; every method with its
registered defaults. The script prints the budget it actually ran (``--set rounds=50`` shows), read
from the resolved configs. The figure is the per-client mean test accuracy after the last round
(each client's personalized model on its own test split), mean +- std over seeds.

Usage::

    .venv/bin/python benchmarks/fedtp_fidelity.py                # 3 seeds, 2 partitions, ~6-8 min on 2 cores
    .venv/bin/python benchmarks/fedtp_fidelity.py --seeds 0 1 2 3 4 --workers 2
    .venv/bin/python benchmarks/fedtp_fidelity.py --set algorithm.preset=paper \
        --methods fedtp                                             # the paper's hypernetwork SGD
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

PARTITIONS = {
    "pathological(2)": ["data.partition.name=pathological", "data.partition.classes_per_client=2"],
    "dirichlet(0.3)": ["data.partition.name=dirichlet", "data.partition.alpha=0.3"],
}
BASE = {
    "rounds": 20, "sample_fraction": 0.5, "eval_every": 20,
    "data": {"source": "digits", "num_clients": 20, "test_fraction": 0.25},
    "model": {"name": "vit", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64,
              "patch_size": 2},
    "train": {"optimizer": "adam", "local_epochs": 2, "batch_size": 16, "lr": 0.003},
    "runtime": {"executor": "local", "torch_threads": 1},
    "output": {"plots": False, "progress": False, "save_final": False},
}


def make_config(partition: str, method: str, seed: int, extra: list[str]):
    """The resolved config of one run (``algorithm.*`` overrides apply to fedtp only)."""
    from rayfed.config import apply_overrides, from_dict

    sets = [f"seed={seed}", f"algorithm.name={method}", *PARTITIONS[partition]]
    sets += [s for s in extra if not s.startswith("algorithm.") or method == "fedtp"]
    return from_dict(apply_overrides(BASE, sets))


def budget(cfg) -> str:
    """The budget a run actually has, read from its resolved config (so ``--set`` shows)."""
    d, t, m = cfg.data, cfg.train, cfg.model
    per_round = cfg.sample_count or max(1, round(cfg.sample_fraction * d.num_clients))
    return (f"{d.source}, {d.num_clients} clients, {cfg.rounds} rounds, {per_round} clients/round, local "
            f"{t.optimizer} lr {t.lr} x {t.local_epochs} epoch(s) batch {t.batch_size}"
            + (f" max {t.max_steps} steps" if t.max_steps else "")
            + f", {m.name} hidden {m.hidden_size} x {m.num_layers} layers")


def run_one(job: tuple[str, str, int, list[str]]) -> dict:
    """One federation; returns its final summary figures."""
    import torch

    from rayfed import Federation

    torch.set_num_threads(1)
    partition, method, seed, extra = job
    cfg = make_config(partition, method, seed, extra)
    t0 = time.perf_counter()
    res = Federation(cfg, run_dir=False).fit()
    s = res.summary
    return {"partition": partition, "method": method, "seed": seed, "accuracy_mean": s["accuracy_mean"],
            "accuracy_weighted": s["accuracy_weighted"], "accuracy_p10": s["accuracy_p10"],
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["fedtp", "personalized_t", "fedavg"])
    p.add_argument("--partitions", nargs="+", default=list(PARTITIONS), choices=list(PARTITIONS))
    p.add_argument("--workers", type=int, default=2, help="parallel runs (processes, 1 torch thread each)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override; algorithm.* ones apply to fedtp only")
    args = p.parse_args(argv)

    jobs = [(part, m, s, args.set) for part in args.partitions for m in args.methods for s in args.seeds]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        rows = list(pool.map(run_one, jobs))
    wall = time.perf_counter() - t0

    budgets = sorted({budget(make_config(*job)) for job in jobs})  # one line unless overrides differ by method
    for line in budgets:
        print(f"budget: {line}")
    print(f"seeds {args.seeds}; {len(jobs)} runs in {wall:.0f} s ({args.workers} workers)")
    if args.set:
        print("overrides:", " ".join(args.set))
    print(f"{'partition':<17} {'method':<15} {'client-mean acc':>18} {'weighted acc':>15} {'p10 acc':>15}"
          f" {'s/run':>6}")
    means: dict[tuple[str, str], float] = {}
    for part in args.partitions:
        for m in args.methods:
            sub = [r for r in rows if r["partition"] == part and r["method"] == m]
            a = np.array([r["accuracy_mean"] for r in sub])
            w = np.array([r["accuracy_weighted"] for r in sub])
            p10 = np.array([r["accuracy_p10"] for r in sub])
            means[(part, m)] = float(a.mean())
            print(f"{part:<17} {m:<15} {a.mean():>10.3f} +- {a.std():.3f} {w.mean():>7.3f} +- {w.std():.3f}"
                  f" {p10.mean():>7.3f} +- {p10.std():.3f} {np.mean([r['seconds'] for r in sub]):>6.1f}")
    per_seed = {(r["partition"], r["method"], r["seed"]): r["accuracy_mean"] for r in rows}
    print("per seed:", {f"{k[0]}/{k[1]}/{k[2]}": round(v, 3) for k, v in sorted(per_seed.items())})
    ok = True
    if {"fedtp", "personalized_t", "fedavg"} <= set(args.methods):
        for part in args.partitions:
            tp, pt, fa = (means[(part, m)] for m in ("fedtp", "personalized_t", "fedavg"))
            holds = tp >= pt > fa
            ok &= holds
            print(f"{part}: FedTP {tp:.3f} >= Personalized-T {pt:.3f} > FedAvg {fa:.3f}: "
                  f"{'holds' if holds else 'DOES NOT HOLD'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
