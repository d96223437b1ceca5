"""End-to-end fixtures: a whole lab (etcd, two coordinators, agents, hosts) per test, with
real QEMU guests on namespaced libvirtds, or test:/// hosts for the 200-VM test. Every
lab is torn down after its test, and the teardown is checked: nothing may be left."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hvplace.lab import network
from hvplace.lab.control import Lab, scratch_settings
from hvplace.lab.processes import pid_alive, pids_in_namespace
from hvplace.lab.state import LabState

LabFactory = Callable[..., Lab]


def assert_nothing_left(lab: Lab, state: LabState) -> None:
    """After `lab down`: no process, netns, link, mount or file of the lab remains."""
    settings = lab.settings
    pids = [p.pid for h in state.hosts.values() for p in h.processes()]
    pids += [c.process.pid for c in state.coordinators if c.process is not None]
    pids += [state.etcd.pid] if state.etcd is not None else []
    assert not [pid for pid in pids if pid_alive(pid)], "lab processes still running"
    for host in state.hosts.values():
        if host.netns_inode is not None:
            assert pids_in_namespace("net", host.netns_inode) == [], f"{host.name}: QEMU left"
    if os.geteuid() == 0:
        assert not [n for n in network.netns_list() if n.startswith(settings.prefix + "-")]
        assert network.links_with_prefix(settings.prefix + "-") == []
    assert str(settings.state_dir) not in Path("/proc/self/mounts").read_text()
    assert not settings.state_dir.exists()


@pytest.fixture
def make_lab(tmp_path: Path) -> Iterator[LabFactory]:
    """`make_lab(hosts, mode, ttl)` starts a lab; it is removed (and checked) after the test."""
    labs: list[tuple[Lab, LabState]] = []

    def make(hosts: int, mode: str = "real", ttl: float | None = None) -> Lab:
        if mode == "real" and os.geteuid() != 0:
            pytest.fail(
                "end-to-end tests with real QEMU need root: sudo bash .ci/run -m e2e",
                pytrace=False,
            )
        lab = Lab(scratch_settings(tmp_path / f"lab{len(labs)}", prefix="hve"))
        lab.up(hosts, mode, ttl)
        labs.append((lab, lab.state()))
        return lab

    yield make
    for lab, _ in labs:
        final = lab.state() if lab.settings.state_file.exists() else None
        assert lab.down() == []
        if final is not None:
            assert_nothing_left(lab, final)
