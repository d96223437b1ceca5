"""Fencing without a live agent (SPEC §4): kill -9 of the agent alone, on a real lab host
whose libvirtd and QEMU guests live on. The host's watchdog (the lab's stand-in) must end
its guests before the coordinator re-places them; an agent restarted inside the window
adopts them instead. A sampler reads every host's libvirtd every 100 ms from outside."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hvplace.lab import hosts, observe, workload
from hvplace.lab.control import Lab
from hvplace.lab.daemons import cluster_budget
from hvplace.lab.observe import ClusterState
from hvplace.lab.processes import is_alive, kill9, wait_gone
from support.labs import LabFactory
from support.sampler import LibvirtSampler

pytestmark = pytest.mark.e2e

SCOPE = "wd"
BOOT_SLACK_S = 20.0


def start(make_lab: LabFactory, ttl: float | None) -> tuple[Lab, list[str], ClusterState, str]:
    """Two real hosts, two guests; returns the host holding the most of them."""
    lab = make_lab(2, "real", ttl)
    size = ["--vcpus", "1", "--memory", str(workload.MEMORY_MIB)]
    workload.hvplace(
        lab, "vm", "create", "--scope", SCOPE, "g1", "g2", *size, *workload.image_args(lab.state())
    )
    keys = [f"{SCOPE}/g1", f"{SCOPE}/g2"]
    before = observe.wait_for(
        lab.etcd_endpoint(), workload.all_running(keys), 120, "the guests running"
    )
    on: dict[str, int] = {}
    for key in keys:
        host = before.host_of(key)
        assert host is not None
        on[host] = on.get(host, 0) + 1
    return lab, keys, before, max(sorted(on), key=lambda h: on[h])


def sampler_for(lab: Lab, keys: list[str]) -> LibvirtSampler:
    sampler = LibvirtSampler({h.name: h.root_side_uri for h in lab.state().hosts.values()}, keys)
    sampler.start()
    time.sleep(0.5)
    assert sampler.samples and not sampler.samples[-1].unreachable
    return sampler


def test_kill_9_of_the_agent_alone_never_runs_a_vm_twice(make_lab: LabFactory) -> None:
    lab, keys, before, victim = start(make_lab, ttl=None)
    moving = [k for k in keys if before.host_of(k) == victim]
    host = lab.state().hosts[victim]
    qemus = hosts.qemu_pids(host)
    assert len(qemus) == len(moving)
    sampler = sampler_for(lab, keys)
    budget = cluster_budget(lab.state().lease_ttl)
    killed_at = time.time()
    assert host.agent is not None and kill9(host.agent)
    wait_gone([host.agent.pid])
    etcd = lab.etcd_endpoint()

    def moved(s: ClusterState) -> bool:
        return all(
            (h := s.host_of(k)) not in (None, victim) and s.running_on(k) == [h] for k in moving
        )

    limit = budget.lease_ttl_s + budget.failover_delay_s + BOOT_SLACK_S
    end = observe.wait_for(etcd, moved, limit, "the guests running elsewhere")
    while sampler.first_all_running(moving, killed_at, victim) is None:
        assert time.time() - killed_at < limit, "libvirt never showed them running elsewhere"
        time.sleep(0.1)
    time.sleep(1.0)
    sampler.stop()
    assert sampler.max_gap() < 1.0, "the sampler fell behind; its samples prove little"
    assert sampler.duplicates() == []
    # The host's guests are gone (the watchdog "reset" it), and they were gone before
    # the first copy ran elsewhere.
    assert wait_gone(qemus, 5.0) == []
    for key in moving:
        on_victim = [s.at for s in sampler.samples if key in s.running.get(victim, ())]
        elsewhere = [
            s.at
            for s in sampler.samples
            if s.at > killed_at and any(h != victim for h in sampler.where(s).get(key, ()))
        ]
        assert on_victim and elsewhere
        assert max(on_victim) < min(elsewhere), f"{key} ran twice"
        assert max(on_victim) - killed_at < budget.fence_after_s + budget.watchdog_s
    assert end.lost(victim)
    watchdog = lab.state().hosts[victim].watchdog
    assert watchdog is not None and is_alive(watchdog)
    assert "FIRED" in Path(watchdog.log).read_text()


def test_agent_restarted_inside_the_window_adopts_its_guests(make_lab: LabFactory) -> None:
    """A 20 s lease leaves an 8 s watchdog: room for a Python agent to come back on a
    loaded 2-core machine (one that came back later would rightly find its host reset)."""
    lab, keys, before, victim = start(make_lab, ttl=20.0)
    host = lab.state().hosts[victim]
    qemus = hosts.qemu_pids(host)
    staying = [k for k in keys if before.host_of(k) == victim]
    sampler = sampler_for(lab, keys)
    budget = cluster_budget(lab.state().lease_ttl)
    assert host.agent is not None and kill9(host.agent)
    wait_gone([host.agent.pid])
    lab.start_host(victim)
    restarted = lab.state().hosts[victim]
    etcd = lab.etcd_endpoint()
    # Past the watchdog's window and a whole lease: the same QEMU processes run on.
    time.sleep(budget.lease_ttl_s + budget.failover_delay_s + 1.0)
    end = observe.wait_for(etcd, workload.all_running(keys), 30, "the guests running")
    sampler.stop()
    assert hosts.qemu_pids(restarted) == qemus
    assert is_alive(restarted.agent) and is_alive(restarted.libvirtd)
    assert not end.lost(victim)
    assert all(end.host_of(k) == victim for k in staying)
    assert sampler.duplicates() == []
    assert all(set(staying) <= s.running.get(victim, frozenset()) for s in sampler.samples)
    assert restarted.watchdog is not None
    log = Path(restarted.watchdog.log).read_text()
    assert "FIRED" not in log and "still armed" in log
