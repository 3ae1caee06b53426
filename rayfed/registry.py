"""The algorithm registry: names to :class:`~rayfed.algorithms.Algorithm` classes.

It sits below :mod:`rayfed.config` (which looks names up here to pick an algorithm's own config
class) and imports nothing of rayfed but its errors; :mod:`rayfed.algorithms` registers the
built-in methods when the package is imported.

Example:
    >>> from rayfed.registry import available
    >>> "fedavg" in available()
    True
"""

from __future__ import annotations

from typing import Any

from rayfed.errors import ConfigError, did_you_mean

__all__ = ["available", "get_algorithm", "register_algorithm", "unregister_algorithm"]

_REGISTRY: dict[str, type] = {}


def register_algorithm(cls: type) -> type:
    """Register an algorithm class under ``cls.name`` (usable as a decorator)."""
    name = getattr(cls, "name", None)
    if not name or name == "base":
        raise ValueError(f"{cls.__name__} needs a class attribute `name` to be registered")
    _REGISTRY[name] = cls
    return cls


def unregister_algorithm(name: str) -> None:
    """Remove ``name`` from the registry (for tests that register a temporary algorithm)."""
    _REGISTRY.pop(name, None)


def available() -> list[str]:
    """Registered algorithm names, sorted."""
    return sorted(_REGISTRY)


def get_algorithm(name: Any, *, key: str | None = None) -> type:
    """The algorithm class registered as ``name``; the error lists the registered names.

    Args:
        name: the algorithm name.
        key: the config key the name came from, named in the error (e.g. ``algorithm.name``).
    """
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        where = f"config key '{key}': " if key else ""
        raise ConfigError(f"{where}unknown algorithm {name!r}{did_you_mean(name, available())}; registered "
                          f"algorithms: {', '.join(available())}")
    return cls
