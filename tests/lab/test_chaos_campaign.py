"""A short seeded fault campaign on a test:/// lab, as CI runs it: faults one at a time and
overlapping, the independent checker over every sample, nothing left after `lab down`.

The kinds enabled are those that pass on today's main (chaos.PASSING_TEST); the README's
"Fault campaign" lists what the others find. Enabling one is one word in that tuple.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from hvplace.lab import chaos


def test_a_short_seeded_campaign_on_a_test_lab(tmp_path: Path) -> None:
    out = io.StringIO()
    report = chaos.run_campaign(
        faults=10,
        seed=20261130,
        mode="test",
        hosts=4,
        kinds=chaos.PASSING_TEST,
        max_time_s=150,
        state_dir=tmp_path,
        out=out,
    )
    chaos.print_report(report, out)
    summary = json.loads(out.getvalue().splitlines()[-1])
    assert summary["faults"] == 10, out.getvalue()
    assert summary["passed"], out.getvalue()
    for field in ("violations", "duplicates", "lost", "late", "leftovers", "agent_deaths"):
        assert summary[field] == 0, (field, out.getvalue())
    assert summary["max_sample_gap_s"] < 2.5
    assert set(summary["by_kind"]) <= set(chaos.PASSING_TEST)
    assert sum(summary["by_kind"].values()) == 10
    assert not (tmp_path / "lab").exists()


def test_unknown_kinds_are_refused(tmp_path: Path) -> None:
    with pytest.raises(chaos.ChaosError, match="unknown fault kinds"):
        chaos.run_campaign(1, 1, "test", kinds=["meteor"], state_dir=tmp_path)
    with pytest.raises(chaos.ChaosError, match="no fault kind"):
        chaos.run_campaign(1, 1, "test", kinds=["libvirtd_restart"], state_dir=tmp_path)
