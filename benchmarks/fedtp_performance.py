"""FedTP server cost per round: hypernetwork work vs the round's wall time (target: under 20%).

Setup: 100 clients, 10 sampled per round, a small ViT (8x8 images, patch 2, hidden 32, 2 layers,
4 heads; the built-in experiment's model), the paper-shaped hypernetwork (embedding 128, trunk 150
x 4 layers, full heads), Ray executor with 2 client actors (1 torch thread each) and the server
actor, local training 2 epochs of Adam (batch 16) on synthetic 8x8 images, 150 training samples per
client. Evaluation runs only after the last round, so the per-round figures are training rounds.

Per round (median over rounds after the first, which warms up):

- server generate: ``payloads`` for the sampled clients, one batched pass (``server_payload_seconds``);
- client train: the sampled clients' local training (sum over clients, and the slowest actor's share);
- server update: the server's own aggregation work (``server_aggregate_seconds``, without the time it waits
  for clients still training: fetching uploads, averaging
  shared weights, hypernetwork backprop and step), of which hypernetwork (``server_hypernet_seconds``);
- round wall: the driver's time for the whole training round.

The server's hypernetwork share is ``(generate + hypernetwork) / round wall``.

Usage::

    .venv/bin/python benchmarks/fedtp_performance.py                # ~1-2 min on 2 cores
    .venv/bin/python benchmarks/fedtp_performance.py --rounds 20 --executor local
    .venv/bin/python benchmarks/fedtp_performance.py --set model.hidden_size=64 --set model.num_layers=4
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

BASE = {
    "seed": 0, "rounds": 10, "sample_count": 10,
    "data": {"source": "synthetic", "num_clients": 100,
             "synthetic": {"num_samples": 20000, "num_classes": 10, "feature_shape": [1, 8, 8], "modality": "image"},
             "partition": {"name": "dirichlet", "alpha": 0.3, "min_samples": 40}},
    "model": {"name": "vit", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64,
              "patch_size": 2},
    "algorithm": {"name": "fedtp"},
    "train": {"optimizer": "adam", "local_epochs": 2, "batch_size": 16, "lr": 0.003},
    "runtime": {"executor": "ray", "num_actors": 2, "torch_threads": 1},
    "output": {"plots": False, "progress": False, "save_final": False},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--executor", choices=["ray", "local"], default="ray")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    args = p.parse_args(argv)

    from rayfed import Federation
    from rayfed.config import apply_overrides, from_dict

    sets = [f"rounds={args.rounds}", f"eval_every={args.rounds}", f"runtime.executor={args.executor}", *args.set]
    cfg = from_dict(apply_overrides(BASE, sets))
    t0 = time.perf_counter()
    res = Federation(cfg, run_dir=False).fit()
    total = time.perf_counter() - t0
    m = res.metrics
    rnd = m[(m.client_id == -1) & (m.stage == "train")].pivot_table(index="round", columns="metric", values="value")
    cli = m[(m.client_id >= 0) & (m.stage == "train") & (m.metric == "train_seconds")]
    per_round_clients = cli.groupby("round").value.sum()
    rnd = rnd[rnd.index > 1]  # the first round warms up
    med = {k: float(np.median(rnd[k])) for k in rnd.columns}
    clients = float(np.median(per_round_clients[per_round_clients.index > 1]))
    hn = res.server_state.extra["hypernet"]
    n_params = sum(q.numel() for q in hn.parameters())
    wall = med["train_seconds"]
    server = med["server_payload_seconds"] + med["server_hypernet_seconds"]
    actors = f" with {cfg.runtime.num_actors} client actors" if args.executor == "ray" else ""
    print(f"FedTP, {cfg.data.num_clients} clients, {cfg.sample_count} per round, {args.executor} executor{actors}; "
          f"ViT hidden "
          f"{cfg.model.hidden_size} x {cfg.model.num_layers} layers; hypernetwork {n_params / 1e6:.2f} M parameters "
          f"({cfg.algorithm.head} heads)")
    print(f"rounds {args.rounds} (median over rounds 2..{args.rounds}); whole run {total:.1f} s incl. start-up and "
          f"final evaluation; final client-mean accuracy {res.summary['accuracy_mean']:.3f}\n")
    rows = [
        ("server generate (payloads, 10 clients)", med["server_payload_seconds"]),
        ("client train (sum over the 10 clients)", clients),
        ("server update (whole aggregation)", med["server_aggregate_seconds"]),
        ("  of which hypernetwork backprop + step", med["server_hypernet_seconds"]),
        ("round wall time (driver)", wall),
    ]
    for name, v in rows:
        print(f"{name:<42} {v * 1000:9.1f} ms  {100 * v / wall:6.1f}% of the round")
    share = server / wall
    print(f"\nserver hypernetwork work (generate + hypernetwork update): {server * 1000:.1f} ms = {100 * share:.1f}% "
          f"of the round wall time (target < 20%): {'OK' if share < 0.2 else 'ABOVE TARGET'}")
    return 0 if share < 0.2 else 1


if __name__ == "__main__":
    sys.exit(main())
