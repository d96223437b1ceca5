"""The README's main command, `hvplace lab demo`, on a scratch lab: it must show the
failover with the rules intact, tell the newcomer where to look, and leave a lab that
`lab down` removes completely."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from hvplace.lab import demo
from hvplace.lab.control import Lab, scratch_settings
from support.labs import assert_nothing_left

pytestmark = pytest.mark.e2e


def test_demo_shows_a_clean_failover_and_leaves_a_lab_to_explore(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("the demo needs root: sudo bash .ci/run -m e2e", pytrace=False)
    settings = scratch_settings(tmp_path / "lab", prefix="hvd")
    out = io.StringIO()
    lab = Lab(settings)
    try:
        assert demo.run(settings, replace=False, out=out) == 0
        text = out.getvalue()
        assert "Required rules broken: none; VMs running twice: none." in text
        assert "marked lost after" in text and "re-placed after" in text
        assert "$ hvplace rule create db-group" in text
        assert "hvplace lab down" in text
        # The lab stays up for looking around: every host but the killed one registered.
        hosts = [r for r in lab.status() if r.component == "host"]
        down = [r.name for r in hosts if "NOT registered" in r.detail]
        assert len(hosts) == demo.HOSTS and len(down) == 1
        assert f"Killing host {down[0]}" in text
    finally:
        final = lab.state() if settings.state_file.exists() else None
        assert lab.down() == []
        if final is not None:
            assert_nothing_left(lab, final)
