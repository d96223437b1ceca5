"""The `hvplace` CLI: offline simulate of the sample cluster, and against a live coordinator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hvplace.coordinator import cli

SAMPLE = Path(__file__).resolve().parents[2] / "lab" / "sample-cluster.toml"


def test_offline_simulate_prints_placement_and_explanations(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["simulate", "--cluster", str(SAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "SCOPE" in out and "HOST" in out
    assert "why initech/fe-5 is pending" in out
    assert "label anti-affinity" in out


def test_offline_simulate_json_with_failure(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--json", "simulate", "--cluster", str(SAMPLE), "--fail", "hv-a1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert all(rule["satisfied"] for rule in data["rules"].values())
    moved = {m["vm"] for m in data["failover"]["moves"]}
    lost_vms = {k for k, h in data["placements"].items() if h == "hv-a1"}
    assert moved <= lost_vms
    assert all(m["to_host"] != "hv-a1" for m in data["failover"]["moves"])


def test_offline_simulate_unknown_host_exits_with_reason(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["simulate", "--cluster", str(SAMPLE), "--fail", "nope"]) == 1
    assert "not-found" in capsys.readouterr().err


def test_bad_cluster_file_is_incorrect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text('[[vms]]\nscope = "a"\nname = "../x"\n')
    assert cli.main(["simulate", "--cluster", str(bad)]) == 1
    assert "incorrect" in capsys.readouterr().err
