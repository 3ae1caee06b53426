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


def test_a_lead_within_the_tie_margin_is_a_tie_not_a_ranking():
    f = _module("fidelity")
    a = {"fedtp": 0.913, "personalized_t": 0.842, "fedavg": 0.164, "fedper": 0.912, "local": 0.95}
    assert f.claim_verdict(a, ("fedtp", ">=", "personalized_t", ">", "fedavg")) == \
        "FedTP >= Personalized-T > FedAvg: holds"
    # a 0.001 lead: '>' does not hold on it, and the verdict names the tie
    assert f.claim_verdict(a, ("fedtp", ">", "fedper")) == \
        "FedTP > FedPer: DOES NOT HOLD (FedTP 0.913 and FedPer 0.912: a tie, within 0.01)"
    assert f.claim_verdict(a, ("fedtp", ">", "fedper"), tie=0) == "FedTP > FedPer: holds"  # strict on request
    assert f.claim_verdict(a, ("fedtp", ">", "local")) == "FedTP > Local: DOES NOT HOLD"
    # '>=' holds on a tie, also when trailing within the margin, and not beyond it
    b = {"ffgg_k5": 0.960, "fedper": 0.961, "ffgg_k1": 0.943}
    assert f.claim_verdict(b, ("ffgg_k5", ">=", "fedper")).startswith("FFGG (K=5 local body steps) >= FedPer: holds (")
    assert f.claim_verdict(b, ("ffgg_k1", ">=", "fedper")) == "FFGG (K=1, paper) >= FedPer: DOES NOT HOLD"
    # a chain fails on its weakest link: Personalized-T ties FedAvg
    c = {"fedtp": 0.170, "personalized_t": 0.1702, "fedavg": 0.1700}
    assert f.claim_verdict(c, ("fedtp", ">=", "personalized_t", ">", "fedavg")).startswith(
        "FedTP >= Personalized-T > FedAvg: DOES NOT HOLD (FedTP 0.170 and Personalized-T 0.170; Personalized-T")
    with pytest.raises(ValueError, match="'<'"):
        f.claim_verdict(a, ("fedtp", "<", "fedavg"))


def test_checks_apply_the_margin_per_setting_and_budget():
    f = _module("fidelity")
    rows = [{"setting": "s", "method": m, "rounds": 25, "seed": seed, "accuracy_mean": acc + d}
            for m, acc in (("ffgg_k1", 0.5), ("ffgg_k5", 0.715), ("fedavg", 0.37), ("fedper", 0.719))
            for seed, d in ((0, -0.01), (1, 0.01))]  # the means over seeds are the accuracies above
    lines = f.checks(rows, "ffgg", ["s"], ["ffgg_k1", "ffgg_k5", "fedavg", "fedper"], [25])
    assert lines[0].startswith("s, 25 rounds, accuracy / FedAvg's: FFGG (K=1, paper) 1.35x")
    assert lines[1:] == ["  FFGG (K=1, paper) > FedAvg: holds", "  FFGG (K=1, paper) >= FedPer: DOES NOT HOLD",
                         "  FFGG (K=5 local body steps) > FedAvg: holds",
                         "  FFGG (K=5 local body steps) >= FedPer: holds (FFGG (K=5 local body steps) 0.715 and "
                         "FedPer 0.719: a tie, within 0.01)"]
    strict = f.checks(rows, "ffgg", ["s"], ["ffgg_k1", "ffgg_k5", "fedavg", "fedper"], [25], tie=0)
    assert strict[-1] == "  FFGG (K=5 local body steps) >= FedPer: DOES NOT HOLD"


def test_a_negative_tie_margin_is_refused_before_any_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fidelity.py"), "--table", "image",
                           "--tie", "-0.1", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "--tie -0.1: a tie margin is a difference in accuracy, at least 0" in proc.stderr
    assert not (tmp_path / "runs").exists()
