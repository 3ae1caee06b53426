"""Getting clients' personalized models out of a run: HF and PEFT folders that the ecosystem's loaders read."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import small_config

from rayfed import ConfigError, Federation
from rayfed.data import FederatedDataset
from rayfed.training import evaluate

VIT = dict(data__source="digits", data__num_clients=6, data__partition__name="pathological", model__name="vit",
           model__hidden_size=16, model__num_layers=1, model__num_heads=2, model__intermediate_size=16,
           model__patch_size=4, rounds=2, output__save_final=True)


def _recorded(result, cid: int) -> float:
    m = result.metrics
    ev = m[(m.client_id == cid) & (m.metric == "accuracy") & (m.stage.isin(["eval", "final"]))]
    return float(ev.sort_values("round").value.iloc[-1])


@pytest.mark.parametrize("algorithm", ["fedper", "fedtp", "fedspa"])
def test_exported_hf_folders_reload_to_each_clients_recorded_accuracy(algorithm, tmp_path):
    from transformers import AutoModelForImageClassification

    cfg = small_config(algorithm__name=algorithm, **VIT)
    result = Federation(cfg, run_dir=tmp_path / "run").fit()
    paths = result.export(tmp_path / "out", clients=[0, 4])
    assert sorted(paths) == [0, 4]
    ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    for cid, folder in paths.items():
        model = AutoModelForImageClassification.from_pretrained(str(folder), local_files_only=True)
        data = ds.client_data(cid)
        got = evaluate(model, data.x_test, data.y_test, device=torch.device("cpu"))["accuracy"]
        assert got == _recorded(result, cid)
    # clients differ: their private heads (fedper) or generated attention (fedtp) are their own
    a = AutoModelForImageClassification.from_pretrained(str(paths[0])).state_dict()
    b = AutoModelForImageClassification.from_pretrained(str(paths[4])).state_dict()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    owned = {"fedper": lambda k: "classifier" in k, "fedtp": lambda k: "_proj" in k, "fedspa": lambda k: True}
    assert differing and all(owned[algorithm](k) for k in differing)
    if algorithm == "fedspa":  # each client's own sparse model: its mask's zeros are in the exported weights
        sparse = [k for k in a if a[k].dim() >= 2 and not torch.equal(a[k] == 0, b[k] == 0)]
        assert sparse


def test_cli_export_and_its_errors(tmp_path, capsys):
    from rayfed.cli import main

    cfg = small_config(algorithm__name="fedper", **VIT)
    Federation(cfg, run_dir=tmp_path / "run").fit()
    assert main(["export", str(tmp_path / "run"), "--clients", "1,2", "--out", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / "client_2" / "model.safetensors").exists()
    assert main(["export", str(tmp_path / "run"), "--clients", "99", "--out", str(tmp_path / "y")]) == 2
    assert "not clients of this run" in capsys.readouterr().err


def test_a_factory_run_is_recorded_and_not_rerun_from_its_config_alone(tmp_path):
    from rayfed.config import load_config

    def factory(info):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(info.feature_shape)), 4))

    Federation(small_config(rounds=1, output__save_final=True), model_factory=factory, run_dir=tmp_path / "r").fit()
    saved = load_config(tmp_path / "r" / "config.yaml")
    assert saved.model.factory.endswith("factory")
    with pytest.raises(ConfigError, match="model_factory .* which its model section does not describe"):
        Federation(saved, run_dir=False).fit()
    from rayfed.export import export_run

    with pytest.raises(ConfigError, match="pass the same factory"):
        export_run(tmp_path / "r", out=tmp_path / "o")
    assert sorted(export_run(tmp_path / "r", out=tmp_path / "o", model_factory=factory)) == list(range(6))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_a_lora_run_exports_adapter_folders_offline(minilm_path, tmp_path):
    import peft
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayfed.config import ModelConfig
    from rayfed.models import build_model

    rng = np.random.default_rng(1)
    labels = np.arange(36) % 2
    words = [["good", "great", "nice"], ["bad", "awful", "poor"]]
    pq.write_table(pa.table({"text": [" ".join(rng.choice(words[y], 3)) for y in labels], "label": labels}),
                   tmp_path / "t.parquet")
    cfg = small_config(data__source="parquet", data__path=str(tmp_path / "t.parquet"), data__text_column="text",
                       data__tokenizer=minilm_path, data__max_length=8, data__num_clients=3,
                       data__partition__name="iid", model__name="pretrained", model__path=minilm_path,
                       model__peft__type="lora", algorithm__name="fedper", rounds=1, train__batch_size=8,
                       output__save_final=True)
    result = Federation(cfg, run_dir=tmp_path / "run").fit()
    paths = result.export(tmp_path / "out", clients=[2])
    ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    base = build_model(ModelConfig(name="pretrained", path=minilm_path), ds.info, cfg.seed)
    model = peft.PeftModel.from_pretrained(base, str(paths[2]))
    data = ds.client_data(2)
    assert evaluate(model, data.x_test, data.y_test, device=torch.device("cpu"))["accuracy"] == _recorded(result, 2)


def test_a_shallow_clients_export_holds_only_its_blocks(tmp_path):
    from transformers import AutoModelForImageClassification

    cfg = small_config(algorithm__name="fedper", data__tiers={1: 0.5, 2: 0.5}, **{**VIT, "model__num_layers": 2})
    result = Federation(cfg, run_dir=tmp_path / "run").fit()
    paths = result.export(tmp_path / "out")
    ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    depths = {}
    for cid, folder in paths.items():
        model = AutoModelForImageClassification.from_pretrained(str(folder), local_files_only=True)
        depths[cid] = model.config.num_hidden_layers
        data = ds.client_data(cid)
        assert evaluate(model, data.x_test, data.y_test, device=torch.device("cpu"))["accuracy"] == \
            _recorded(result, cid)
    assert sorted(depths.values()) == [1, 1, 1, 2, 2, 2]
    tiers = pd.read_csv(tmp_path / "run" / "clients.csv").set_index("client_id")["tier"]
    assert depths == {int(c): int(t) for c, t in tiers.items()}  # each export is cut to the client's own tier
