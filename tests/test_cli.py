"""The `rayfed` command line: run, partition, report, and its error output."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pandas as pd
import yaml
from conftest import small_config

from rayfed.cli import main
from rayfed.config import dump_config


def _write(tmp_path, **overrides):
    cfg = small_config(**overrides)
    p = tmp_path / "cfg.yaml"
    dump_config(cfg, p)
    return p


def test_run_compare_prints_table_and_writes_outputs(tmp_path, capsys):
    p = _write(tmp_path, rounds=2, output__dir=str(tmp_path / "runs"), output__name="x", output__plots=True)
    assert main(["run", str(p), "--compare", "fedavg,fedper"]) == 0
    out = capsys.readouterr().out
    assert "method" in out and "client-mean acc" in out and "fedper" in out
    run = tmp_path / "runs" / "x"
    assert (run / "fedavg" / "metrics.parquet").exists() and (run / "accuracy.png").exists()
    table = pd.read_csv(run / "summary.csv")
    assert list(table.algorithm) == ["fedavg", "fedper"]
    assert main(["report", str(run)]) == 0
    assert "fedper" in capsys.readouterr().out
    # the resolved config written into the run directory runs again as is
    resolved = yaml.safe_load((run / "fedper" / "config.yaml").read_text())
    assert resolved["algorithm"]["name"] == "fedper" and resolved["compare"] == []


def test_run_single_algorithm_with_set(tmp_path, capsys, caplog):
    p = _write(tmp_path, rounds=1, output__dir=str(tmp_path / "runs"))
    assert main(["run", str(p), "--set", "algorithm.name=fedrep", "--set", "algorithm.head_epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "fedrep" in out and "run directory:" in out
    # start-up stages are shown without -v; the per-round log is not
    startup = [r.getMessage() for r in caplog.records if r.name == "rayfed.startup"]
    assert any(m.startswith("data: 6 clients") for m in startup), startup
    assert not [r for r in caplog.records if r.name == "rayfed" and r.getMessage().startswith("round ")]


def test_partition_prints_summary_and_plots(tmp_path, capsys):
    png = tmp_path / "labels.png"
    assert main(["partition", "--set", "data.num_clients=8", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "digits: 8 clients, 10 classes, partition=pathological" in out
    assert "num_train" in out and png.stat().st_size > 1000


def test_config_error_exits_2_with_message(tmp_path, capsys):
    assert main(["run", "--set", "data.partition.name=dirichet"]) == 2
    err = capsys.readouterr().err
    assert "rayfed: config error: config key 'data.partition.name': got 'dirichet' (did you mean 'dirichlet'?)" in err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = shutil.which("rayfed", path=os.path.dirname(sys.executable)) or shutil.which("rayfed")
    assert exe, "the rayfed console script is not on PATH; install the package (pip install -e .)"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "run" in out.stdout and "partition" in out.stdout


def test_compare_applies_algorithm_options_where_they_exist(tmp_path, capsys):
    p = _write(tmp_path, rounds=1, output__dir=str(tmp_path / "runs"), output__name="c")
    assert main(["run", str(p), "--compare", "fedavg,fedrep,ffgg", "--set", "algorithm.head_epochs=2",
                 "--set", "algorithm.tau=3"]) == 0
    err = capsys.readouterr().err
    assert "fedavg: has no option algorithm.head_epochs, algorithm.tau; not applied" in err
    assert "fedrep: has no option algorithm.tau; not applied" in err
    assert "ffgg: has no option algorithm.head_epochs" in err
    run = tmp_path / "runs" / "c"
    assert yaml.safe_load((run / "fedrep" / "config.yaml").read_text())["algorithm"]["head_epochs"] == 2
    assert yaml.safe_load((run / "ffgg" / "config.yaml").read_text())["algorithm"]["tau"] == 3


def test_version_and_a_malformed_set_value(capsys):
    import pytest

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("rayfed ")
    assert main(["run", "--set", "train.lr=[0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--set 'train.lr=[0.1': the value of 'train.lr' is not valid YAML" in err


def test_a_lora_run_from_yaml_alone(tmp_path, capsys):
    p = tmp_path / "lora.yaml"
    p.write_text(f"""
rounds: 2
data: {{source: synthetic, num_clients: 4, synthetic: {{modality: text, feature_shape: [12], vocab_size: 50,
        num_samples: 160}}}}
model: {{name: bert, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32,
         peft: {{type: lora, r: 4, target_modules: [query, value]}}}}
algorithm: {{name: fedper, private: ["preset:head"]}}
runtime: {{executor: local, torch_threads: 1}}
output: {{dir: {tmp_path / "runs"}, name: lora, plots: false}}
""")
    assert main(["run", str(p)]) == 0
    summary = yaml.safe_load((tmp_path / "runs" / "lora" / "summary.json").read_text())
    # base frozen; LoRA A and B of query and value shared; the head private
    assert summary["roles"]["shared"] == 4 and summary["roles"]["frozen"] > 0 and summary["roles"]["private"] > 0
    # only LoRA tensors cross the wire: 2 rounds x 4 clients x 4 tensors of 4 x 16 float32
    assert summary["bytes_up"] == 2 * 4 * 4 * (4 * 16) * 4
    assert yaml.safe_load((tmp_path / "runs" / "lora" / "config.yaml").read_text())["model"]["peft"]["r"] == 4
