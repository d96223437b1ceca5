"""A lab on libvirt's test:/// driver: no root, no namespaces; etcd on loopback."""

from __future__ import annotations

import shlex
import subprocess
import urllib.request

import pytest
from hvplace.lab import cli as lab_cli
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
