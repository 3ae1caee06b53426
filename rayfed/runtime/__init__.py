"""Where clients and the server run. With ``tune.py`` and ``cli.py``, the only code importing ray.

- :class:`ClientCohort` / :class:`ServerCore`: the client and server logic, Ray-free.
- :class:`LocalExecutor`: both in this process (tests, debugging).
- ``RayExecutor``, ``ClientActor``, ``ServerActor``: the same code as Ray actors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rayfed.config import FederationConfig
from rayfed.runtime.core import ClientCohort, ClientFailure, CohortSpec, ServerCore, client_seed
from rayfed.runtime.executor import Executor, LocalExecutor, make_executor
from rayfed.runtime.placement import assign_clients

__all__ = [
    "ClientActor",
    "ClientCohort",
    "ClientFailure",
    "CohortSpec",
    "Executor",
    "LocalExecutor",
    "RayExecutor",
    "ServerActor",
    "ServerCore",
    "assign_clients",
    "client_seed",
    "make_executor",
    "runtime_session",
    "warm_actors",
]


@contextlib.contextmanager
def runtime_session(cfg: FederationConfig) -> Iterator[None]:
    """Join (or start) Ray for a Ray run; shut down only a Ray this call started. No-op for local."""
    if cfg.runtime.executor != "ray":
        yield
        return
    from rayfed.runtime.ray_executor import ray_session

    with ray_session(cfg.runtime.address):
        yield


@contextlib.contextmanager
def warm_actors(cfg: FederationConfig) -> Iterator[None]:
    """Reuse actor processes across the federations run inside the block (Ray runs only)."""
    if cfg.runtime.executor != "ray":
        yield
        return
    from rayfed.runtime.ray_executor import warm_actors as _warm

    with _warm():
        yield


def __getattr__(name: str):
    if name in ("ClientActor", "RayExecutor", "ServerActor"):
        from rayfed.runtime import ray_executor

        return getattr(ray_executor, name)
    raise AttributeError(name)
