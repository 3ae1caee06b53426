"""Per-client descriptions: what makes one client's model and work differ from another's.

Clients are not all alike: a client may run only the first ``k`` blocks of a transformer (a depth
*tier*), hold only some of the data's tasks and input modalities, or live at a *site* (a node that
owns its data). A :class:`ClientSpec` records this for one client; it is made once, on the
driver, from the config and the data (seeded, deterministic), and the algorithm may refine it
(:meth:`rayfed.algorithms.Algorithm.client_specs`).

Clients whose :class:`Structure` is equal build the same model: a client actor builds one model
(and one role map) per distinct structure among its clients, and the server holds the union of
all structures (:meth:`Structure.union`).

Example:
    >>> specs = assign_tiers([ClientSpec(c) for c in range(4)], {1: 0.5, 2: 0.5}, seed=0)
    >>> sorted(s.tier for s in specs)
    [1, 1, 2, 2]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional

import numpy as np

from rayfed.data.info import DEFAULT_TASK

if TYPE_CHECKING:
    from rayfed.config import FederationConfig
    from rayfed.data import FederatedDataset

__all__ = ["ClientSpec", "Structure", "assign_tiers", "describe_clients"]


@dataclass(frozen=True, order=True)
class Structure:
    """The part of a client's description that shapes its model.

    Attributes:
        tier: blocks of the model the client holds and runs (``None``: all of them).
        tasks: the tasks it trains, i.e. the output heads its model holds.
        modalities: the input modalities of those tasks, i.e. the encoders its model holds.
    """

    tier: Optional[int] = None
    tasks: tuple[str, ...] = (DEFAULT_TASK,)
    modalities: tuple[str, ...] = ()

    @staticmethod
    def union(structures: Sequence[Structure]) -> Structure:
        """The structure holding every part of ``structures`` (the server's model): the deepest tier
        (``None`` if any is ``None``), and every task and modality, in order of first appearance.
        """
        tiers = [s.tier for s in structures]
        tier = None if any(t is None for t in tiers) else max(tiers)
        tasks = tuple(dict.fromkeys(t for s in structures for t in s.tasks))
        mods = tuple(dict.fromkeys(m for s in structures for m in s.modalities))
        return Structure(tier, tasks, mods)

    def label(self) -> str:
        """A short human-readable name, e.g. ``depth 2, tasks digit+parity``."""
        parts = [] if self.tier is None else [f"depth {self.tier}"]
        if self.tasks != (DEFAULT_TASK,):
            parts.append("tasks " + "+".join(self.tasks))
        return ", ".join(parts) or "full model"


@dataclass(frozen=True)
class ClientSpec:
    """One client's description (small and picklable; made once on the driver).

    Attributes:
        client_id: the client.
        tier: its depth budget: blocks it holds and runs (``None``: the whole model).
        tasks: names of the tasks its data holds.
        modalities: input modalities of those tasks.
        site: the ``runtime.sites`` site its data lives at, if pinned.
    """

    client_id: int
    tier: Optional[int] = None
    tasks: tuple[str, ...] = (DEFAULT_TASK,)
    modalities: tuple[str, ...] = ()
    site: Optional[str] = None

    @property
    def structure(self) -> Structure:
        """What shapes this client's model (clients with equal structures share one model object)."""
        return Structure(self.tier, self.tasks, self.modalities)


def assign_tiers(specs: Sequence[ClientSpec], fractions: Mapping[int, float], seed: int) -> list[ClientSpec]:
    """Give each client a depth tier: ``fractions[k]`` of the clients get tier ``k``.

    The counts are the largest-remainder rounding of ``fractions x clients``; which clients get
    which tier is a seeded permutation, so the assignment depends only on the seed and the ids.
    ``fractions`` empty leaves every tier as it is.
    """
    if not fractions:
        return list(specs)
    depths = sorted(fractions)
    n = len(specs)
    raw = np.array([fractions[d] * n for d in depths], dtype=np.float64)
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    order = np.random.default_rng([seed % 2**63, 0x71E5]).permutation(n)
    tiers = np.repeat(depths, counts)
    out = list(specs)
    for pos, t in zip(order, tiers):
        out[pos] = replace(out[pos], tier=int(t))
    return out


def describe_clients(cfg: FederationConfig, dataset: FederatedDataset) -> dict[int, ClientSpec]:
    """Every client's :class:`ClientSpec` from the config and the data: its tasks and their
    modalities (from the data), its depth tier (``data.tiers``) and its site (``runtime.sites``).
    """
    sites = {c: site for site, ids in cfg.runtime.sites.items() for c in ids}
    specs = []
    for cid in dataset.client_ids:
        tasks = tuple(dataset.client_tasks(cid))
        mods = tuple(dict.fromkeys(m for t in tasks for m in dataset.info.task_info(t).modalities))
        specs.append(ClientSpec(cid, None, tasks, mods, sites.get(cid)))
    specs = assign_tiers(specs, cfg.data.tiers, cfg.seed)
    return {s.client_id: s for s in specs}
