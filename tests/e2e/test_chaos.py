"""The fault campaign on real hosts (namespaced libvirtds, QEMU guests under TCG): a few
seeded faults of the kinds that pass today, the workload's dozen guests, the checker
reading every host's libvirtd and QEMU processes every 100 ms; nothing left after."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from hvplace.lab import chaos

pytestmark = pytest.mark.e2e


def test_a_short_campaign_on_real_hosts(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("real hosts need root: sudo bash .ci/run -m e2e", pytrace=False)
    out = io.StringIO()
    report = chaos.run_campaign(
        faults=5,
        seed=9,
        mode="real",
        hosts=4,
        kinds=chaos.PASSING_REAL,
        max_time_s=420,
        state_dir=tmp_path,
        out=out,
    )
    chaos.print_report(report, out)
    summary = json.loads(out.getvalue().splitlines()[-1])
    assert summary["faults"] == 5, out.getvalue()
    assert summary["passed"], out.getvalue()
    assert summary["max_sample_gap_s"] < 2.5
    assert not (tmp_path / "lab").exists()
