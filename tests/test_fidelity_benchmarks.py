"""The fidelity benchmarks print the budget they actually ran and tables built from their runs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fedtp_fidelity_budget_line_follows_the_overrides():
    f = _module("fedtp_fidelity")
    line = f.budget(f.make_config("dirichlet(0.3)", "fedtp", 0, ["rounds=50", "sample_count=4",
                                                                   "train.local_epochs=3"]))
    assert "50 rounds" in line and "4 clients/round" in line and "x 3 epoch(s)" in line
    assert "20 rounds" in f.budget(f.make_config("dirichlet(0.3)", "fedavg", 0, []))


@pytest.mark.slow
def test_fidelity_table_runs_reuses_its_runs_and_prints_the_budget(tmp_path):
    args = [sys.executable, str(ROOT / "benchmarks" / "fidelity.py"), "--table", "image", "--rounds", "1", "2",
            "--seeds", "0", "--methods", "fedavg", "local", "--out", str(tmp_path)]
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "rounds [1, 2] (one run of 2 rounds" in first.stdout and "10 clients per round" in first.stdout
    assert "4 runs made, 0 reused" in first.stdout
    assert "| pathological(2) | 2 |" in first.stdout and "dirichlet(0.3), 2 rounds, accuracy / FedAvg's: Local" \
        in first.stdout
    rows = json.loads((tmp_path / "image.json").read_text())
    assert len(rows) == 2 * 2 * 2 and {r["rounds"] for r in rows} == {1, 2}  # settings x methods x budgets
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert "0 runs made, 4 reused" in again.stdout
    assert json.loads((tmp_path / "image.json").read_text()) == rows  # the same figures from the stored runs
