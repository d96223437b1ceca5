"""The lab commands the fault campaign uses (each kills or starts one recorded PID, and
`lab down` still removes everything), and the checker's real-host sampling: a domain
running on two namespaced hosts is flagged, through libvirtd and without it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hvplace.lab import daemons, hosts
from hvplace.lab.checker import Checker, Sample
from hvplace.lab.control import Lab, LabError
from hvplace.lab.processes import is_alive, pid_alive
from hvplace.lab.state import LabSettings
from support.labs import assert_nothing_left
from support.wait import eventually_blocking


def test_agent_and_coordinator_commands_on_a_test_lab(settings: LabSettings) -> None:
    lab = Lab(settings)
    try:
        state = lab.up(2, "test", lease_ttl=2.0)
        agent = state.hosts["h1"].agent
        assert agent is not None
        assert lab.kill_agent("h1") == agent.pid
        assert not pid_alive(agent.pid)
        with pytest.raises(LabError, match="no agent running"):
            lab.kill_agent("h1")
        eventually_blocking(
            within=30.0,
            what="h1 deregistered",
            check=lambda: "h1" not in daemons.registered_hosts(lab.state()),
        )
        new = lab.start_agent("h1")
        assert new != agent.pid and is_alive(lab.state().hosts["h1"].agent)
        eventually_blocking(
            within=30.0,
            what="h1 registered",
            check=lambda: "h1" in daemons.registered_hosts(lab.state()),
        )
        with pytest.raises(LabError, match="running"):
            lab.start_agent("h1")
        with pytest.raises(LabError, match="test:/// host"):
            lab.kill_libvirtd("h1")

        before = [c.process for c in lab.state().coordinators]
        assert sorted(lab.kill_coordinators()) == ["c1", "c2"]
        assert not any(is_alive(p) for p in before)
        lab.start_coordinator("c2")
        eventually_blocking(
            within=30.0, what="c2 leads", check=lambda: daemons.leader_name(lab.state()) == "c2"
        )
        with pytest.raises(LabError, match="is running"):
            lab.start_coordinator("c2")
        lab.start_coordinator("c1")
        c1 = lab.state().coordinators[0]
        assert c1.name == "c1" and is_alive(c1.process)
        assert c1.api_address == state.coordinators[0].api_address  # same config and port
        final = lab.state()
    finally:
        assert lab.down() == []
    assert_nothing_left(lab, final)


DOMAIN = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
</domain>
"""


def duplicate_seen(checker: Checker, after: float, name: str) -> Sample | None:
    for sample in checker.since(after):
        if sorted(sample.where().get(f"?{name}", [])) == ["h1", "h2"]:
            return sample
    return None


@pytest.mark.usefixtures("as_root")
def test_the_checker_sees_a_domain_on_two_real_hosts(real_lab: Lab, tmp_path: Path) -> None:
    """Started by hand on both hosts (no hvplace involved): flagged from libvirt, and
    still flagged from the QEMU processes while one host's libvirtd is dead."""
    state = real_lab.state()
    name = "hv-chaos.twice-00000000"
    xml = tmp_path / "twice.xml"
    xml.write_text(DOMAIN.format(name=name))
    # No etcd: the checker still samples where domains run (names it cannot map show as ?name).
    checker = Checker("http://127.0.0.1:9", real_lab.state)
    try:
        for host in state.hosts.values():
            out = hosts.virsh(host, "create", str(xml))
            assert out.returncode == 0, out.stderr
        with checker:
            started = time.time()
            eventually_blocking(
                within=30.0,
                what="the duplicate sampled",
                check=lambda: duplicate_seen(checker, started, name),
            )
            assert checker.findings.count("duplicate") == 1
            assert checker.findings.episodes[0].subject == f"?{name}"

            real_lab.kill_libvirtd("h1")
            killed = time.time()
            eventually_blocking(
                within=30.0,
                what="a sample without h1's libvirtd",
                check=lambda: any("h1" in s.unreachable for s in checker.since(killed)),
            )
            blind = [s for s in checker.since(killed) if "h1" in s.unreachable]
            assert duplicate_seen(checker, blind[0].at, name) is not None  # QEMU still seen
            restarting = time.time()
            real_lab.start_libvirtd("h1")
            assert is_alive(real_lab.state().hosts["h1"].libvirtd)
            back = time.time()
            eventually_blocking(
                within=30.0,
                what="h1's libvirtd answering the checker",
                check=lambda: any(not s.unreachable for s in checker.since(back)),
            )
            # The restarted libvirtd found the running guest again.
            listed = hosts.virsh(real_lab.state().hosts["h1"], "list", "--name").stdout
            assert name in listed
            for host in real_lab.state().hosts.values():
                assert hosts.virsh(host, "destroy", name).returncode == 0
            gone = time.time()
            eventually_blocking(
                within=30.0,
                what="the domains gone",
                check=lambda: any(not s.where() for s in checker.since(gone)),
            )
        # One episode from before the kill through every sample taken blind (libvirtd
        # dead: the QEMU processes alone showed the guest). A session reconnecting to
        # the restarted libvirtd may split what follows; that is not what this checks.
        first = checker.findings.episodes[0]
        blind = [
            s for s in checker.samples if "h1" in s.unreachable and killed <= s.at < restarting
        ]
        assert blind and first.first_at < killed and first.last_at >= blind[-1].at
        gaps = [b.at - a.at for a, b in zip(checker.samples, checker.samples[1:], strict=False)]
        assert max(gaps) < 1.5
    finally:
        for host in real_lab.state().hosts.values():
            if is_alive(host.libvirtd):
                hosts.virsh(host, "destroy", name)
