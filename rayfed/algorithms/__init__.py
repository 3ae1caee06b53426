"""Algorithm registry: one module per method, one registration line each.

Example:
    >>> from rayfed.algorithms import available, get_algorithm
    >>> "fedper" in available(), get_algorithm("fedavg").name
    (True, 'fedavg')
"""

from __future__ import annotations

import difflib

from rayfed.algorithms.base import (
    Aggregator,
    Algorithm,
    ClientContext,
    ClientState,
    ClientUpdate,
    MeanAggregator,
    ServerState,
)
from rayfed.errors import ConfigError

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

_REGISTRY: dict[str, type[Algorithm]] = {}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Register an :class:`Algorithm` subclass under ``cls.name`` (usable as a decorator)."""
    if not cls.name or cls.name == "base":
        raise ValueError(f"{cls.__name__} needs a class attribute `name` to be registered")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Registered algorithm names, sorted."""
    return sorted(_REGISTRY)


def get_algorithm(name: str) -> type[Algorithm]:
    """The algorithm class registered as ``name``; the error lists the registered names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), available(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown algorithm {name!r}{hint}; registered algorithms: "
                          f"{', '.join(available())}") from None


def create(config) -> Algorithm:
    """An algorithm instance from its config (``config.name`` selects the class)."""
    return get_algorithm(config.name)(config)


from rayfed.algorithms import fedavg, fedrep, fedtp, ffgg, local  # noqa: E402  (registers the built-ins)

for _mod in (fedavg, fedrep, fedtp, ffgg, local):
    for _cls in _mod.ALGORITHMS:
        register_algorithm(_cls)
