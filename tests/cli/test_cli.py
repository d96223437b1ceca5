"""The `hvplace` CLI: offline simulate of the sample cluster, and against a live coordinator."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hvplace.cli import main as cli
from hvplace.cli import vms
from support.api import Api, running_api
from support.etcd import EtcdServer

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


# --------------------------------------------------------------------------- live


@pytest.fixture
async def api(etcd: EtcdServer) -> AsyncIterator[Api]:
    async with running_api(etcd) as a:
        for name in ("hv1", "hv2"):
            await a.add_host(name, {"rack": name})
        yield a


async def run(capsys: pytest.CaptureFixture[str], api: Api, *argv: str) -> tuple[int, str, str]:
    # The CLI is a blocking gRPC client; the server runs on this event loop.
    endpoint = f"127.0.0.1:1,{api.endpoint}"  # a dead endpoint first: the CLI moves on
    code = await asyncio.to_thread(cli.main, ["--endpoint", endpoint, "--timeout", "5", *argv])
    out, err = capsys.readouterr()
    return code, out, err


async def test_cli_against_a_running_coordinator(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await run(
        capsys,
        api,
        "vm",
        "create",
        "--scope",
        "acme",
        "web",
        "--count",
        "2",
        "--label",
        "app=web",
        "--kernel",
        "/boot/vmlinuz",
    )
    assert code == 0 and "web-1" in out and "scheduled" in out
    assert out.splitlines()[0].split() == list(vms.VM_HEADERS)
    code, out, _ = await run(capsys, api, "--json", "vm", "list", "--scope", "acme")
    assert code == 0
    names = [v["spec"]["name"] for v in json.loads(out)["vms"]]
    assert names == ["web-1", "web-2"]
    code, out, _ = await run(
        capsys,
        api,
        "rule",
        "create",
        "apart",
        "--scope",
        "acme",
        "--kind",
        "anti-affinity",
        "--selector",
        "app=web",
    )
    assert code == 0 and "anti_affinity" in out
    code, out, _ = await run(capsys, api, "rule", "get", "acme/apart")
    assert code == 0 and "web-1" in out and "MEMBER" in out
    code, out, err = await run(capsys, api, "rule", "delete", "apart", "--scope", "acme")
    assert code == 1 and err.startswith("hvplace: conflict: ")
    code, out, _ = await run(capsys, api, "host", "cordon", "hv1")
    assert code == 0 and "cordoned" in out
    code, out, _ = await run(capsys, api, "host", "list")
    assert code == 0 and "hv2" in out
    code, out, _ = await run(capsys, api, "cluster", "status")
    assert code == 0 and "headroom" in out
    code, out, _ = await run(capsys, api, "--json", "simulate", "--fail", "hv2")
    assert (code == 0 and "pending" in json.loads(out)) or "moves" in json.loads(out)
    code, out, _ = await run(capsys, api, "vm", "explain", "acme/web-1")
    assert code == 0 and "hosts feasible" in out
    # A VM no host can take is listed pending with its reason (0 feasible hosts).
    code, out, _ = await run(
        capsys,
        api,
        "vm",
        "create",
        "--scope",
        "acme",
        "huge",
        "--memory",
        "900000",
        "--kernel",
        "/boot/vmlinuz",
    )
    assert code == 0
    code, out, _ = await run(capsys, api, "vm", "list", "--scope", "acme")
    huge = next(line for line in out.splitlines() if "huge" in line)
    assert code == 0 and "pending" in huge and "0/2 hosts" in huge and "memory" in huge
    code, _, err = await run(capsys, api, "vm", "get", "acme/nope")
    assert code == 1 and err.startswith("hvplace: not-found: ")
    code, _, err = await run(capsys, api, "vm", "create", "--scope", "acme", "bad..name")
    assert code == 1 and "incorrect" in err


def test_lab_runs_the_labs_own_entry_point() -> None:
    """`hvplace lab ...` becomes `python -m hvplace.lab ...`: its usage, its exit codes."""
    shown = subprocess.run(
        [sys.executable, "-m", "hvplace.cli", "lab", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0 and shown.stdout.startswith("usage: hvplace lab")
    bad = subprocess.run(
        [sys.executable, "-m", "hvplace.cli", "lab", "no-such-command"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "no-such-command" in bad.stderr
