"""End-to-end fixtures: a whole lab (etcd, two coordinators, agents, hosts) per test, with
real QEMU guests on namespaced libvirtds, or test:/// hosts for the 200-VM test. Every
lab is torn down after its test, and the teardown is checked: nothing may be left."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hvplace.lab.control import Lab, scratch_settings
from hvplace.lab.state import LabState
from support.labs import LabFactory, assert_nothing_left


@pytest.fixture
def make_lab(tmp_path: Path) -> Iterator[LabFactory]:
    """`make_lab(hosts, mode, ttl, etcd_members)` starts a lab; it is removed (and checked) after the test."""
    labs: list[tuple[Lab, LabState]] = []

    def make(
        hosts: int, mode: str = "real", ttl: float | None = None, etcd_members: int = 1
    ) -> Lab:
        if mode == "real" and os.geteuid() != 0:
            pytest.fail(
                "end-to-end tests with real QEMU need root: sudo bash .ci/run -m e2e",
                pytrace=False,
            )
        lab = Lab(scratch_settings(tmp_path / f"lab{len(labs)}", prefix="hve"))
        lab.up(hosts, mode, ttl, etcd_members=etcd_members)
        labs.append((lab, lab.state()))
        return lab

    yield make
    for lab, _ in labs:
        final = lab.state() if lab.settings.state_file.exists() else None
        assert lab.down() == []
        if final is not None:
            assert_nothing_left(lab, final)
