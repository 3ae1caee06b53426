"""Many clients on one machine: FedPer on the synthetic source with 100, 1,000 and 10,000 clients.

100 clients are sampled per round whatever the federation's size, a small ViT on 8x8 synthetic
images, on Ray (one local Ray per run). For each size it reports the seconds per round (median of
the rounds after the first), the peak resident memory of the driver and of all the Ray processes it
started, workers included (their process tree, sampled every 0.2 s from /proc), the bytes of client
state on disk (checkpoint and per-round state files), and the start-up time (dataset build, plan
and actor set-up, until round 1 starts). It prints the ratios the targets are judged on (10,000
clients: total RSS within 4 GiB, per-round time within 1.5x of 100 clients, start-up under 60 s).

Usage::

    .venv/bin/python benchmarks/scale.py                       # 100, 1,000 and 10,000 clients, 8 rounds
    .venv/bin/python benchmarks/scale.py --clients 100 2000 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


def _rss_tree() -> tuple[int, int]:
    """(driver RSS, RSS of every process descended from the driver: the Ray processes its ``ray.init``
    started, and their workers) in bytes. Other Ray sessions on the machine are not counted."""
    me = os.getpid()
    page = os.sysconf("SC_PAGE_SIZE")
    parent, rss = {}, {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/statm") as f:
                rss[int(pid)] = int(f.read().split()[1]) * page
            parent[int(pid)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    children: dict[int, list[int]] = {}
    for pid, pp in parent.items():
        children.setdefault(pp, []).append(pid)
    workers, todo = 0, list(children.get(me, []))
    while todo:
        pid = todo.pop()
        workers += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return rss.get(me, 0), workers


class _Peak(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.driver = self.workers = self.total = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            d, w = _rss_tree()
            self.driver, self.workers, self.total = max(self.driver, d), max(self.workers, w), max(self.total, d + w)
            time.sleep(0.2)


def one(n: int, rounds: int, out: Path) -> dict:
    import ray

    from rayfed import Federation, load_config

    samples_per_client = 12
    cfg = load_config(None, [
        "seed=0", f"rounds={rounds}", "sample_count=100", f"eval_every={rounds}", "eval_fraction=0.1",
        "data.source=synthetic", f"data.num_clients={n}", f"data.synthetic.num_samples={n * samples_per_client}",
        "data.synthetic.num_classes=10", "data.synthetic.modality=image", "data.synthetic.feature_shape=[1,8,8]",
        "data.partition.name=dirichlet", "data.partition.alpha=0.5", "data.partition.min_samples=4",
        "model.name=vit", "model.hidden_size=16", "model.num_layers=1", "model.num_heads=2",
        "model.intermediate_size=16", "model.patch_size=4", "algorithm.name=fedper",
        "train.local_epochs=1", "train.batch_size=16", "runtime.executor=ray", "runtime.num_actors=2",
        "runtime.num_cpus_per_actor=0.9", "runtime.torch_threads=1", "runtime.state_memory_mb=64",
        "output.plots=false", "output.progress=false", "output.checkpoint_every=0", "output.save_final=true",
        f"output.dir={out}", f"output.name=n{n}"])
    peak = _Peak()
    peak.start()
    starts: list[float] = []
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        fed = Federation(cfg, callbacks=[lambda r, m: starts.append(time.perf_counter())])
        result = fed.fit()
    finally:
        ray.shutdown()
        peak.stop.set()
        peak.join()
    m = result.metrics
    secs = m[(m.client_id == -1) & (m.stage == "train") & (m.metric == "train_seconds")].sort_values("round")
    per_round = float(secs.value.iloc[1:].median()) if len(secs) > 1 else float(secs.value.iloc[0])
    first = float(secs.value.iloc[0])
    startup = (starts[0] - t0) - first if starts else float("nan")
    run = out / f"n{n}"
    state_bytes = sum(p.stat().st_size for p in run.rglob("*.safetensors"))
    return {"clients": n, "seconds_per_round": per_round, "startup_seconds": startup,
            "peak_driver_gib": peak.driver / 2**30, "peak_workers_gib": peak.workers / 2**30,
            "peak_total_gib": peak.total / 2**30, "state_mb_on_disk": state_bytes / 1e6,
            "evaluated_last": int(result.summary.get("clients_evaluated", 0))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--out", default="runs/scale")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one size in a fresh process
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.one is not None:
        print(json.dumps(one(args.one, args.rounds, out)))
        return
    rows = []
    for n in args.clients:  # each size in its own process: its peak memory is its own
        res = subprocess.run([sys.executable, __file__, "--one", str(n), "--rounds", str(args.rounds), "--out",
                              str(out)], capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    base = rows[0]
    print("\n| clients | s / round | x smallest | start-up s | driver GiB | workers GiB | total GiB | state MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["seconds_per_round"] / base["seconds_per_round"]
        print(f"| {r['clients']:,} | {r['seconds_per_round']:.2f} | {ratio:.2f}x | {r['startup_seconds']:.1f} | "
              f"{r['peak_driver_gib']:.2f} | {r['peak_workers_gib']:.2f} | {r['peak_total_gib']:.2f} | "
              f"{r['state_mb_on_disk']:.1f} |")
    big = rows[-1]
    ratio = big["seconds_per_round"] / base["seconds_per_round"]
    print(f"\ntargets at {big['clients']:,} clients: total RSS {big['peak_total_gib']:.2f} GiB (<= 4), per-round "
          f"{ratio:.2f}x of {base['clients']} clients (<= 1.5), start-up {big['startup_seconds']:.1f} s (< 60)")


if __name__ == "__main__":
    main()
