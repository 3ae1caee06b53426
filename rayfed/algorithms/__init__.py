"""The algorithms: one module per method, registered by name in :mod:`rayfed.registry`.

Example:
    >>> from rayfed.algorithms import available, get_algorithm
    >>> "fedper" in available(), get_algorithm("fedavg").name
    (True, 'fedavg')
"""

from __future__ import annotations

from rayfed.algorithms.base import (
    Aggregator,
    Algorithm,
    ClientContext,
    ClientState,
    ClientUpdate,
    MeanAggregator,
    ServerState,
)
from rayfed.registry import available, get_algorithm, register_algorithm

__all__ = [
    "Aggregator",
    "Algorithm",
    "ClientContext",
    "ClientState",
    "ClientUpdate",
    "MeanAggregator",
    "ServerState",
    "available",
    "create",
    "get_algorithm",
    "register_algorithm",
]


def create(config) -> Algorithm:
    """An algorithm instance from its config (``config.name`` selects the class)."""
    return get_algorithm(config.name)(config)


from rayfed.algorithms import anytime, fedavg, fedrep, fedspa, fedtp, ffgg, local, tap  # noqa: E402  (registers the built-ins)

for _mod in (anytime, fedavg, fedrep, fedspa, fedtp, ffgg, local, tap):
    for _cls in _mod.ALGORITHMS:
        register_algorithm(_cls)
