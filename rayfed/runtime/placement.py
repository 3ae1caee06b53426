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

from rayfed.config import FederationConfig
from rayfed.errors import ConfigError

__all__ = ["SITE_RESOURCE_AMOUNT", "ActorPlan", "Plan", "actor_groups", "plan_for_bundles", "plan_for_cluster",
           "trial_bundles"]

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


def assign_clients(client_ids: Sequence[int], n: int) -> list[list[int]]:
    """Client ``i`` (in id order) goes to group ``i mod n``: balanced and stable."""
    groups: list[list[int]] = [[] for _ in range(n)]
    for i, cid in enumerate(sorted(client_ids)):
        groups[i % n].append(cid)
    return groups


def actor_groups(cfg: FederationConfig, client_ids: Sequence[int], unpinned_actors: int) -> list[ActorPlan]:
    """Client actors and their clients: ``actors_per_site`` per site, then ``unpinned_actors`` for the rest.

    Args:
        cfg: the federation config (``runtime.sites``, ``runtime.actors_per_site``,
            ``runtime.resources_per_actor``, ``runtime.num_gpus_per_actor``).
        client_ids: every client of the federation.
        unpinned_actors: actors for the clients no site lists (ignored when there are none).
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
        for g in assign_clients(ids, min(rt.actors_per_site, len(ids))):
            plans.append(ActorPlan(g, num_gpus=rt.num_gpus_per_actor,
                                   resources={**rt.resources_per_actor, site: SITE_RESOURCE_AMOUNT}, site=site))
    rest = [c for c in client_ids if c not in pinned]
    if rest:
        for g in assign_clients(rest, max(1, min(unpinned_actors, len(rest)))):
            plans.append(ActorPlan(g, num_gpus=rt.num_gpus_per_actor, resources=dict(rt.resources_per_actor)))
    return plans


def _floor2(x: float) -> float:
    return math.floor(100 * x + 1e-9) / 100


def plan_for_cluster(cfg: FederationConfig, client_ids: Sequence[int], cluster_cpus: float) -> Plan:
    """Actors on a whole cluster (no placement group).

    By default one client actor per cluster CPU (at most one per client; site actors count), each
    with an equal share of the CPUs the server leaves; ``runtime.num_actors`` and
    ``runtime.num_cpus_per_actor`` override.
    """
    rt = cfg.runtime
    n_sites = sum(min(rt.actors_per_site, len(ids)) for ids in rt.sites.values())
    unpinned = rt.num_actors or max(1, min(len(client_ids), int(cluster_cpus)) - n_sites)
    plans = actor_groups(cfg, client_ids, unpinned)
    cpus = rt.num_cpus_per_actor
    if cpus is None:
        cpus = max(0.01, _floor2((cluster_cpus - rt.server_num_cpus) / len(plans)))
    for p in plans:
        p.num_cpus = cpus
    return Plan(plans, rt.server_num_cpus)


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
    if rt.server_num_cpus > 0:
        bundles.append({"CPU": float(rt.server_num_cpus)})
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
                     first_is_taken: bool = False) -> Plan:
    """Fit the server and the client actors into a placement group's bundles.

    Args:
        cfg: the federation config.
        client_ids: every client of the federation.
        bundles: the placement group's bundle specs (``pg.bundle_specs``).
        first_is_taken: bundle 0 hosts the calling process (a Tune trial), so nothing else goes there
            unless it is the only bundle.

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
    fit = [i for i in usable if free[i].get("CPU", 0.0) + 1e-9 >= rt.server_num_cpus]
    if not fit:
        raise ConfigError(f"runtime.server_num_cpus={rt.server_num_cpus} fits no bundle of the placement group "
                          f"{[dict(b) for b in bundles]}; lower it or reserve a bundle for the server")
    server_idx = min(fit, key=lambda i: (free[i].get("CPU", 0.0), i))
    free[server_idx]["CPU"] = free[server_idx].get("CPU", 0.0) - rt.server_num_cpus
    cpu_bundles = [i for i in usable if free[i].get("CPU", 0.0) > 1e-9]
    site_names = set(rt.sites)
    plain = [i for i in cpu_bundles if not site_names & set(free[i])]
    unpinned = rt.num_actors or max(1, len(plain) or len(cpu_bundles))
    plans = actor_groups(cfg, client_ids, unpinned)

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
    return Plan(plans, rt.server_num_cpus, server_idx)
