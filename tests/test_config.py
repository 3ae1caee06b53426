"""Config: YAML in/out, overrides, and the errors users see (messages pinned)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayfed import ConfigError, Federation, FederationConfig, dump_config, from_dict, load_config, to_dict
from rayfed.config import apply_overrides


def test_defaults_validate_and_round_trip_yaml(tmp_path):
    cfg = load_config(None, ["algorithm.name=fedrep", "algorithm.head_epochs=2", "rounds=3",
                             "data.partition.alpha=0.1", "runtime.resources_per_actor={site_a: 1}"])
    assert cfg.algorithm.name == "fedrep" and cfg.algorithm.head_epochs == 2.0
    assert cfg.algorithm.private == ["preset:head"]
    assert cfg.rounds == 3 and cfg.data.partition.alpha == 0.1
    assert cfg.runtime.resources_per_actor == {"site_a": 1.0}
    p = tmp_path / "c.yaml"
    dump_config(cfg, p)
    again = load_config(p)
    assert to_dict(again) == to_dict(cfg)


def test_repr_shows_only_non_defaults():
    r = repr(load_config(None, ["rounds=7"]))
    assert "rounds=7" in r and "seed=" not in r


def test_switching_algorithm_drops_old_options():
    data = apply_overrides({"algorithm": {"name": "fedrep", "head_epochs": 3}}, ["algorithm.name=fedavg"])
    assert from_dict(data).algorithm.name == "fedavg"


def test_unknown_key_is_rejected_with_suggestion():
    with pytest.raises(ConfigError, match=r"config key 'train.lrr': unknown key \(did you mean 'lr'\?\); "
                                          r"valid keys in section 'train': local_epochs, batch_size"):
        load_config(None, ["train.lrr=0.1"])


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match=r"config key 'round': unknown key \(did you mean 'rounds'\?\)"):
        from_dict({"round": 3})


def test_bad_value_names_key_value_and_fix():
    with pytest.raises(ConfigError, match=r"config key 'data.partition.alpha': expected a number > 0 "
                                          r"\(e.g. 0.3\), got -1.0"):
        load_config(None, ["data.partition.alpha=-1"])
    with pytest.raises(ConfigError, match=r"config key 'rounds': expected an integer, got 'many'"):
        load_config(None, ["rounds=many"])
    with pytest.raises(ConfigError, match=r"config key 'data.partition.name': got 'dirichet' \(did you mean "
                                          r"'dirichlet'\?\); valid choices: 'iid', 'dirichlet'"):
        load_config(None, ["data.partition.name=dirichet"])


def test_unknown_algorithm_lists_registered():
    with pytest.raises(ConfigError, match=r"config key 'algorithm.name': unknown algorithm 'fedprox' .*"
                                          r"registered algorithms: .*fedavg.*fedper.*local"):
        load_config(None, ["algorithm.name=fedprox"])
    with pytest.raises(ConfigError, match=r"config key 'compare\[1\]': unknown algorithm 'fedperr' \(did you "
                                          r"mean 'fedper'\?\)"):
        from_dict({"compare": ["fedavg", "fedperr"]})


def test_algorithm_specific_unknown_option():
    with pytest.raises(ConfigError, match=r"config key 'algorithm.head_epochs': unknown key; valid keys in "
                                          r"section 'algorithm': name, .*server_lr"):
        from_dict({"algorithm": {"name": "fedavg", "head_epochs": 2}})


def test_missing_parquet_file():
    with pytest.raises(ConfigError, match=r"config key 'data.path': Parquet path 'nope/x.parquet' does not "
                                          r"exist; point data.path at a .parquet file or a directory"):
        load_config(None, ["data.source=parquet", "data.path=nope/x.parquet"])


def test_missing_label_column_rejected_before_any_actor(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"features": [[0.0, 1.0]] * 40, "target": [0, 1] * 20}), path)
    cfg = load_config(None, ["data.source=parquet", f"data.path={path}", "data.num_clients=2",
                             "runtime.executor=ray"])
    import rayfed.runtime

    def no_actors(*a, **k):  # the check must happen before the executor (and any actor) exists
        raise AssertionError("executor created before the config was validated")

    monkeypatch.setattr(rayfed.runtime, "make_executor", no_actors)
    with pytest.raises(ConfigError, match=r"data.label_column.*'label'.*target"):
        Federation(cfg, run_dir=False).fit()


def test_cross_field_checks():
    with pytest.raises(ConfigError, match=r"config key 'sample_count': expected an integer in \[1, "
                                          r"data.num_clients=20\], got 50"):
        load_config(None, ["sample_count=50"])
    with pytest.raises(ConfigError, match=r"model.hidden_size.*multiple of model.num_heads=3"):
        load_config(None, ["model.num_heads=3"])
    with pytest.raises(ConfigError, match=r"--set 'rounds': expected KEY=VALUE"):
        load_config(None, ["rounds"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match=r"config file 'no/such.yaml' does not exist"):
        load_config("no/such.yaml")


def test_clients_per_round():
    assert FederationConfig(sample_fraction=0.25).clients_per_round() == 5
    assert load_config(None, ["sample_count=3"]).clients_per_round() == 3
