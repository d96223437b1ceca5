"""The packaged systemd units: hardened as far as each daemon's job allows, measured by
`systemd-analyze security` (offline, on the unit files themselves)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"


def exposure(unit: str) -> float:
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNITS / unit)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
    assert found, out
    return float(found.group(1))


@pytest.mark.parametrize(
    ("unit", "limit"),
    [
        # An unprivileged dynamic user that only talks TCP: "OK" in systemd's words.
        ("hvplace-coordinator.service", 2.0),
        # Root (libvirtd's socket and /dev/watchdog are root's) without capabilities.
        ("hvplace-agent.service", 2.5),
    ],
)
def test_unit_exposure(unit: str, limit: float) -> None:
    assert exposure(unit) <= limit


def test_coordinator_runs_unprivileged() -> None:
    text = (UNITS / "hvplace-coordinator.service").read_text()
    for line in ("DynamicUser=yes", "NoNewPrivileges=yes", "CapabilityBoundingSet=\n"):
        assert line in text


def test_agent_keeps_its_guests_and_its_watchdog() -> None:
    text = (UNITS / "hvplace-agent.service").read_text()
    # Hardening must not take away what fencing and adoption need.
    for line in ("KillMode=process", "DeviceAllow=/dev/watchdog rw", "CapabilityBoundingSet=\n"):
        assert line in text
    assert "PrivateDevices=yes" not in text  # it would hide /dev/watchdog
