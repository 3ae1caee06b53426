"""Search space files (tune_spaces/*.yaml): format, loader, sampling, errors. No Ray cluster needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import rayfed
from rayfed.config import from_dict
from rayfed.errors import ConfigError
from rayfed.tune import SAMPLERS, SPACE_KEYS, load_space, merge_params

SPACES = Path(__file__).resolve().parent.parent / "tune_spaces"
FILES = sorted(SPACES.glob("*.yaml"))


def test_every_registered_algorithm_has_a_space_file():
    from rayfed.algorithms import get_algorithm

    have = {yaml.safe_load(f.read_text())["algorithm"] for f in FILES}
    shipped = {n for n in rayfed.available() if get_algorithm(n).__module__.startswith("rayfed.")}  # not tests'
    missing = sorted(shipped - have)
    assert not missing, f"add tune_spaces/<name>.yaml for {missing} (format: tune_spaces/README.md)"


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_space_file_loads_and_samples_valid_configs(path):
    sp = load_space(path)
    assert sp.algorithm in rayfed.available()
    base = sp.base_mapping({})
    samples = sp.sample(6, seed=3)
    assert len(samples) == 6
    for params in samples:
        assert set(params) == set(sp.space)
        cfg = from_dict(merge_params(base, params))
        assert cfg.algorithm.name == sp.algorithm
        for key, value in params.items():  # the sampled value lands on the config key
            obj = cfg
            for part in key.split("."):
                obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
            assert obj == value and type(value) in (int, float, str, bool, list), (key, value)


def _space(**kw):
    d = {"algorithm": "fedavg", "space": {"train.lr": {"loguniform": [0.001, 0.1]}}}
    d.update(kw)
    return d


def test_samplers_follow_tune_semantics():
    sp = load_space(_space(space={
        "train.local_epochs": {"randint": [1, 3]},          # high exclusive
        "train.batch_size": {"qrandint": [16, 64, 16]},     # inclusive, multiples of q
        "train.lr": {"loguniform": [0.001, 0.01]},
        "train.momentum": {"uniform": [0.1, 0.2]},
        "algorithm.server_lr": {"grid": [0.5, 1.0]},
        "model.mlp_hidden": {"choice": [[8], [16, 16]]},
    }))
    seen = sp.sample(60, seed=0)
    assert {p["train.local_epochs"] for p in seen} == {1, 2}
    assert {p["train.batch_size"] for p in seen} <= {16, 32, 48, 64}
    assert all(0.001 <= p["train.lr"] < 0.01 for p in seen)
    assert all(0.1 <= p["train.momentum"] < 0.2 for p in seen)
    assert {p["algorithm.server_lr"] for p in seen} == {0.5, 1.0}
    assert {tuple(p["model.mlp_hidden"]) for p in seen} == {(8,), (16, 16)}
    assert sp.param_space()["algorithm.server_lr"] == {"grid_search": [0.5, 1.0]}


@pytest.mark.parametrize("raw, needle", [
    (_space(metirc="accuracy_mean"), "unknown key(s) ['metirc']"),
    (_space(space={"train.lrr": {"uniform": [0.1, 0.2]}}), "did you mean 'train.lr'"),
    (_space(space={"algorithm.hypernet_lr": {"uniform": [0.1, 0.2]}}), "unknown config key"),
    (_space(space={"train.lr.x": {"uniform": [0.1, 0.2]}}), "is a value, not a section"),
    (_space(space={"algorithm.name": {"choice": ["fedper"]}}), "cannot be swept"),
    (_space(space={"train.lr": {"gaussian": [0.1, 0.2]}}), "expected one sampler"),
    (_space(space={"train.lr": 0.01}), "fixed values go under 'fixed'"),
    (_space(space={"train.lr": {"loguniform": [0.0, 0.1]}}), "needs low > 0"),
    (_space(space={"train.lr": {"uniform": [0.2, 0.1]}}), "needs low < high"),
    (_space(space={"train.local_epochs": {"randint": [1.5, 3]}}), "needs integers"),
    (_space(space={"train.lr": {"uniform": [-1.0, 0.1]}}), "value -1.0 gives an invalid config"),
    (_space(space={"train.optimizer": {"choice": ["adam", "lion"]}}), "'lion'"),
    (_space(algorithm="fedperr"), "did you mean 'fedper'"),
    (_space(metric="acc"), "metric 'acc' is not reported"),
    (_space(mode="maximize"), "mode must be max or min"),
    (_space(scheduler={"name": "asha", "grace": 2}), "do not apply to asha"),
    (_space(scheduler={"name": "hyperband"}), "is not one of"),
    (_space(fixed={"train.epochs": 2}), "fixed key 'train.epochs'"),
    ({"space": {"train.lr": {"uniform": [0.1, 0.2]}}}, "missing 'algorithm'"),
])
def test_bad_space_is_a_config_error_naming_the_problem(raw, needle):
    with pytest.raises(ConfigError) as e:
        load_space(raw)
    assert needle in str(e.value)


def test_file_errors_name_the_file(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("algorithm: fedavg\nspace:\n  train.lr: {uniform: [0.1]}\n")
    with pytest.raises(ConfigError, match="uniform takes"):
        load_space(p)
    p.write_text("algorithm: fedavg\nsapce: {}\n")
    with pytest.raises(ConfigError, match=r"s\.yaml: unknown key\(s\) \['sapce'\]"):
        load_space(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "missing.yaml")


def test_fixed_and_base_config_apply_and_method_options_reset():
    base = {"rounds": 7, "algorithm": {"name": "fedrep", "head_epochs": 3.0}}
    sp = load_space(_space(algorithm="fedper", fixed={"train.batch_size": 8}), base)
    data = sp.base_mapping(base)
    cfg = from_dict(data)
    assert cfg.rounds == 7 and cfg.train.batch_size == 8
    assert cfg.algorithm.name == "fedper" and not hasattr(cfg.algorithm, "head_epochs")
    assert data["compare"] == [] and data["output"]["plots"] is False


def test_mapping_field_entries_and_readme_documents_the_format():
    sp = load_space(_space(space={"runtime.resources_per_actor.site_a": {"choice": [0.5, 1.0]}}))
    assert from_dict(merge_params(sp.base_mapping({}), sp.sample(1)[0])).runtime.resources_per_actor["site_a"] > 0
    readme = (SPACES / "README.md").read_text()
    for word in [*SAMPLERS, *SPACE_KEYS, "asha", "pbt", "fifo"]:
        assert word in readme, word
