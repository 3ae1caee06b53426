"""Run by tests/test_multinode.py in its own process (a driver joins one cluster at a time).

Starts a ray.cluster_utils.Cluster with three raylets: a head without custom resources and two
"site" nodes holding {"site_a": 1} and {"site_b": 1}; runs a federation whose clients are pinned
to the sites (runtime.sites) and writes, as JSON, where each actor ran and the node of each site.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main(out_path: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from rayfed import Federation
    from rayfed.config import from_dict

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = {"site_a": cluster.add_node(num_cpus=1, resources={"site_a": 1}),
             "site_b": cluster.add_node(num_cpus=1, resources={"site_b": 1})}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        cfg = from_dict({
            "seed": 0, "rounds": 2,
            "data": {"source": "synthetic", "num_clients": 8,
                     "synthetic": {"num_samples": 400, "num_classes": 4, "feature_shape": [8]},
                     "partition": {"name": "dirichlet", "alpha": 0.5, "min_samples": 10}},
            "model": {"name": "mlp", "mlp_hidden": [16]},
            "train": {"local_epochs": 1, "batch_size": 16, "optimizer": "adam", "lr": 0.01},
            "algorithm": {"name": "fedper"},
            # clients 6 and 7 are in no site: they get an unpinned actor
            "runtime": {"executor": "ray", "torch_threads": 1, "num_cpus_per_actor": 0.3, "num_actors": 1,
                        "sites": {"site_a": [0, 1, 2], "site_b": [3, 4, 5]}},
            "output": {"plots": False, "progress": False, "save_final": False},
        })
        seen: dict = {}

        def record(rnd: int, metrics: dict) -> None:
            ex = fed.executor
            seen.update(actor_nodes=ex.actor_nodes(), groups=ex.groups,
                        sites=[a.site for a in ex.placement.actors])

        fed = Federation(cfg, run_dir=False, callbacks=[record])
        result = fed.fit()
        alive = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        site_nodes = {s: [nid for nid, res in alive.items() if s in res] for s in nodes}
        out = {**seen, "site_nodes": site_nodes, "num_nodes": len(alive),
               "accuracy": result.summary["accuracy_mean"], "failures": len(result.failures)}
    finally:
        ray.shutdown()
        cluster.shutdown()
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1])
