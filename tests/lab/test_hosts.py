"""Namespaced lab hosts as root: independent libvirtds, partition and heal, crash, clean down."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hvplace.lab import daemons, hosts, network, secure
from hvplace.lab.control import Lab
from hvplace.lab.processes import is_alive, pid_alive, pids_in_namespace
from hvplace.lab.state import HostRecord, LabSettings, LabState
from hvplace.proto import keyspace

pytestmark = pytest.mark.libvirtd

# No disk and no kernel: SeaBIOS finds nothing to boot and idles, which is all a test of
# where QEMU runs needs, at 32 MiB.
PROBE_DOMAIN = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def _hosts(lab: Lab) -> tuple[LabState, HostRecord, HostRecord]:
    state = lab.state()
    return state, state.hosts["h1"], state.hosts["h2"]


def _names(host: HostRecord) -> list[str]:
    out = hosts.virsh(host, "list", "--all", "--name")
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.split() if line]


def _ping_bridge(lab: Lab, host: HostRecord, tries: int = 3) -> bool:
    """True when any of `tries` pings is answered: two busy cores must not fail the test."""
    target = str(lab.settings.bridge_address.ip)
    argv = ["busybox", "ping", "-c", str(tries), "-W", "1", target]
    return hosts.run_inside(host, argv).returncode == 0


def test_each_host_has_its_own_namespaces_and_libvirtd(real_lab: Lab, tmp_path: Path) -> None:
    _, h1, h2 = _hosts(real_lab)
    assert h1.supervisor is not None and h2.supervisor is not None
    for kind in ("net", "mnt"):
        ours = os.stat(f"/proc/self/ns/{kind}").st_ino
        ns1 = os.stat(f"/proc/{h1.supervisor.pid}/ns/{kind}").st_ino
        ns2 = os.stat(f"/proc/{h2.supervisor.pid}/ns/{kind}").st_ino
        assert len({ours, ns1, ns2}) == 3, kind
    assert is_alive(h1.libvirtd) and is_alive(h2.libvirtd)
    # Inside, the plain system URI reaches the host's own daemon through its private /run.
    assert _names(h1) == [] and _names(h2) == []
    xml = tmp_path / "probe.xml"
    xml.write_text(PROBE_DOMAIN.format(name="labprobe"))
    defined = hosts.virsh(h1, "define", str(xml))
    assert defined.returncode == 0, defined.stderr
    assert _names(h1) == ["labprobe"]
    assert _names(h2) == []
    # The definition lives in h1's private /etc/libvirt, under the lab's state dir.
    assert (Path(h1.dir) / "etc" / "qemu" / "labprobe.xml").exists()
    assert not (Path(h2.dir) / "etc" / "qemu" / "labprobe.xml").exists()
    assert not Path("/etc/libvirt/qemu/labprobe.xml").exists()


def test_qemu_runs_in_its_host_and_shows_in_status(real_lab: Lab) -> None:
    _, h1, h2 = _hosts(real_lab)
    started = hosts.virsh(h1, "start", "labprobe")
    assert started.returncode == 0, started.stderr
    qemu = hosts.qemu_pids(h1)
    assert len(qemu) == 1
    assert h1.netns_inode is not None and qemu[0] in pids_in_namespace("net", h1.netns_inode)
    assert hosts.qemu_pids(h2) == []
    rows = {(r.component, r.name): r for r in real_lab.status()}
    assert rows[("qemu", "h1")].detail.startswith("1 running")
    assert rows[("qemu", "h2")].detail.startswith("0 running")
    assert rows[("libvirtd", "h2")].alive


def test_partition_cuts_only_that_host_and_heal_restores_it(real_lab: Lab) -> None:
    _, h1, h2 = _hosts(real_lab)
    assert _ping_bridge(real_lab, h1) and _ping_bridge(real_lab, h2)
    real_lab.partition("h1")
    try:
        assert real_lab.state().hosts["h1"].partitioned
        assert not _ping_bridge(real_lab, h1, tries=1)
        assert _ping_bridge(real_lab, h2)
    finally:
        real_lab.heal("h1")
    assert _ping_bridge(real_lab, h1)


def test_kill_host_kills_libvirtd_and_qemu_but_not_the_other_host(real_lab: Lab) -> None:
    _, h1, h2 = _hosts(real_lab)
    qemu = hosts.qemu_pids(h1)
    assert qemu, "the previous test left a running probe domain"
    killed = real_lab.kill_host("h1")
    assert h1.libvirtd is not None and h1.libvirtd.pid in killed
    assert set(qemu) <= set(killed)
    assert not is_alive(h1.libvirtd) and not is_alive(h1.virtlogd)
    assert not any(pid_alive(pid) for pid in qemu)
    assert is_alive(h1.supervisor), "the host's namespaces stay for a restart"
    assert is_alive(h2.libvirtd) and _names(h2) == []
    # Started again, h1's libvirtd still knows its domain, now shut off.
    real_lab.start_host("h1")
    h1 = real_lab.state().hosts["h1"]
    assert is_alive(h1.libvirtd)
    assert _names(h1) == ["labprobe"]
    assert hosts.virsh(h1, "domstate", "labprobe").stdout.strip() == "shut off"


def test_down_leaves_nothing(real_lab: Lab) -> None:
    assert hosts.virsh(real_lab.state().hosts["h1"], "start", "labprobe").returncode == 0
    state, h1, h2 = _hosts(real_lab)
    settings = real_lab.settings
    pids = [p.pid for h in (h1, h2) for p in h.processes()]
    inodes = [h.netns_inode for h in (h1, h2) if h.netns_inode is not None]
    assert real_lab.down() == []
    assert real_lab.down() == [], "down is idempotent"
    assert not [n for n in network.netns_list() if n.startswith(settings.prefix + "-")]
    assert network.links_with_prefix(settings.prefix + "-") == []
    assert not any(pid_alive(pid) for pid in pids)
    assert all(pids_in_namespace("net", inode) == [] for inode in inodes)
    assert str(settings.state_dir) not in Path("/proc/self/mounts").read_text()
    assert not settings.state_dir.exists()
    for target in state.created_dirs:
        assert not Path(target).exists()


@pytest.mark.usefixtures("as_root")
def test_a_failed_up_is_undone(settings: LabSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    lab = Lab(settings)

    def broken(host: HostRecord, timeout: float = 30.0) -> object:
        raise hosts.HostError("injected: libvirtd did not start")

    monkeypatch.setattr(hosts, "start_libvirt", broken)
    supervisors: list[int] = []
    real_start = hosts.start_supervisor

    def recording(host: HostRecord, script: Path, timeout: float = 10.0) -> object:
        record = real_start(host, script, timeout)
        supervisors.append(record.pid)
        return record

    monkeypatch.setattr(hosts, "start_supervisor", recording)
    try:
        with pytest.raises(hosts.HostError, match="injected"):
            lab.up(2, "real", only="hosts")
        assert len(supervisors) == 1
        assert not pid_alive(supervisors[0])
        assert not network.link_exists(settings.bridge)
        assert not network.netns_exists(settings.netns(1))
        assert not settings.state_dir.exists()
    finally:
        lab.down()


def _etcd_health_from(host: HostRecord, state: LabState) -> bool:
    """Every etcd member answers on its bridge URL from inside the host."""
    for endpoint in state.etcd_urls(bridge=True):
        tls = secure.Secrets(state.secrets_dir)
        root = f"root:{tls.root_password.read_text().strip()}"
        argv = ["etcdctl", f"--endpoints={endpoint}", f"--cacert={tls.ca}", f"--user={root}",
                "--dial-timeout=1s", "--command-timeout=2s"]  # fmt: skip
        if hosts.run_inside(host, [*argv, "endpoint", "health"]).returncode != 0:
            return False
    return True


@pytest.mark.usefixtures("as_root")
def test_hosts_reach_etcd_on_the_bridge_and_the_leader_is_the_oldest_key(
    settings: LabSettings,
) -> None:
    lab = Lab(settings)
    try:
        state = lab.up(1, "real", only="etcd", etcd_members=3)
        (h1,) = state.hosts.values()
        bridge_url = f"https://{settings.bridge_address.ip}:"
        assert all(u.startswith(bridge_url) for u in state.etcd_urls(bridge=True))
        assert all(u.startswith("https://127.0.0.1:") for u in state.etcd_urls(bridge=False))
        assert state.etcd_endpoints[0].startswith(bridge_url)
        assert state.etcd_endpoints[-1].startswith("https://127.0.0.1:")
        assert _etcd_health_from(h1, state)
        lab.partition("h1")
        assert not _etcd_health_from(h1, state)
        lab.heal("h1")
        deadline = time.monotonic() + 10  # the link comes back up, then etcdctl reconnects
        while not _etcd_health_from(h1, state):
            assert time.monotonic() < deadline, "etcd unreachable from h1 after heal"
            time.sleep(0.1)
        # etcd's election: the candidate with the lowest create revision leads.
        daemons.etcdctl(state, "put", keyspace.ELECTION + "0b", "c2")
        daemons.etcdctl(state, "put", keyspace.ELECTION + "0a", "c1")
        assert daemons.leader_id(state) == "c2"
    finally:
        lab.down()
    assert not settings.state_dir.exists()


@pytest.mark.usefixtures("as_root")
def test_down_without_a_state_file_sweeps_the_lab_names(settings: LabSettings) -> None:
    """A lost state file (a crashed `up`) must not strand netns and links with our prefix."""
    network.create_bridge(settings.bridge, settings.bridge_address)
    network.ip("netns", "add", settings.netns(9))
    try:
        assert Lab(settings).down() == []
        assert not network.link_exists(settings.bridge)
        assert not network.netns_exists(settings.netns(9))
    finally:
        network.delete_link(settings.bridge)
        network.delete_netns(settings.netns(9))
