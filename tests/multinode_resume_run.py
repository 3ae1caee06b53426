"""Run by tests/test_multinode.py in its own process: checkpoint and resume on three raylets.

A head and two site nodes (ray.cluster_utils.Cluster); clients pinned to the sites, so the client
actors (and their state files) live on different nodes. The run checkpoints every round (every
actor sends its state files to the driver, which writes the checkpoint into the run directory); a
second run is cut after round 2 and resumed from there (the driver sends each actor the saved states).
Writes, as JSON, whether the resumed metrics equal the uninterrupted run's, and where the actors ran.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main(out_path: str, work: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from rayfed import Federation
    from rayfed.config import from_dict

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources={"site_a": 1})
    cluster.add_node(num_cpus=1, resources={"site_b": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    root = Path(work)
    try:
        def cfg(name: str):
            return from_dict({
                "seed": 0, "rounds": 4, "sample_count": 6,
                "data": {"source": "synthetic", "num_clients": 8,
                         "synthetic": {"num_samples": 400, "num_classes": 4, "feature_shape": [8]},
                         "partition": {"name": "dirichlet", "alpha": 0.5, "min_samples": 10}},
                "model": {"name": "mlp", "mlp_hidden": [16]},
                "train": {"local_epochs": 1, "batch_size": 16, "optimizer": "adam", "lr": 0.01},
                "algorithm": {"name": "fedper"},
                "runtime": {"executor": "ray", "torch_threads": 1, "num_cpus_per_actor": 0.3, "num_actors": 1,
                            "sites": {"site_a": [0, 1, 2], "site_b": [3, 4, 5]}},
                "output": {"plots": False, "progress": False, "save_final": False, "checkpoint_every": 1,
                           "dir": str(root), "name": name}})

        nodes: dict = {}

        def record(rnd: int, metrics: dict) -> None:
            nodes["actor_nodes"] = fed.executor.actor_nodes()

        fed = Federation(cfg("full"), callbacks=[record])
        full = fed.fit()
        Federation(cfg("cut")).fit()
        cut = root / "cut"
        for r in (3, 4):
            shutil.rmtree(cut / "checkpoints" / f"round_{r}")
            (cut / "metrics" / f"round_{r:06d}.parquet").unlink()
        resumed = Federation(cfg("cut"), run_dir=cut).fit(resume_from=cut)

        def rows(m):
            m = m[~m.metric.str.contains("seconds")]
            return m.sort_values(["round", "client_id", "stage", "task", "exit", "metric"]).values.tolist()

        out = {"equal": rows(full.metrics) == rows(resumed.metrics), "num_rows": len(full.metrics),
               "distinct_actor_nodes": len(set(nodes["actor_nodes"])),
               "checkpoint_files": sorted(p.name for p in (cut / "checkpoints" / "round_2" / "clients").iterdir())}
    finally:
        ray.shutdown()
        cluster.shutdown()
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
