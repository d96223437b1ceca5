"""Helpers for tests that run whole labs: checking that `lab down` left nothing."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from hvplace.lab import network
from hvplace.lab.control import Lab
from hvplace.lab.processes import pid_alive, pids_in_namespace
from hvplace.lab.state import LabState

LabFactory = Callable[..., Lab]


def assert_nothing_left(lab: Lab, state: LabState) -> None:
    """After `lab down`: no process, netns, link, mount or file of the lab remains."""
    settings = lab.settings
    pids = [p.pid for h in state.hosts.values() for p in h.processes()]
    pids += [c.process.pid for c in state.coordinators if c.process is not None]
    pids += [p.pid for p in state.etcd_processes()]
    assert not [pid for pid in pids if pid_alive(pid)], "lab processes still running"
    for host in state.hosts.values():
        if host.netns_inode is not None:
            assert pids_in_namespace("net", host.netns_inode) == [], f"{host.name}: QEMU left"
    if os.geteuid() == 0:
        assert not [n for n in network.netns_list() if n.startswith(settings.prefix + "-")]
        assert network.links_with_prefix(settings.prefix + "-") == []
    assert str(settings.state_dir) not in Path("/proc/self/mounts").read_text()
    assert not settings.state_dir.exists()
