"""Site pinning on a real multi-node Ray (three raylets from ray.cluster_utils.Cluster).

The cluster runs in a subprocess (tests/multinode_sites_run.py): this pytest process may hold the
session's Ray, and a driver connects to one cluster at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_clients_pinned_to_sites_run_on_the_nodes_holding_the_site_resource(tmp_path):
    out = tmp_path / "placement.json"
    script = Path(__file__).with_name("multinode_sites_run.py")
    # a private Ray temp dir: Cluster() writes its address to <temp>/ray/ray_current_cluster, which
    # every plain ray.init() on this machine would otherwise join while the test runs
    ray_tmp = Path(tempfile.mkdtemp(prefix="rfmn-", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True,
                              timeout=400, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads(out.read_text())
    assert r["num_nodes"] == 3 and r["failures"] == 0 and r["accuracy"] > 0.3
    (node_a,), (node_b,) = r["site_nodes"]["site_a"], r["site_nodes"]["site_b"]
    placed = list(zip(r["sites"], r["groups"], r["actor_nodes"]))
    assert sorted((s or "", g) for s, g, _ in placed) == [("", [6, 7]), ("site_a", [0, 1, 2]), ("site_b", [3, 4, 5])]
    for site, clients, node in placed:
        if site == "site_a":
            assert node == node_a, f"clients {clients} of site_a ran on {node}, not on {node_a}"
        elif site == "site_b":
            assert node == node_b, f"clients {clients} of site_b ran on {node}, not on {node_b}"


def test_checkpoints_gather_from_every_node_and_a_resume_equals_the_uninterrupted_run(tmp_path):
    out = tmp_path / "resume.json"
    script = Path(__file__).with_name("multinode_resume_run.py")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rfmn-", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "runs")], capture_output=True,
                              text=True, timeout=500, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads(out.read_text())
    assert r["distinct_actor_nodes"] >= 2  # the client actors ran on different raylets
    assert r["checkpoint_files"] == ["actor_0.safetensors", "actor_1.safetensors", "actor_2.safetensors"]
    assert r["equal"] and r["num_rows"] > 100
