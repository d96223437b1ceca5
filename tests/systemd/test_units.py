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


VENV_BIN = "/opt/hvplace/venv/bin/"
REPO = UNITS.parent


def test_units_start_what_the_install_installs() -> None:
    """One install: the units start the daemons from the venv that the production install
    (vagrant/provision/install.sh, running lab/install.sh) creates."""
    install = (REPO / "vagrant" / "provision" / "install.sh").read_text()
    assert "HVPLACE_VENV=/opt/hvplace/venv" in install
    for unit, daemon in (
        ("hvplace-agent.service", "hvplace-agent"),
        ("hvplace-coordinator.service", "hvplace-coordinator"),
    ):
        text = (UNITS / unit).read_text()
        assert f"ExecStart={VENV_BIN}{daemon} --config /etc/hvplace/" in text


@pytest.mark.parametrize("daemon", ["agent", "coordinator"])
def test_example_configs_are_accepted(daemon: str, tmp_path: Path) -> None:
    import os
    import sys

    auth = tmp_path / "auth.toml"
    auth.write_text("")
    env = dict(os.environ, HVPLACE_AUTH_FILE=str(auth))  # the example names /etc/hvplace's
    out = subprocess.run(
        [sys.executable, "-m", f"hvplace.{daemon}", "--config",
         str(UNITS / "hvplace" / f"{daemon}.toml"), "--check-config"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
