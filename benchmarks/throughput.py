"""Throughput of rayfed's Ray runtime against a plain single-process PyTorch loop (issue 2).

Two workloads, each run by rayfed with 1 and with 2 client actors (Ray executor, a Ray started by
this script) and by a plain torch loop doing the same local training on the same batches:

- **A (compute-bound)**: FedAvg, a small ViT on scikit-learn digits, 100 iid clients, 10 sampled
  per round, 1 local epoch (batch 16, Adam), 10 rounds. Targets: 1 actor <= 1.1x the plain loop,
  2 actors <= 0.8x the plain loop (seconds per round, plain loop at 1 torch thread).
- **B (overhead-bound)**: a tiny MLP on synthetic vectors, 50 clients all training every round,
  5 full-batch steps each (batch size >= client size, 5 local epochs). Reported per round and per
  client update; no target (it shows the fixed cost per client).

Fairness: Ray workers run torch with 1 thread each (``runtime.torch_threads=1``; Ray also sets
``OMP_NUM_THREADS=1``). The plain loop is the reference at 1 torch thread (like-for-like with one
actor) and is also shown at 2 threads. The plain loop uses the same model initialisation, client
shards, per-round sampled clients (:func:`rayfed.federation.sample_clients`), per-client seeds
(:func:`rayfed.runtime.client_seed`, which fix the batch order), batch size, optimizer and epochs,
and averages weights (sample-weighted, float64) in plain torch; the benchmark prints the largest
difference between its final weights and rayfed's as evidence that both did the same work.

Per-round figures exclude start-up (Ray init, actor creation, data and model build), which is
printed separately, and discard the first (warm-up) round; the figure compared is the median over
the remaining rounds (the mean is printed too).

Usage::

    .venv/bin/python benchmarks/throughput.py                 # both workloads, a few minutes
    .venv/bin/python benchmarks/throughput.py --quick         # smoke mode (tests), ~30 s
    .venv/bin/python benchmarks/throughput.py --rounds 20 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from rayfed.config import FederationConfig, from_dict  # noqa: E402
from rayfed.data import FederatedDataset  # noqa: E402
from rayfed.federation import Federation, sample_clients  # noqa: E402
from rayfed.models import build_model, forward_logits  # noqa: E402
from rayfed.runtime import client_seed  # noqa: E402

#: Targets of workload A: rayfed seconds per round / plain loop (1 thread) seconds per round.
TARGETS = {1: 1.1, 2: 0.8}


def workload_a(rounds: int, quick: bool) -> dict[str, Any]:
    """FedAvg, small ViT on digits, 100 clients, 10 per round, 1 local epoch."""
    return {
        "seed": 0,
        "rounds": rounds,
        "sample_count": 10,
        "eval_every": 10_000,
        "data": {"source": "digits", "num_clients": 100, "partition": {"name": "iid"}},
        "model": {"name": "vit", "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                  "intermediate_size": 64, "patch_size": 2},
        "train": {"optimizer": "adam", "lr": 0.003, "local_epochs": 1, "batch_size": 16},
        "algorithm": {"name": "fedavg"},
    }


def workload_b(rounds: int, quick: bool) -> dict[str, Any]:
    """Tiny MLP, 50 clients all training each round, 5 full-batch steps per client."""
    return {
        "seed": 0,
        "rounds": rounds,
        "sample_fraction": 1.0,
        "eval_every": 10_000,
        "data": {"source": "synthetic", "num_clients": 50,
                 "synthetic": {"num_samples": 2000, "num_classes": 4, "feature_shape": [16]},
                 "partition": {"name": "iid"}},
        "model": {"name": "mlp", "mlp_hidden": [16]},
        "train": {"optimizer": "adam", "lr": 0.01, "local_epochs": 5, "batch_size": 4096},
        "algorithm": {"name": "fedavg"},
    }


WORKLOADS = {
    "A": ("compute-bound: FedAvg, ViT on digits, 100 clients, 10/round, 1 local epoch, batch 16",
          workload_a),
    "B": ("overhead-bound: FedAvg, tiny MLP, 50 clients all training, 5 full-batch steps", workload_b),
}


def make_config(base: dict[str, Any], actors: int | None) -> FederationConfig:
    d = json.loads(json.dumps(base))
    d["runtime"] = {"executor": "ray", "torch_threads": 1, "num_actors": actors or 1}
    d["output"] = {"plots": False, "progress": False, "save_final": False}
    return from_dict(d)


@dataclass
class Timing:
    """One runner's figures on one workload."""

    runner: str
    startup_s: float
    round_s: list[float] = field(default_factory=list)  # every round, warm-up included
    clients_per_round: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def measured(self) -> list[float]:
        return self.round_s[1:] if len(self.round_s) > 1 else self.round_s

    @property
    def median(self) -> float:
        return statistics.median(self.measured)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.measured)

    def as_dict(self) -> dict[str, Any]:
        return {"runner": self.runner, "startup_s": self.startup_s, "round_s": self.round_s,
                "median_round_s": self.median, "mean_round_s": self.mean,
                "per_client_update_s": self.median / max(self.clients_per_round, 1), **self.extra}


# -- rayfed ------------------------------------------------------------------------------------
def run_rayfed(cfg: FederationConfig) -> tuple[Timing, dict[str, np.ndarray]]:
    """A full :class:`Federation` run on the Ray executor; per-round time from its callback."""
    rounds: list[float] = []
    first_cb: list[float] = []

    def cb(r: int, m: dict) -> None:
        if not first_cb:
            first_cb.append(time.perf_counter())
        rounds.append(float(m["train_seconds"]))

    t0 = time.perf_counter()
    res = Federation(cfg, callbacks=[cb], run_dir=False).fit()
    total = time.perf_counter() - t0
    startup = first_cb[0] - rounds[0] - t0
    n = cfg.runtime.num_actors
    t = Timing(f"rayfed, {n} actor{'s' if n > 1 else ''}", startup, rounds, cfg.clients_per_round(),
               {"fit_total_s": total, "accuracy_mean": res.summary.get("accuracy_mean"),
                "breakdown": breakdown(res.metrics, rounds, n)})
    return t, dict(res.server_state.weights)


def breakdown(metrics, rounds: list[float], num_actors: int) -> dict[str, float]:
    """Median split of a measured round: client work on the busiest actor (load model, train,
    upload, as timed inside the actor), server aggregation, and the rest (Ray calls, object store,
    driver, waiting for the other actor).
    """
    from rayfed.runtime import assign_clients

    m = metrics[(metrics["stage"] == "train") & (metrics["round"] > 1)]
    client = m[(m.client_id >= 0) & (m.metric == "train_seconds")]
    agg = m[(m.client_id == -1) & (m.metric == "server_aggregate_seconds")].set_index("round")["value"]
    owner = {c: i for i, g in enumerate(assign_clients(sorted(set(client.client_id)), num_actors)) for c in g}
    work, total, busiest = [], [], []
    for r, g in client.groupby("round"):
        per_actor = g.groupby(g.client_id.map(owner))["value"].sum()
        busiest.append(float(per_actor.max()))
        work.append(float(g["value"].sum()))
        total.append(rounds[int(r) - 1])
    med = statistics.median
    return {"client_work_busiest_actor_s": med(busiest), "client_work_all_s": med(work),
            "server_aggregate_s": float(agg.median()),
            "other_s": med([t - b - a for t, b, a in zip(total, busiest, agg.sort_index().tolist())])}


# -- the plain loop ----------------------------------------------------------------------------
def run_plain(cfg: FederationConfig, threads: int) -> tuple[Timing, dict[str, torch.Tensor]]:
    """The same FedAvg in one process: no Ray, no rayfed runtime, torch only."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        ds = FederatedDataset.from_config(cfg.data, cfg.seed)
        model = build_model(cfg.model, ds.info, cfg.seed)
        ids = list(ds.client_ids)
        shards = {}
        for cid in ids:
            cd = ds.client_data(cid)
            shards[cid] = (torch.as_tensor(cd.x_train), torch.as_tensor(cd.y_train))
        glob = {k: v.detach().clone() for k, v in model.state_dict().items()}
        tc = cfg.train
        k = cfg.clients_per_round()
        startup = time.perf_counter() - t0
        times, cpu = [], []
        for r in range(cfg.rounds):
            t1, c1 = time.perf_counter(), time.thread_time()
            acc = {n: torch.zeros(v.shape, dtype=torch.float64) for n, v in glob.items() if v.is_floating_point()}
            total = 0
            for cid in sample_clients(ids, k, cfg.seed, r):
                x, y = shards[cid]
                model.load_state_dict(glob)
                seed = client_seed(cfg.seed, r, cid, "train")
                torch.manual_seed(seed)
                gen = torch.Generator().manual_seed(seed)
                opt = torch.optim.Adam(model.parameters(), lr=tc.lr)
                model.train()
                steps = 0
                for _ in range(tc.local_epochs):
                    for idx in torch.randperm(len(y), generator=gen).split(tc.batch_size):
                        opt.zero_grad(set_to_none=True)
                        loss = F.cross_entropy(forward_logits(model, x[idx]), y[idx])
                        loss.backward()
                        opt.step()
                        float(loss.detach())  # rayfed records the loss too
                        steps += 1
                        if tc.max_steps is not None and steps >= tc.max_steps:
                            break
                with torch.no_grad():
                    for n, v in model.state_dict().items():
                        if n in acc:
                            acc[n] += v.double() * len(y)
                total += len(y)
            glob = {n: (acc[n] / total).to(v.dtype) if n in acc else v for n, v in glob.items()}
            times.append(time.perf_counter() - t1)
            cpu.append(time.thread_time() - c1)
        name = f"plain torch, {threads} thread{'s' if threads > 1 else ''}"
        return Timing(name, startup, times, k, {"cpu_round_s": cpu}), glob
    finally:
        torch.set_num_threads(prev)


def max_diff(a: dict[str, np.ndarray], b: dict[str, torch.Tensor]) -> float:
    return max(float(np.max(np.abs(np.asarray(a[k], dtype=np.float64) - b[k].double().numpy())))
               for k in a)


# -- reporting ---------------------------------------------------------------------------------
def load() -> str:
    try:
        one, five, fifteen = os.getloadavg()
        return f"{one:.2f} {five:.2f} {fifteen:.2f}"
    except OSError:
        return "n/a"


def table(rows: list[Timing], ref: Timing, ref2: Timing) -> str:
    head = (f"  {'runner':<22}{'start-up s':>11}{'s/round med':>13}{'s/round mean':>14}"
            f"{'ms/client upd':>15}{'vs plain 1t':>13}{'vs plain 2t':>13}")
    lines = [head, "  " + "-" * (len(head) - 2)]
    for t in rows:
        lines.append(f"  {t.runner:<22}{t.startup_s:>11.2f}{t.median:>13.4f}{t.mean:>14.4f}"
                     f"{1000 * t.median / max(t.clients_per_round, 1):>15.2f}"
                     f"{t.median / ref.median:>12.2f}x{t.median / ref2.median:>12.2f}x")
    return "\n".join(lines)


def run_workload(key: str, rounds: int, quick: bool) -> dict[str, Any]:
    title, make = WORKLOADS[key]
    base = make(rounds, quick)
    cfg1 = make_config(base, 1)
    print(f"\nWorkload {key} ({title}); {rounds} rounds, first discarded as warm-up; load {load()}",
          flush=True)
    plain1, w_plain = run_plain(cfg1, 1)
    ray1, w_ray1 = run_rayfed(cfg1)
    ray2, w_ray2 = run_rayfed(make_config(base, 2))
    plain2, _ = run_plain(cfg1, 2)
    rows = [plain1, plain2, ray1, ray2]
    print(table(rows, plain1, plain2))
    for t in (ray1, ray2):
        b = t.extra["breakdown"]
        print(f"  {t.runner}: median round = {1000 * b['client_work_busiest_actor_s']:.1f} ms client work "
              f"on the busiest actor (all actors {1000 * b['client_work_all_s']:.1f} ms) + "
              f"{1000 * b['server_aggregate_s']:.1f} ms server aggregate + {1000 * b['other_s']:.1f} ms other "
              "(Ray calls, object store, driver)")
    diffs = {"1 actor": max_diff(w_ray1, w_plain), "2 actors": max_diff(w_ray2, w_plain)}
    print("  same-work check, max |w_rayfed - w_plain| over final weights: "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()), f"(load {load()})")
    return {"title": title, "config": base, "rounds": rounds, "load_after": load(),
            "runs": [t.as_dict() for t in rows], "max_weight_diff": diffs,
            "ratios_vs_plain_1t": {1: ray1.median / plain1.median, 2: ray2.median / plain1.median},
            "ratios_vs_plain_2t": {1: ray1.median / plain2.median, 2: ray2.median / plain2.median}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=None, help="rounds per run (default 10; 3 with --quick)")
    p.add_argument("--quick", action="store_true", help="fast smoke mode (few rounds)")
    p.add_argument("--workloads", default="AB", help="which workloads to run, e.g. A, B or AB")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    rounds = a.rounds if a.rounds is not None else (3 if a.quick else 10)
    if rounds < 2:
        p.error("--rounds must be >= 2 (the first round is a discarded warm-up)")
    import ray

    cpus = max(2, os.cpu_count() or 2)
    print(f"rayfed throughput benchmark: python {platform.python_version()}, torch {torch.__version__}, "
          f"ray {ray.__version__}, {os.cpu_count()} CPUs, load {load()}")
    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 1024 * 1024)
    ray_init = time.perf_counter() - t0
    print(f"Ray init (num_cpus={cpus}): {ray_init:.2f} s (not in any per-round figure)")
    out: dict[str, Any] = {"ray_init_s": ray_init, "cpus": cpus, "load_before": load(),
                           "quick": a.quick, "workloads": {}}
    try:
        for key in a.workloads.upper():
            out["workloads"][key] = run_workload(key, rounds, a.quick)
    finally:
        ray.shutdown()

    print("\nRatios are rayfed median s/round over the plain loop's; the targets use the plain loop at "
          "1 torch thread (like-for-like: every actor runs torch with 1 thread).")
    for key, w in out["workloads"].items():
        r1, r2 = w["ratios_vs_plain_1t"], w["ratios_vs_plain_2t"]
        for n in (1, 2):
            label = f"{n} actor{'s' if n > 1 else ''}"
            if key == "A":
                ok = r1[n] <= TARGETS[n]
                print(f"TARGET A {label} <= {TARGETS[n]}x plain (1 thread): ratio {r1[n]:.2f}x -> "
                      f"{'met' if ok else 'NOT met'} (vs plain at 2 threads: {r2[n]:.2f}x)")
            else:
                print(f"RATIO {key} {label} vs plain (1 thread): {r1[n]:.2f}x (vs plain at 2 threads: "
                      f"{r2[n]:.2f}x; no target)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
        print(f"figures written to {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
