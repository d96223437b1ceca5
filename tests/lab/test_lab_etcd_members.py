"""A lab on a 3-member etcd (test:/// hosts): killing the member every daemon uses first
loses no host and moves no VM; `down` removes every member."""

from __future__ import annotations

import time
from pathlib import Path

from hvplace.lab import daemons, observe, workload
from hvplace.lab.control import Lab
from hvplace.lab.state import LabSettings
from hvplace.proto.records import ClusterConfig
from support.labs import assert_nothing_left


def test_killing_one_etcd_member_fences_nothing_and_moves_nothing(
    settings: LabSettings,
) -> None:
    lab = Lab(settings)
    try:
        state = lab.up(3, "test", etcd_members=3)
        assert [m.name for m in state.etcd_members] == ["etcd1", "etcd2", "etcd3"]
        assert len({m.process.pid for m in state.etcd_members if m.process}) == 3
        assert len({m.dir for m in state.etcd_members}) == 3
        rows = [r for r in lab.status() if r.component == "etcd"]
        assert [(r.name, r.alive) for r in rows] == [(f"etcd{i}", True) for i in (1, 2, 3)]
        for host in state.hosts.values():
            assert host.agent_config is not None
            config = Path(host.agent_config).read_text()
            assert str(state.etcd_urls(bridge=False)).replace("'", '"') in config
        workload.hvplace(
            lab, "vm", "create", "web", "--count", "3", *workload.image_args(state)
        )  # fmt: skip
        keys = [f"default/web-{i}" for i in (1, 2, 3)]
        before = observe.wait_for(
            lab.etcd_endpoint(), workload.all_running(keys), 30, "the VMs running"
        )
        placed = {k: (before.host_of(k), before.vm_status[k].epoch) for k in keys}

        # Every daemon was given etcd1 first: it is the member they all use.
        killed = lab.kill_etcd(1)
        assert killed == [state.etcd_members[0].process.pid]  # type: ignore[union-attr]
        budget = ClusterConfig()
        window = budget.lease_ttl_s + budget.failover_delay_s + 2.0
        started = time.monotonic()
        samples = 0
        while time.monotonic() - started < window:
            try:
                now = observe.read_cluster(lab.etcd_endpoint())
            except observe.ObserveError:
                time.sleep(0.1)  # etcd1 led: no member answers until the others elect
                continue
            assert set(now.registered) == set(state.hosts), "a host lost its registration"
            assert not [h for h in state.hosts if now.lost(h)]
            assert {k: (now.host_of(k), now.vm_status[k].epoch) for k in keys} == placed
            assert workload.all_running(keys)(now)
            samples += 1
            time.sleep(0.1)
        assert samples > 20
        for host in state.hosts.values():
            assert host.agent is not None
            assert "FENCING" not in Path(host.agent.log).read_text(), host.name
        # The API answers through the coordinators' other members.
        assert "web-1" in workload.hvplace(lab, "vm", "list")

        lab.restart_etcd(1)
        state = lab.state()
        assert all(daemons.is_alive(m.process) for m in state.etcd_members)
    finally:
        final = lab.state()
        assert lab.down() == []
    assert_nothing_left(lab, final)
