"""Robust aggregation on the server's device: the host (numpy) against torch on CPU and on a GPU (issue 16).

The server runs :func:`rayfed.robust_rules.robust_aggregate` on ``runtime.server_device``: numpy on
the host for ``cpu``, torch on the GPU for ``cuda``. This script times one server aggregation per
rule on a synthetic round of ``--clients`` updates of ``--params`` float32 coordinates (a quarter of
them Byzantine, sending -3x an honest update), on each device this process can use:

- ``host``: ``device="cpu"``, the reference;
- ``torch-cpu``: the same rule applied to a torch CPU tensor (the code path a GPU takes, on the CPU);
- ``cuda``: ``device="cuda"`` (only when a GPU is visible), including the host-to-GPU copy of the
  stacked updates and the copy back.

Each figure is the median of ``--repeat`` timed calls after one warm-up call; the ratios are against
the host reference measured in the same run, and the largest difference between each device's
aggregate and the host's is printed as evidence of the same result (0 for the median and Krum).

Usage::

    .venv/bin/python benchmarks/robust_rules.py                      # 32 clients x 1M parameters
    .venv/bin/python benchmarks/robust_rules.py --quick              # smoke mode (a test runs it)
    .venv/bin/python benchmarks/robust_rules.py --clients 100 --params 10000000
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from rayfed.robust_rules import bucketing, centered_clipping, coordinate_median, krum, robust_aggregate, trimmed_mean

# name -> (robust_aggregate options, with f for the number of Byzantine clients; the rule on a matrix)
RULES = {
    "median": (lambda f: {"rule": "median"}, lambda f: coordinate_median),
    "trimmed_mean(0.25)": (lambda f: {"rule": "trimmed_mean", "trim": 0.25}, lambda f: lambda X: trimmed_mean(X, 0.25)),
    "krum(f)": (lambda f: {"rule": "krum", "num_byzantine": f}, lambda f: lambda X: krum(X, f)),
    "multi_krum(f)": (lambda f: {"rule": "multi_krum", "num_byzantine": f},
                      lambda f: lambda X: krum(X, f, multi=X.shape[0] - f)),
    "centered_clipping(tau=1, 3 iters)": (
        lambda f: {"rule": "centered_clipping", "tau": 1.0, "iters": 3},
        lambda f: lambda X: centered_clipping(X, torch.zeros(X.shape[1], dtype=torch.float64), tau=1.0, iters=3)),
    "bucketing(2) + median": (lambda f: {"rule": "median", "bucket_size": 2, "rng": np.random.default_rng(0)},
                              lambda f: lambda X: bucketing(X, 2, coordinate_median, np.random.default_rng(0))),
}


def _updates(n: int, d: int, seed: int = 0) -> tuple[list[dict[str, np.ndarray]], int]:
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(n, d)).astype(np.float32) * 1e-2
    f = n // 4
    rows[:f] = -3 * rows[f:2 * f]
    return [{"w": r} for r in rows], f


def _time(fn, repeat: int) -> tuple[float, object]:
    out = fn()  # warm-up (CUDA context, kernels, allocator)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="8 clients x 20,000 parameters, 1 repeat")
    args = ap.parse_args()
    n, d, repeat = (8, 20_000, 1) if args.quick else (args.clients, args.params, args.repeat)
    ups, f = _updates(n, d)
    cuda = torch.cuda.is_available()
    torch_cpu = torch.from_numpy(np.stack([u["w"] for u in ups]))
    print(f"{n} clients ({f} Byzantine) x {d:,} float32 parameters; median of {repeat} call(s); "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          + (f"GPU: {torch.cuda.get_device_name(0)}" if cuda else "no GPU visible: host and torch-cpu only"))
    print(f"{'rule':36s} {'host s':>9s} {'torch-cpu s':>12s} {'ratio':>7s} {'cuda s':>9s} {'ratio':>7s} "
          f"{'max |diff|':>11s}")
    for name, (options, matrix_rule) in RULES.items():
        host_s, host = _time(lambda options=options: robust_aggregate(ups, **options(f)), repeat)
        tc_s, tc = _time(lambda matrix_rule=matrix_rule: matrix_rule(f)(torch_cpu), repeat)
        diff = float(np.max(np.abs(tc.numpy() - host["w"])))
        cells = f"{host_s:9.3f} {tc_s:12.3f} {tc_s / host_s:6.2f}x"
        if cuda:
            cu_s, cu = _time(lambda options=options: robust_aggregate(ups, **options(f), device="cuda"), repeat)
            diff = max(diff, float(np.max(np.abs(cu["w"] - host["w"]))))
            cells += f" {cu_s:9.3f} {cu_s / host_s:6.2f}x"
        else:
            cells += f" {'-':>9s} {'-':>7s}"
        print(f"{name:36s} {cells} {diff:11.1e}")


if __name__ == "__main__":
    main()
