"""A lab on libvirt's test:/// driver: no root, no namespaces; etcd on loopback."""

from __future__ import annotations

import shlex
import subprocess
import urllib.request

import pytest
from hvplace.lab import cli as lab_cli
from hvplace.lab import daemons, observe, workload
from hvplace.lab.control import Lab
from hvplace.lab.processes import is_alive, kill9
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
        assert state.etcd_endpoints[0].startswith("https://127.0.0.1:")
        rows = lab.status()
        assert [(r.component, r.name, r.alive) for r in rows] == [
            ("etcd", "etcd", True),
            ("host", "h1", None),
            ("host", "h2", None),
        ]
        assert rows[1].detail.startswith("test NOT registered virsh -c test://")
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


def test_status_prints_each_hosts_virsh_uri_and_agents_serve_metrics(
    settings: LabSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    """`lab up`/`lab status` name a `virsh -c URI` that works as printed, and agents on
    test:/// hosts serve /metrics (each on its own loopback port, shown in the status)."""
    lab = Lab(settings)
    try:
        lab.up(2, "test")
        state = lab.state()
        rows = {r.name: r for r in lab.status() if r.component == "host"}
        for host in state.hosts.values():
            command = f"virsh -c {shlex.quote(host.root_side_uri)}"
            assert command in rows[host.name].detail
            listed = subprocess.run(
                [*shlex.split(command), "list", "--all"], capture_output=True, text=True
            )
            assert listed.returncode == 0, listed.stderr
            assert host.metrics_address, host.name
            assert f"metrics=http://{host.metrics_address}/metrics" in rows[host.name].detail
            with urllib.request.urlopen(f"http://{host.metrics_address}/metrics", timeout=5) as r:
                assert "hvplace_agent_lease_held 1.0" in r.read().decode()
        assert lab_cli.main(["--state-dir", str(settings.state_dir), "status"]) == 0
        printed = capsys.readouterr().out
        for host in state.hosts.values():
            assert f"virsh -c {shlex.quote(host.root_side_uri)}" in printed
    finally:
        assert lab.down() == []


def test_lab_commands_work_after_eval_lab_env(
    settings: LabSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`eval "$(hvplace lab env)"` exports ETCDCTL_ENDPOINTS; etcdctl refuses it together
    with --endpoints, so the lab's own etcdctl calls must not inherit it."""
    lab = Lab(settings)
    try:
        lab.up(1, "test")
        for key, value in lab.env().items():
            monkeypatch.setenv(key, value)
        rows = lab.status()
        roles = sorted(r.detail.split()[0] for r in rows if r.component == "coordinator")
        assert roles == ["leader", "standby"]
        host = next(r for r in rows if r.component == "host")
        assert " registered" in host.detail and "NOT" not in host.detail
        assert lab.kill_leader() in ("c1", "c2")
    finally:
        assert lab.down() == []


def test_a_returning_host_never_starts_a_vm_failover_left_pending(settings: LabSettings) -> None:
    """Issue 9 case 6 on test:/// hosts: three hosts, an anti-affinity group of three
    (on_failure block), one host killed: its VM goes pending AND unassigned. When the
    host comes back, its agent must not start the VM from the old assignment while the
    API says pending; the VM is placed again (a newer epoch) and the status says so."""
    lab = Lab(settings)
    try:
        lab.up(3, "test", lease_ttl=2.0)
        workload.hvplace(
            lab, "rule", "create", "trio", "--kind", "anti-affinity", "--selector", "app=db",
            "--on-failure", "block",
        )  # fmt: skip
        workload.hvplace(
            lab, "vm", "create", "db", "--count", "3", "--label", "app=db",
            *workload.image_args(lab.state()),
        )  # fmt: skip
        keys = ["default/db-1", "default/db-2", "default/db-3"]
        etcd = lab.etcd_endpoint()
        before = observe.wait_for(etcd, workload.all_running(keys), 30, "all three running")
        victim = before.host_of("default/db-1")
        assert victim is not None
        old_epoch = before.vm_status["default/db-1"].epoch
        lab.kill_host(victim)
        pending = observe.wait_for(
            etcd,
            lambda s: s.vm_status["default/db-1"].phase.value == "pending",
            30,
            "db-1 pending",
        )
        assert pending.assignments.get("default/db-1", []) == []  # taken back
        assert pending.vm_status["default/db-1"].reason
        lab.start_host(victim)

        def truthful(s: observe.ClusterState) -> bool:
            """Never: a domain running from an assignment the coordinator took back."""
            status = s.vm_status["default/db-1"]
            for d in s.domains.get("default/db-1", []):
                if d.state.value == "running":
                    assert d.epoch > old_epoch, f"started from the old assignment: {d}"
                    assert status.phase.value != "pending", f"runs while pending: {d}"
            return status.phase.value != "pending" and s.running_on("default/db-1") == [victim]

        after = observe.wait_for(etcd, truthful, 30, "db-1 placed again on its host")
        assert after.vm_status["default/db-1"].epoch == old_epoch + 1
        assert after.host_of("default/db-1") == victim
    finally:
        assert lab.down() == []
    assert not settings.state_dir.exists()


def test_a_host_dying_while_no_coordinator_runs_is_found_lost(settings: LabSettings) -> None:
    """Issue 9 case 3 on test:/// hosts: both coordinators killed, a host killed, its
    lease expires unseen; a coordinator started afterwards derives `lost` from the
    records and re-places the VMs (they ran `scheduled` on a vanished host forever)."""
    lab = Lab(settings)
    late = None
    try:
        lab.up(3, "test", lease_ttl=2.0)
        workload.hvplace(
            lab, "vm", "create", "web", "--count", "3", *workload.image_args(lab.state()),
        )  # fmt: skip
        keys = ["default/web-1", "default/web-2", "default/web-3"]
        etcd = lab.etcd_endpoint()
        before = observe.wait_for(etcd, workload.all_running(keys), 30, "all running")
        state = lab.state()
        for c in state.coordinators:
            assert kill9(c.process)
        victim = before.host_of("default/web-1")
        assert victim is not None
        moving = [k for k in keys if before.host_of(k) == victim]
        lab.kill_host(victim)
        observe.wait_for(etcd, lambda s: victim not in s.registered, 30, f"{victim}'s lease gone")
        late = daemons.start_coordinator(settings, lab.state(), "late")
        after = observe.wait_for(
            etcd,
            lambda s: s.lost(victim) and workload.all_running(keys)(s),
            60,
            "the VMs of the dead host re-placed by the late coordinator",
        )
        assert all(after.host_of(k) not in (None, victim) for k in moving)
    finally:
        assert lab.down() == []
        # `lab down` stopped the coordinator started here too (it was left running).
        assert late is None or not is_alive(late.process)
    assert not settings.state_dir.exists()
