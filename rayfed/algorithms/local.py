"""Local training only: every tensor is private; nothing is sent (the no-federation baseline)."""

from __future__ import annotations

from dataclasses import dataclass

from rayfed.algorithms.base import Algorithm
from rayfed.config import AlgorithmConfig
from rayfed.roles import Role

__all__ = ["Local", "LocalConfig"]


@dataclass
class LocalConfig(AlgorithmConfig):
    """Local has no options."""

    name: str = "local"


class Local(Algorithm):
    """Each client trains alone."""

    name = "local"
    config_class = LocalConfig

    def default_role(self) -> Role:
        return Role.PRIVATE


ALGORITHMS = (Local,)
