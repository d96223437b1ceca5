"""Fixtures for the lab's tests: a lab with its own state dir, name prefix and subnet."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hvplace.lab.control import Lab, scratch_settings
from hvplace.lab.state import LabSettings


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "the lab's namespaced-host tests need root (netns, mounts, libvirtd): "
            "run them with `sudo bash .ci/run tests/lab`",
            pytrace=False,
        )


def lab_settings(tmp: Path) -> LabSettings:
    """Names and a subnet no running lab (prefix hvlab, 10.213.0.0/24) or other test uses."""
    return scratch_settings(tmp / "lab", prefix="hvt")


@pytest.fixture
def settings(tmp_path: Path) -> LabSettings:
    return lab_settings(tmp_path)


@pytest.fixture
def as_root() -> None:
    require_root()


@pytest.fixture(scope="module")
def real_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Two namespaced hosts (no daemons) for the module; removed even when a test fails."""
    require_root()
    lab = Lab(lab_settings(tmp_path_factory.mktemp("real-lab")))
    try:
        lab.up(2, "real", only="hosts")
        yield lab
    finally:
        lab.down()
