"""Which clients train in which round: seeded by (seed, round) only, so every executor agrees.

:func:`sample_clients` is what the round loop uses; :func:`sampling_schedule` lists its choices for
the rounds of a config ahead of time, which the Ray executor uses to place clients on actors so that
each round's work is spread evenly (:func:`rayfed.runtime.placement.balance_groups`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from rayfed.training import local_steps

__all__ = ["client_cost", "sample_clients", "sampling_schedule"]

#: rounds of the schedule that placement looks at: at most this many, and at most
#: SCHEDULE_DRAWS / (number of clients) of them (each round's draw costs O(clients))
SCHEDULE_ROUNDS = 1000
SCHEDULE_DRAWS = 2_000_000


def sample_clients(client_ids: Sequence[int], k: int, seed: int, round: int) -> list[int]:
    """The clients sampled in ``round``: seeded by (seed, round) only, so any executor agrees."""
    if k >= len(client_ids):
        return sorted(client_ids)
    rng = np.random.default_rng([seed, round, 7])
    return sorted(int(c) for c in rng.choice(np.asarray(client_ids), size=k, replace=False))


def sampling_schedule(client_ids: Sequence[int], k: int, seed: int, rounds: int,
                      start: int = 0) -> list[list[int]]:
    """The clients :func:`sample_clients` picks in rounds ``start .. start+rounds-1``, or in the first
    of them: at most :data:`SCHEDULE_ROUNDS` rounds and :data:`SCHEDULE_DRAWS` clients drawn from.
    """
    n = min(rounds, SCHEDULE_ROUNDS, max(1, SCHEDULE_DRAWS // max(1, len(client_ids))))
    return [sample_clients(client_ids, k, seed, r) for r in range(start, start + n)]


def client_cost(num_train: Mapping[int, int], batch_size: int, local_epochs: float,
                max_steps: int | None = None) -> dict[int, float]:
    """Local optimizer steps of each client per round (:func:`rayfed.training.local_steps`, at least
    one): the unit of work that placement balances.
    """
    return {cid: float(local_steps(max(n, 1), batch_size, local_epochs, max_steps)) for cid, n in num_train.items()}
