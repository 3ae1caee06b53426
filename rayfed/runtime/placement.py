"""Where the server and the client actors go: a plan of actors, their clients and their resources.

Pure Python (no Ray import), so every rule here is unit-tested without a cluster:

- **No placement group** (``rayfed run`` on a cluster): by default one client actor per cluster CPU
  (at most one per client), sharing the CPUs the server leaves (:func:`plan_for_cluster`).
- **Site pinning** (``runtime.sites: {site_a: [0, 1, 2]}``): each site gets ``runtime.actors_per_site``
  actors hosting only that site's clients; each requests :data:`SITE_RESOURCE_AMOUNT` of the custom
  resource named after the site, so Ray schedules it on a node started with
  ``--resources='{"site_a": 1}'``. Unlisted clients go to unpinned actors.
- **Inside a placement group** (a Tune trial): the actors must fit the bundles, each actor inside one
  bundle. :func:`plan_for_bundles` places the server by best fit, then the client actors over the
  bundles that hold their resources, splitting each bundle's CPUs between the actors it hosts.
  :func:`trial_bundles` builds the bundles a Tune trial reserves for a config, which
  :func:`plan_for_bundles` then fills exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from rayfed.config import FederationConfig
from rayfed.errors import ConfigError

__all__ = ["SITE_RESOURCE_AMOUNT", "ActorPlan", "Plan", "actor_groups", "assign_clients", "balance_groups",
           "plan_for_bundles", "plan_for_cluster", "trial_bundles"]

#: amount of a site's custom resource each of its client actors requests (a node started with
#: ``{"site_a": 1}`` can host up to 1,000 of them)
SITE_RESOURCE_AMOUNT = 0.001

#: CPUs of a client actor in a Tune trial when ``runtime.num_cpus_per_actor`` is not set
TRIAL_DEFAULT_ACTOR_CPUS = 1.0


@dataclass
class ActorPlan:
    """One client actor: its clients, the resources it requests, and its bundle in a placement group."""

    clients: list[int]
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    site: Optional[str] = None
    bundle_index: Optional[int] = None


@dataclass
class Plan:
    """Server and client actors of one federation."""

    actors: list[ActorPlan]
    server_num_cpus: float
    server_bundle_index: Optional[int] = None
    server_num_gpus: float = 0.0

    def server_resources(self) -> dict[str, float]:
        """What the server actor asks Ray for."""
        return {"CPU": self.server_num_cpus, **({"GPU": self.server_num_gpus} if self.server_num_gpus else {})}


def assign_clients(client_ids: Sequence[int], n: int) -> list[list[int]]:
    """Client ``i`` (in id order) goes to group ``i mod n``: balanced and stable."""
    groups: list[list[int]] = [[] for _ in range(n)]
    for i, cid in enumerate(sorted(client_ids)):
        groups[i % n].append(cid)
    return groups


@dataclass
class Workload:
    """What placement balances: the clients each round trains and each client's work per round."""

    schedule: list[list[int]]  # the clients sampled in each round (rayfed.sampling.sampling_schedule)
    cost: Mapping[int, float]  # work per client per round, e.g. local steps (rayfed.sampling.client_cost)


def round_loads(groups: Sequence[Sequence[int]], work: Workload) -> np.ndarray:
    """Work of each group in each round of the schedule, shape ``(rounds, groups)``."""
    owner = {c: g for g, ids in enumerate(groups) for c in ids}
    load = np.zeros((len(work.schedule), len(groups)))
    for r, sampled in enumerate(work.schedule):
        for c in sampled:
            if c in owner:
                load[r, owner[c]] += work.cost.get(c, 1.0)
    return load


def balance_groups(client_ids: Sequence[int], n: int, work: Optional[Workload], seed: int = 0,
                   max_swaps: int = 2_000) -> list[list[int]]:
    """Split clients into ``n`` groups of equal size (±1) whose work is even in every round.

    Clients stay on their actor for the whole run (their data and state live there), and a round
    lasts as long as its busiest actor. With partial participation, pinning clients round-robin
    leaves that to chance: with 10 of 100 clients per round on 2 actors, the busier actor runs 58%
    of a round's clients on average. Sampling is seeded, so the rounds' choices are known up front;
    starting from :func:`assign_clients`, this swaps pairs of clients between groups (sizes never
    change) while the summed per-round maximum of the work does not grow, preferring the busiest
    group of a badly balanced round, until no round is off by more than one client's work or
    ``max_swaps`` swaps were tried. Deterministic for a given seed; memory O(rounds x clients sampled
    per round); milliseconds for hundreds of clients, a fraction of a second at the swap limit.
    """
    groups = assign_clients(client_ids, n)
    if n < 2 or work is None or not work.schedule:
        return groups
    ids = sorted(client_ids)
    pos = {c: i for i, c in enumerate(ids)}
    owner = np.empty(len(ids), dtype=np.int64)
    for g, members in enumerate(groups):
        owner[[pos[c] for c in members]] = g
    w = np.array([float(work.cost.get(c, 1.0)) for c in ids])
    sampled_in = [np.array([pos[c] for c in sampled if c in pos], dtype=np.int64) for sampled in work.schedule]
    rounds_lists: list[list[int]] = [[] for _ in ids]
    for r, here in enumerate(sampled_in):
        for i in here:
            rounds_lists[i].append(r)
    rounds_of = [frozenset(rs) for rs in rounds_lists]
    load = round_loads(groups, work)
    used = np.concatenate(sampled_in) if sampled_in else np.zeros(0, np.int64)
    slack = float(w[used].min()) if used.size else 0.0  # one client's work: the finest balance possible
    rng = np.random.default_rng([seed, 0xBA1A])
    spread = load.max(axis=1) - load.min(axis=1)
    for _ in range(max_swaps):
        bad = np.flatnonzero(spread > slack + 1e-9)
        if bad.size == 0:
            break
        r = int(bad[rng.integers(bad.size)])
        hi, lo = int(load[r].argmax()), int(load[r].argmin())
        here = sampled_in[r]
        cands = here[owner[here] == hi]
        a = int(cands[rng.integers(cands.size)])
        b = int(rng.integers(len(ids)))
        while owner[b] != lo:  # a random client of the lightest group (about n draws)
            b = int(rng.integers(len(ids)))
        ra, rb = rounds_of[a], rounds_of[b]
        rows = sorted(ra | rb)
        before = load[rows]
        after = before.copy()
        wa, wb = float(w[a]), float(w[b])
        shift = np.array([wa * (x in ra) - wb * (x in rb) for x in rows])
        after[:, hi] -= shift
        after[:, lo] += shift
        if after.max(axis=1).sum() <= before.max(axis=1).sum() + 1e-9:
            load[rows] = after
            spread[rows] = after.max(axis=1) - after.min(axis=1)
            owner[a], owner[b] = lo, hi
    return [sorted(ids[i] for i in np.flatnonzero(owner == g)) for g in range(n)]


def actor_groups(cfg: FederationConfig, client_ids: Sequence[int], unpinned_actors: int,
                 work: Optional[Workload] = None) -> list[ActorPlan]:
    """Client actors and their clients: ``actors_per_site`` per site, then ``unpinned_actors`` for the rest.

    Args:
        cfg: the federation config (``runtime.sites``, ``runtime.actors_per_site``,
            ``runtime.resources_per_actor``, ``runtime.num_gpus_per_actor``).
        client_ids: every client of the federation.
        unpinned_actors: actors for the clients no site lists (ignored when there are none).
        work: the sampling schedule and per-client work; when given, clients are spread over the
            actors so that every round's work is even (:func:`balance_groups`), else round-robin.
    """
    rt = cfg.runtime
    known = set(client_ids)
    pinned: set[int] = set()
    plans: list[ActorPlan] = []
    for site, ids in rt.sites.items():
        missing = sorted(set(ids) - known)
        if missing:
            raise ConfigError(f"config key 'runtime.sites.{site}': clients {missing} do not exist; the data has "
                              f"clients 0..{max(known) if known else -1}")
        pinned.update(ids)
        for g in balance_groups(ids, min(rt.actors_per_site, len(ids)), work, cfg.seed):
            plans.append(ActorPlan(g, num_gpus=rt.num_gpus_per_actor,
                                   resources={**rt.resources_per_actor, site: SITE_RESOURCE_AMOUNT}, site=site))
    rest = [c for c in client_ids if c not in pinned]
    if rest:
        for g in balance_groups(rest, max(1, min(unpinned_actors, len(rest))), work, cfg.seed):
            plans.append(ActorPlan(g, num_gpus=rt.num_gpus_per_actor, resources=dict(rt.resources_per_actor)))
    return plans


def _floor2(x: float) -> float:
    return math.floor(100 * x + 1e-9) / 100


def plan_for_cluster(cfg: FederationConfig, client_ids: Sequence[int], cluster_cpus: float,
                     work: Optional[Workload] = None) -> Plan:
    """Actors on a whole cluster (no placement group).

    By default one client actor per cluster CPU (at most one per client; site actors count), each
    with an equal share of the CPUs the server leaves; ``runtime.num_actors`` and
    ``runtime.num_cpus_per_actor`` override.
    """
    rt = cfg.runtime
    n_sites = sum(min(rt.actors_per_site, len(ids)) for ids in rt.sites.values())
    unpinned = rt.num_actors or max(1, min(len(client_ids), int(cluster_cpus)) - n_sites)
    plans = actor_groups(cfg, client_ids, unpinned, work)
    cpus = rt.num_cpus_per_actor
    if cpus is None:
        cpus = max(0.01, _floor2((cluster_cpus - rt.server_num_cpus) / len(plans)))
    for p in plans:
        p.num_cpus = cpus
    return Plan(plans, rt.server_num_cpus, server_num_gpus=rt.server_num_gpus)


def trial_bundles(cfg: FederationConfig, client_ids: Sequence[int], driver_cpus: float = 0.5) -> list[dict]:
    """The bundles a Tune trial reserves for this federation: driver, server, one per client actor.

    Bundle 0 hosts the trial itself (the process driving the rounds). Client actors default to
    ``runtime.num_actors`` (or 1, plus one per site) with ``runtime.num_cpus_per_actor`` CPUs (or
    :data:`TRIAL_DEFAULT_ACTOR_CPUS`).
    """
    rt = cfg.runtime
    if driver_cpus <= 0:
        raise ConfigError(f"driver_cpus: expected CPUs > 0 for the trial's own process, got {driver_cpus!r}")
    bundles: list[dict] = [{"CPU": float(driver_cpus)}]
    if rt.server_num_cpus > 0 or rt.server_num_gpus > 0:
        bundles.append({"CPU": float(rt.server_num_cpus), **({"GPU": float(rt.server_num_gpus)}
                                                              if rt.server_num_gpus else {})})
    cpus = rt.num_cpus_per_actor or TRIAL_DEFAULT_ACTOR_CPUS
    for p in actor_groups(cfg, client_ids, rt.num_actors or 1):
        b: dict[str, float] = {"CPU": float(cpus), **p.resources}
        if p.num_gpus:
            b["GPU"] = float(p.num_gpus)
        bundles.append(b)
    return bundles


def _fits(bundle: Mapping[str, float], demand: Mapping[str, float], count: int) -> bool:
    return all(bundle.get(k, 0.0) + 1e-9 >= v * count for k, v in demand.items() if v > 0)


def plan_for_bundles(cfg: FederationConfig, client_ids: Sequence[int], bundles: Sequence[Mapping[str, float]],
                     first_is_taken: bool = False, work: Optional[Workload] = None) -> Plan:
    """Fit the server and the client actors into a placement group's bundles.

    Args:
        cfg: the federation config.
        client_ids: every client of the federation.
        bundles: the placement group's bundle specs (``pg.bundle_specs``).
        first_is_taken: bundle 0 hosts the calling process (a Tune trial), so nothing else goes there
            unless it is the only bundle.
        work: the sampling schedule and per-client work, to spread each round's clients evenly over
            the client actors (:func:`balance_groups`).

    Raises:
        ConfigError: when the actors cannot fit (naming the bundles and the runtime keys to change).
    """
    rt = cfg.runtime
    usable = list(range(1 if first_is_taken and len(bundles) > 1 else 0, len(bundles)))
    if first_is_taken and len(bundles) == 1:
        raise ConfigError(f"the placement group has one bundle {dict(bundles[0])}, which the trial itself uses; "
                          "reserve bundles for the server and client actors, e.g. with "
                          "rayfed.tune.trial_resources(config)")
    free = {i: dict(bundles[i]) for i in usable}
    # server: the smallest bundle with enough CPUs (a bundle sized for it, when there is one)
    fit = [i for i in usable if free[i].get("CPU", 0.0) + 1e-9 >= rt.server_num_cpus
           and free[i].get("GPU", 0.0) + 1e-9 >= rt.server_num_gpus]
    if not fit:
        raise ConfigError(f"runtime.server_num_cpus={rt.server_num_cpus} with runtime.server_num_gpus="
                          f"{rt.server_num_gpus} fits no bundle of the placement group {[dict(b) for b in bundles]}; "
                          "lower them or reserve a bundle for the server (rayfed.tune.trial_resources)")
    server_idx = min(fit, key=lambda i: (free[i].get("GPU", 0.0), free[i].get("CPU", 0.0), i))
    free[server_idx]["CPU"] = free[server_idx].get("CPU", 0.0) - rt.server_num_cpus
    if rt.server_num_gpus:
        free[server_idx]["GPU"] = free[server_idx].get("GPU", 0.0) - rt.server_num_gpus
    cpu_bundles = [i for i in usable if free[i].get("CPU", 0.0) > 1e-9]
    site_names = set(rt.sites)
    plain = [i for i in cpu_bundles if not site_names & set(free[i])]
    unpinned = rt.num_actors or max(1, len(plain) or len(cpu_bundles))
    plans = actor_groups(cfg, client_ids, unpinned, work)

    # assign each actor to a bundle holding its resources, spreading actors over bundles
    count = {i: 0 for i in usable}
    for p in plans:
        demand = {**p.resources, **({"GPU": p.num_gpus} if p.num_gpus else {})}
        if rt.num_cpus_per_actor is not None:
            demand["CPU"] = rt.num_cpus_per_actor
        cands = [i for i in usable if _fits(free[i], demand, count[i] + 1)
                 and (free[i].get("CPU", 0.0) > 1e-9 or rt.num_cpus_per_actor is not None)]
        if p.site is None:  # keep site bundles for site actors when others fit
            cands = [i for i in cands if not site_names & set(free[i])] or cands
        if not cands:
            raise ConfigError(f"a client actor requesting {demand or {'CPU': 'a share'}} fits no bundle of the "
                              f"placement group {[dict(b) for b in bundles]} (bundle 0 is the trial's own: "
                              f"{first_is_taken}); lower runtime.num_actors / runtime.num_cpus_per_actor or "
                              "reserve matching bundles (rayfed.tune.trial_resources)")
        best = min(cands, key=lambda i: (count[i], i))
        p.bundle_index = best
        count[best] += 1
    for p in plans:
        b = p.bundle_index
        assert b is not None
        if rt.num_cpus_per_actor is not None:
            p.num_cpus = rt.num_cpus_per_actor
        else:
            p.num_cpus = max(0.01, _floor2(free[b].get("CPU", 0.0) / count[b]))
            if p.num_cpus * count[b] > free[b].get("CPU", 0.0) + 1e-9:
                raise ConfigError(f"bundle {b} of the placement group has {free[b].get('CPU', 0.0)} CPUs left for "
                                  f"{count[b]} client actors; set runtime.num_actors lower")
    return Plan(plans, rt.server_num_cpus, server_idx, rt.server_num_gpus)
