"""Actor planning: whole cluster, Tune trial bundles, site pinning (pure functions, no Ray)."""

from __future__ import annotations

import pytest
from conftest import small_config

from rayfed.errors import ConfigError
from rayfed.runtime.placement import (
    SITE_RESOURCE_AMOUNT,
    plan_for_bundles,
    plan_for_cluster,
    trial_bundles,
)

IDS = list(range(6))


def _fits_exactly(plan, bundles, first_is_taken=True):
    """Every actor inside one bundle, no bundle over-subscribed, bundle 0 left to the trial."""
    used = {i: {} for i in range(len(bundles))}

    def take(i, demand):
        for k, v in demand.items():
            used[i][k] = used[i].get(k, 0.0) + v

    take(plan.server_bundle_index, plan.server_resources())
    for a in plan.actors:
        take(a.bundle_index, {"CPU": a.num_cpus, **a.resources, **({"GPU": a.num_gpus} if a.num_gpus else {})})
    for i, u in used.items():
        for k, v in u.items():
            assert v <= bundles[i].get(k, 0.0) + 1e-9, (i, k, v, bundles[i])
    if first_is_taken:
        assert not used[0]


def test_trial_bundles_are_filled_exactly_by_the_executor_plan():
    cfg = small_config(runtime__executor="ray", runtime__num_actors=2, runtime__num_cpus_per_actor=0.5)
    bundles = trial_bundles(cfg, IDS, driver_cpus=0.4)
    assert bundles == [{"CPU": 0.4}, {"CPU": 0.1}, {"CPU": 0.5}, {"CPU": 0.5}]
    plan = plan_for_bundles(cfg, IDS, bundles, first_is_taken=True)
    assert plan.server_bundle_index == 1
    assert sorted(a.bundle_index for a in plan.actors) == [2, 3]
    assert sorted(c for a in plan.actors for c in a.clients) == IDS
    _fits_exactly(plan, bundles)


def test_a_gpu_server_gets_a_gpu_bundle_and_the_clients_keep_theirs():
    cfg = small_config(runtime__executor="ray", runtime__num_actors=2, runtime__num_cpus_per_actor=0.5,
                       runtime__server_num_gpus=0.5, runtime__num_gpus_per_actor=0.25)
    bundles = trial_bundles(cfg, IDS, driver_cpus=0.4)
    assert bundles == [{"CPU": 0.4}, {"CPU": 0.1, "GPU": 0.5}, {"CPU": 0.5, "GPU": 0.25}, {"CPU": 0.5, "GPU": 0.25}]
    plan = plan_for_bundles(cfg, IDS, bundles, first_is_taken=True)
    assert plan.server_bundle_index == 1 and plan.server_resources() == {"CPU": 0.1, "GPU": 0.5}
    _fits_exactly(plan, bundles)
    # no bundle holds the server's GPU: the error names both server keys
    with pytest.raises(ConfigError, match="runtime.server_num_gpus=0.5 fits no bundle"):
        plan_for_bundles(cfg, IDS, [{"CPU": 0.4}, {"CPU": 1.0}, {"CPU": 1.0}], first_is_taken=True)


def test_bundles_without_explicit_sizes_split_each_bundle_between_its_actors():
    cfg = small_config(runtime__executor="ray", runtime__num_actors=4)
    bundles = [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 2.0}]
    plan = plan_for_bundles(cfg, IDS, bundles, first_is_taken=True)
    assert len(plan.actors) == 4
    _fits_exactly(plan, bundles)
    # a driver-owned group (not the trial's own): bundle 0 is usable
    plan = plan_for_bundles(cfg, IDS, [{"CPU": 2.0}], first_is_taken=False)
    assert {a.bundle_index for a in plan.actors} == {0} and plan.server_bundle_index == 0
    _fits_exactly(plan, [{"CPU": 2.0}], first_is_taken=False)


def test_actors_that_cannot_fit_are_a_config_error():
    cfg = small_config(runtime__executor="ray", runtime__num_actors=2, runtime__num_cpus_per_actor=1.0)
    with pytest.raises(ConfigError, match="runtime.num_actors"):
        plan_for_bundles(cfg, IDS, [{"CPU": 0.5}, {"CPU": 0.1}, {"CPU": 0.5}], first_is_taken=True)
    with pytest.raises(ConfigError, match="which the trial itself uses"):
        plan_for_bundles(cfg, IDS, [{"CPU": 4.0}], first_is_taken=True)
    big_server = small_config(runtime__executor="ray", runtime__server_num_cpus=2.0)
    with pytest.raises(ConfigError, match="runtime.server_num_cpus"):
        plan_for_bundles(big_server, IDS, [{"CPU": 0.5}, {"CPU": 1.0}], first_is_taken=True)


def test_sites_pin_clients_and_request_the_site_resource():
    cfg = small_config(runtime__executor="ray", runtime__sites="{site_a: [0, 1, 2], site_b: [3, 4]}",
                       runtime__num_cpus_per_actor=0.5)
    plan = plan_for_cluster(cfg, IDS, cluster_cpus=3)
    by_site = {a.site: a for a in plan.actors}
    assert by_site["site_a"].clients == [0, 1, 2] and by_site["site_b"].clients == [3, 4]
    assert by_site["site_a"].resources == {"site_a": SITE_RESOURCE_AMOUNT}
    assert by_site[None].clients == [5] and by_site[None].resources == {}  # unlisted client: unpinned actor
    # two actors per site split the site's clients; trial bundles carry the site resources
    two = small_config(runtime__executor="ray", runtime__sites="{site_a: [0, 1, 2], site_b: [3, 4, 5]}",
                       runtime__actors_per_site=2)
    plan = plan_for_cluster(two, IDS, cluster_cpus=4)
    assert [(a.site, a.clients) for a in plan.actors] == [
        ("site_a", [0, 2]), ("site_a", [1]), ("site_b", [3, 5]), ("site_b", [4])]
    bundles = trial_bundles(two, IDS)
    assert sum(1 for b in bundles if "site_b" in b) == 2
    fitted = plan_for_bundles(two, IDS, bundles, first_is_taken=True)
    for a in fitted.actors:
        assert a.site in bundles[a.bundle_index]
    _fits_exactly(fitted, bundles)


def test_sites_config_is_validated():
    with pytest.raises(ConfigError, match="already pinned"):
        small_config(runtime__sites="{a: [0, 1], b: [1]}")
    with pytest.raises(ConfigError, match=r"runtime.sites.a.*data.num_clients=6"):
        small_config(runtime__sites="{a: [0, 9]}")
    with pytest.raises(ConfigError, match="runtime.actors_per_site"):
        small_config(runtime__actors_per_site=0)
    with pytest.raises(ConfigError, match="not CPU"):
        small_config(runtime__sites="{CPU: [0]}")


def test_default_cluster_plan_matches_the_old_rule():
    cfg = small_config(runtime__executor="ray")
    plan = plan_for_cluster(cfg, IDS, cluster_cpus=4)
    assert len(plan.actors) == 4 and plan.actors[0].num_cpus == pytest.approx(0.97)
    assert sorted(c for a in plan.actors for c in a.clients) == IDS
