"""A lab on libvirt's test:/// driver: no root, no namespaces; etcd on loopback."""

from __future__ import annotations

from hvplace.lab import observe, workload
from hvplace.lab.control import Lab
from hvplace.lab.state import LabSettings


def test_a_test_lab_needs_no_namespaces(settings: LabSettings) -> None:
    lab = Lab(settings)
    try:
        state = lab.up(2, "test", only="etcd")
        assert [h.libvirt_uri for h in state.hosts.values()] == [
            f"test://{settings.host_dir(name)}/node.xml" for name in ("h1", "h2")
        ]
        assert all(h.netns is None and h.supervisor is None for h in state.hosts.values())
        assert state.bridge is None
        assert len(state.etcd_endpoints) == 1
        assert state.etcd_endpoints[0].startswith("http://127.0.0.1:")
        rows = lab.status()
        assert [(r.component, r.name, r.alive) for r in rows] == [
            ("etcd", "etcd", True),
            ("host", "h1", None),
            ("host", "h2", None),
        ]
        assert rows[1].detail == "test NOT registered"
    finally:
        lab.down()
    assert not settings.state_dir.exists()


def test_a_test_lab_fails_over_a_killed_host(settings: LabSettings) -> None:
    """The whole stack on test:/// hosts (no root): agents, two coordinators, etcd; a
    killed host's VMs are re-placed with the rules kept, and `down` removes it all."""
    lab = Lab(settings)
    try:
        lab.up(3, "test", lease_ttl=2.0)
        workload.hvplace(
            lab, "rule", "create", "apart", "--kind", "anti-affinity", "--selector", "app=web"
        )
        workload.hvplace(
            lab, "vm", "create", "web", "--count", "2", "--label", "app=web",
            *workload.image_args(lab.state()),
        )  # fmt: skip
        keys = ["default/web-1", "default/web-2"]
        etcd = lab.etcd_endpoint()
        before = observe.wait_for(etcd, workload.all_running(keys), 30, "both running")
        victim = before.host_of("default/web-1")
        assert victim is not None and before.host_of("default/web-2") != victim
        lab.kill_host(victim)
        after = observe.wait_for(
            etcd,
            lambda s: s.lost(victim) and workload.all_running(keys)(s),
            30,
            "web-1 re-placed",
        )
        hosts = {after.host_of(k) for k in keys}
        assert victim not in hosts and len(hosts) == 2  # moved, and still apart
        assert after.vm_status["default/web-1"].epoch == before.vm_status["default/web-1"].epoch + 1
    finally:
        assert lab.down() == []
    assert not settings.state_dir.exists()
