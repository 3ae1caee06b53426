"""FedTP hypernetwork size on a ViT-Base-shaped target (12 layers, hidden 768), without training.

The paper's head is ``Linear(hidden, numel)`` per attention layer, so its size is
``hidden x 3 x 768 x 768`` per layer: 3.2 billion parameters (12.7 GB fp32) for ViT-Base at the
default hidden width 150, before gradients and optimizer state. The low-rank heads
(``algorithm.head=bottleneck`` and ``factorized``) keep it within a server's memory.

For each head the script prints parameter counts (the full head is counted on PyTorch's ``meta``
device, never allocated) and the training footprint with AdamW (parameters + gradients + two
moments = 4 x parameters; SGD with momentum: 3 x). Forms that fit in ``--max-gb`` are also built
for real in a subprocess, which generates the Q/K/V of ``--clients`` clients in one batch and
backpropagates one client's delta, reporting its peak resident memory and the times.

Usage::

    .venv/bin/python benchmarks/fedtp_hypernet_memory.py
    .venv/bin/python benchmarks/fedtp_hypernet_memory.py --rank 16 --clients 10 --max-gb 4
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

HEADS = ("full", "bottleneck", "factorized")


def targets(layers: int, hidden: int):
    from rayfed.algorithms.fedtp import GenerationTarget

    return [GenerationTarget(f"vit.layers.{i}.attention.{k}_proj.weight", (hidden, hidden), i)
            for i in range(layers) for k in "qkv"]


def build(head: str, args, device: str = "cpu"):
    import torch

    from rayfed.algorithms.fedtp import HyperNetwork

    with torch.device(device):
        return HyperNetwork(args.num_clients, targets(args.layers, args.hidden), embedding_dim=args.embedding_dim,
                            hidden=args.hypernet_hidden, layers=args.hypernet_layers, head=head, rank=args.rank)


def measure(head: str, args) -> dict:
    """Build for real, generate a batch, backpropagate one delta; peak RSS and timings."""
    import torch

    torch.set_num_threads(1)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    hn = build(head, args)
    t_build = time.perf_counter() - t0
    idx = torch.arange(args.clients)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hn(idx)
    t_gen = time.perf_counter() - t0
    del out
    t0 = time.perf_counter()
    one = hn(idx[:1])
    torch.autograd.backward([v[0] for v in one.values()], [torch.randn_like(v[0]) * 1e-3 for v in one.values()])
    t_back = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"build_s": t_build, "generate_s": t_gen, "backward_s": t_back, "peak_mb": peak,
            "over_baseline_mb": peak - base}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--num-clients", type=int, default=100)
    p.add_argument("--embedding-dim", type=int, default=128)
    p.add_argument("--hypernet-hidden", type=int, default=150)
    p.add_argument("--hypernet-layers", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--clients", type=int, default=10, help="clients generated in one batch when measuring")
    p.add_argument("--max-gb", type=float, default=4.0, help="build for real only below this training footprint")
    p.add_argument("--child", choices=HEADS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return 0

    qkv = 3 * args.hidden * args.hidden
    print(f"target: {args.layers} layers x Q/K/V {args.hidden}x{args.hidden} = {args.layers * qkv / 1e6:.1f} M "
          f"generated values per client ({args.layers * qkv * 4 / 2**20:.0f} MiB fp32)")
    print(f"hypernetwork: {args.num_clients} clients, embedding {args.embedding_dim}, trunk {args.hypernet_hidden} "
          f"x {args.hypernet_layers + 1} layers, rank {args.rank}\n")
    gen_col = f"gen x{args.clients} s"
    print(f"{'head':<11} {'params':>14} {'heads':>14} {'fp32 GiB':>9} {'train GiB (AdamW)':>18} "
          f"{'peak RSS MiB':>13} {gen_col:>10} {'backward s':>11}")
    for head in HEADS:
        hn = build(head, args, device="meta")
        n = sum(q.numel() for q in hn.parameters())
        n_heads = sum(q.numel() for q in hn.heads.parameters())
        gib = n * 4 / 2**30
        train = 4 * gib
        real = {"peak_mb": float("nan"), "generate_s": float("nan"), "backward_s": float("nan")}
        note = ""
        if train <= args.max_gb:
            cmd = [sys.executable, __file__, "--child", head, *[a for a in (argv or sys.argv[1:])]]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            real = json.loads(out)
        else:
            note = f"  (not built: > --max-gb {args.max_gb})"
        print(f"{head:<11} {n:>14,} {n_heads:>14,} {gib:>9.2f} {train:>18.2f} {real['peak_mb']:>13.0f} "
              f"{real['generate_s']:>10.3f} {real['backward_s']:>11.3f}{note}")
    full = build("full", args, device="meta")
    low = build("factorized", args, device="meta")
    ratio = sum(q.numel() for q in full.parameters()) / sum(q.numel() for q in low.parameters())
    print(f"\nfull / factorized parameters: {ratio:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
