"""The lab's settings, state file and generated configs: pure, no root needed."""

from __future__ import annotations

import ipaddress
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hvplace.lab import daemons
from hvplace.lab.processes import ProcessRecord
from hvplace.lab.state import EtcdMemberRecord, HostRecord, LabSettings, LabState, load_state


def test_names_fit_interface_limits() -> None:
    settings = LabSettings(
        Path("/x"), prefix="hvt1234", subnet=ipaddress.IPv4Network("10.213.7.0/24")
    )
    assert settings.bridge == "hvt1234-br0"
    assert len(settings.veth_root(40)) <= 15 and len(settings.veth_peer(40)) <= 15
    assert str(settings.bridge_address) == "10.213.7.1/24"
    assert str(settings.host_address(2)) == "10.213.7.12/24"


@pytest.mark.parametrize("prefix", ["", "9lab", "hv-lab", "muchtoolong", "HV"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError):
        LabSettings(Path("/x"), prefix=prefix)


def test_state_round_trips_through_its_file(tmp_path: Path) -> None:
    settings = LabSettings(tmp_path / "lab")
    proc = ProcessRecord("libvirtd", 42, 1234, "/l")
    state = LabState(
        prefix="hvlab", subnet="10.213.0.0/24", mode="real", lease_ttl=3.0, bridge="hvlab-br0"
    )
    state.hosts["h1"] = HostRecord(
        name="h1",
        index=1,
        mode="real",
        dir="/d",
        libvirt_uri="qemu:///system",
        netns_inode=7,
        libvirtd=proc,
    )
    state.save(settings)
    loaded = load_state(settings)
    assert loaded is not None
    assert loaded.to_json() == state.to_json()
    assert loaded.hosts["h1"].libvirtd == proc


def test_agent_in_a_netns_uses_the_bridge_address_of_etcd() -> None:
    state = LabState(prefix="hvlab", subnet="10.213.0.0/24", mode="real", lease_ttl=4.0)
    state.etcd_members = [
        EtcdMemberRecord(
            name=f"etcd{i}",
            dir="/d",
            client_urls=[f"http://10.213.0.1:{port}", f"http://127.0.0.1:{port}"],
            peer_url="http://127.0.0.1:1",
        )
        for i, port in ((1, 2379), (2, 2479))
    ]
    host = HostRecord(name="h1", index=1, mode="real", dir="/d", libvirt_uri="qemu:///system")
    config = daemons.agent_config(state, host)
    assert 'etcd_endpoints = ["http://10.213.0.1:2379", "http://10.213.0.1:2479"]' in config
    coordinator = daemons.coordinator_config(state, "c1", "127.0.0.1:1", "127.0.0.1:2")
    assert 'etcd_endpoints = ["http://127.0.0.1:2379", "http://127.0.0.1:2479"]' in coordinator
    assert "lease_ttl = 4.0" in config


def test_test_node_is_valid_xml() -> None:
    node = ET.fromstring(daemons.test_node_xml("h1", cpus=8, memory_mib=1024))
    assert node.findtext("cpu/active") == "8"
    assert node.findtext("memory") == str(1024 * 1024)


def test_a_state_file_from_before_several_etcd_members_still_names_its_etcd(
    settings: LabSettings,
) -> None:
    """`down` after an upgrade must still find the etcd an older `up` started."""
    old = {
        "prefix": settings.prefix,
        "subnet": str(settings.subnet),
        "mode": "test",
        "etcd": {"role": "etcd", "pid": 4242, "start_time": 1, "log": "/x/etcd.log"},
        "etcd_endpoints": ["http://127.0.0.1:2379"],
        "etcd_peer": "http://127.0.0.1:2380",
    }
    settings.state_dir.mkdir(parents=True)
    settings.state_file.write_text(json.dumps(old))
    state = load_state(settings)
    assert state is not None and state.etcd is not None and state.etcd.pid == 4242
    assert state.etcd_urls(bridge=False) == ["http://127.0.0.1:2379"]
    assert state.etcd_members[0].dir == str(settings.state_dir / "etcd")


def test_a_real_hosts_agent_takes_live_migrations_over_the_lab_network() -> None:
    """Other hosts' libvirtds reach this one's through its socket file (peer to peer); the
    guest's memory goes to its lab address."""
    state = LabState(prefix="hvlab", subnet="10.213.0.0/24", mode="real", lease_ttl=4.0)
    host = HostRecord(
        name="h1",
        index=1,
        mode="real",
        dir="/lab/hosts/h1",
        libvirt_uri="qemu:///system",
        address="10.213.0.11/24",
    )
    config = daemons.agent_config(state, host)
    assert 'address = "10.213.0.11"' in config
    assert (
        'migration_uri = "qemu+unix:///system?socket=/lab/hosts/h1/run/libvirt/libvirt-sock"'
        in config
    )
