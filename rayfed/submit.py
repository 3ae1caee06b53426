r"""Entry script for ``ray submit`` and ``ray job submit``: the ``rayfed`` CLI on a running cluster.

It connects to the cluster this process runs on (``RAY_ADDRESS``, set by ``ray job submit``, or
``address="auto"``: the cluster started on this node by ``ray up`` / ``ray start``), runs
``rayfed run|tune|partition|report`` with the given arguments, then disconnects. It never starts
a cluster and never stops one: if no cluster is running it exits with an error.

Usage::

    ray submit cluster.yaml rayfed/submit.py -- run rayfed-pfl/examples/quickstart.yaml
    ray submit cluster.yaml rayfed/submit.py -- tune rayfed-pfl/tune_spaces/fedper.yaml \
        --config rayfed-pfl/examples/quickstart.yaml --num-samples 4
    ray job submit --address http://HEAD:8265 --working-dir DIR -- python -m rayfed.submit run config.yaml

The script is self-contained (``ray submit`` copies this one file to the head node), so rayfed
must be installed there (``setup_commands`` in cluster.yaml).
"""

from __future__ import annotations

import os
import sys
from typing import Optional


def _drop_own_dir() -> None:
    """Run as a file from inside the package, this folder would shadow top-level modules."""
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == here and os.path.exists(os.path.join(here, "cli.py")):
        sys.path.pop(0)


def main(argv: Optional[list[str]] = None) -> int:
    """Connect to the running cluster, run the ``rayfed`` CLI with ``argv``, disconnect."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    address = os.environ.get("RAY_ADDRESS") or "auto"
    connected_here = False
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as e:
            print(f"rayfed.submit: no running Ray cluster at {address!r} ({e}); start one with `ray up cluster.yaml` "
                  "or `ray start --head`, or set RAY_ADDRESS", file=sys.stderr)
            return 2
        connected_here = True
    resources = ray.cluster_resources()
    alive = sum(1 for n in ray.nodes() if n.get("Alive"))
    print(f"rayfed.submit: connected to {address} ({alive} node(s), {resources.get('CPU', 0):g} CPUs)", flush=True)
    try:
        from rayfed.cli import main as cli_main

        return cli_main(argv)
    finally:
        if connected_here:
            ray.shutdown()  # disconnects this driver; the cluster keeps running


if __name__ == "__main__":
    _drop_own_dir()
    sys.exit(main())
