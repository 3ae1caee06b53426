"""Get every client's personalized model out of a finished (or interrupted) run, without Ray.

:func:`export_run` reads a run's ``config.yaml`` and a checkpoint (the final one by default), builds
the server and the clients' cohort in this process with the same code the actors run, loads the
saved states, and writes each client's model as it is evaluated (shared weights, its generated
tensors for FedTP, its private tensors, masks and adapters) with
:func:`rayfed.models.export.export_model`: a PEFT adapter folder, a Hugging Face ``save_pretrained``
folder, or a state dict in safetensors. ``rayfed export RUN_DIR --out DIR`` and
:meth:`rayfed.FederationResult.export` call it.

Example:
    >>> paths = export_run("runs/my-run", out="exported", clients=[0, 3])   # doctest: +SKIP
    >>> sorted(paths)                                                       # doctest: +SKIP
    [0, 3]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional, Union

from rayfed.errors import ConfigError

__all__ = ["export_run"]


def export_run(source: Union[str, os.PathLike], *, out: Union[str, os.PathLike],
               clients: Union[str, Sequence[int]] = "all", model_factory: Optional[Callable] = None,
               ) -> dict[int, Path]:
    """Write the personalized models of ``clients`` of a run to ``out/client_<id>``.

    Args:
        source: a run directory (its latest complete checkpoint, ``final`` when training ended) or a
            checkpoint folder of one.
        out: the folder to write.
        clients: ``"all"`` (every client that trained) or client ids.
        model_factory: the run's ``model_factory``, when it was built with one (its config records that).

    Returns:
        Each exported client's folder.

    Raises:
        ConfigError: no complete checkpoint, an unknown client id, or a run built with a model factory
            that is not given.
    """
    from rayfed.algorithms import create
    from rayfed.checkpoint import CLIENTS_DIR, SERVER_FILE, check_checkpoint, latest_checkpoint
    from rayfed.config import load_config
    from rayfed.data import FederatedDataset
    from rayfed.plan import plan_run
    from rayfed.runtime.core import ClientCohort, CohortSpec, ServerCore

    ckpt = latest_checkpoint(source)
    run_dir = ckpt.parent.parent
    cfg = load_config(run_dir / "config.yaml")
    if cfg.model.factory and model_factory is None:
        raise ConfigError(f"export: the run in {str(run_dir)!r} built its model with a Python model_factory "
                          f"({cfg.model.factory}); pass the same factory (FederationResult.export does)")
    meta = check_checkpoint(ckpt, cfg)
    algorithm = create(cfg.algorithm)
    ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    plan, _ = plan_run(cfg, algorithm, ds, model_factory)
    ids = list(plan.train_ids) if clients == "all" else [int(c) for c in clients]
    unknown = [c for c in ids if c not in plan.specs]
    if unknown:
        raise ConfigError(f"export: clients {unknown[:5]} are not clients of this run (ids 0..{len(plan.specs) - 1})")
    server = ServerCore(cfg, algorithm, ds.info, ds.client_sizes(), model_factory, plan=plan)
    server.load(ckpt / SERVER_FILE)
    cohort = ClientCohort(CohortSpec(cfg, algorithm, ids, ds.subset(ids), plan.specs_of(ids), plan.partial_keys,
                                     model_factory, device="cpu", owner="export"))
    cohort.load_states(ckpt / CLIENTS_DIR)
    round = int(meta["round"]) - 1
    results = cohort.export(round, ids, server.broadcast(round), server.payloads(round, ids), str(out))
    failed = [r for r in results if not isinstance(r, dict)]
    if failed:
        raise failed[0].to_error()
    return {r["client_id"]: Path(r["path"]) for r in results}
