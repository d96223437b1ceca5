"""The lab's standard workload: a dozen VMs under rules from two of the seeds, created
through the `hvplace` CLI exactly as an operator would type it.

- G8 (seed 000): scope `cloudspace` has label anti-affinity with spread 2; four VMs
  labelled tier=web land on at least two hosts, balanced.
- Exoscale (seed 001): in scope `acme`, the anti-affinity group `db-group` (db-1..3,
  never two on one hypervisor), a rack-level group `cache-racks` (cache-1, cache-2 in
  different racks), and three batch VMs with no rule.

Used by the demo, the failover benchmark and the end-to-end tests.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence

from hvplace.lab.control import Lab
from hvplace.lab.daemons import GUEST_IMAGE_NAME
from hvplace.lab.observe import ClusterState
from hvplace.lab.state import LabState

G8 = "cloudspace"
EXO = "acme"
ANTI_AFFINITY_MEMBERS = [f"{EXO}/db-{i}" for i in (1, 2, 3)] + [f"{EXO}/cache-{i}" for i in (1, 2)]
VMS = (
    [f"{G8}/web-{i}" for i in (1, 2, 3, 4)]
    + ANTI_AFFINITY_MEMBERS
    + [f"{EXO}/batch-{i}" for i in (1, 2, 3)]
)
MEMORY_MIB = 128


class WorkloadError(RuntimeError):
    pass


def hvplace(
    lab: Lab, *args: str, echo: Callable[[str], None] | None = None, check: bool = True
) -> str:
    """Run `hvplace ARGS` against the lab; `echo` sees the command line first."""
    if echo is not None:
        echo("$ hvplace " + " ".join(shlex.quote(a) for a in args))
    out = subprocess.run(
        [sys.executable, "-m", "hvplace.cli", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, **lab.env()),
        timeout=120,
    )
    if check and out.returncode != 0:
        raise WorkloadError(f"hvplace {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout + out.stderr


def image_args(state: LabState) -> list[str]:
    """Boot the tiny guest from the catalogue (`lab up` registers it); test:/// hosts
    never open the kernel, so any host path does there."""
    if not state.guest_image:
        return ["--kernel", "/var/cache/hvplace/guest/vmlinuz"]
    return ["--image", GUEST_IMAGE_NAME]


def create(lab: Lab, echo: Callable[[str], None] | None = None) -> list[str]:
    """The rules, then the VMs; returns the VM keys."""
    size = ["--vcpus", "1", "--memory", str(MEMORY_MIB), *image_args(lab.state())]
    steps: Sequence[Sequence[str]] = (
        ("policy", "set", G8, "--label-anti-affinity", "--spread", "2"),
        ("rule", "create", "db-group", "--scope", EXO, "--kind", "anti-affinity",
         "--member", "db-1,db-2,db-3", "--description", "Exoscale anti-affinity group"),
        ("rule", "create", "cache-racks", "--scope", EXO, "--kind", "anti-affinity",
         "--member", "cache-1,cache-2", "--topology-key", "rack"),
        ("vm", "create", "--scope", G8, "web", "--count", "4", "--label", "tier=web",
         "--ha", "medium", *size),
        ("vm", "create", "--scope", EXO, "db-1", "db-2", "db-3", "--ha", "high", *size),
        ("vm", "create", "--scope", EXO, "cache-1", "cache-2", "--ha", "high", *size),
        ("vm", "create", "--scope", EXO, "batch", "--count", "3", "--ha", "low", *size),
    )  # fmt: skip
    for step in steps:
        hvplace(lab, *step, echo=echo)
    return list(VMS)


def all_running(keys: Sequence[str]) -> Callable[[ClusterState], bool]:
    """Each VM assigned, and running on its assigned host only (as its agent reports)."""

    def check(s: ClusterState) -> bool:
        return all((host := s.host_of(k)) is not None and s.running_on(k) == [host] for k in keys)

    return check


def pick_victim(s: ClusterState, keys: Sequence[str]) -> str:
    """The host holding the most anti-affinity members (then the most VMs): the failure
    that tests the rules hardest."""
    members: dict[str, int] = {}
    total: dict[str, int] = {}
    for key in keys:
        host = s.host_of(key)
        if host is None:
            continue
        total[host] = total.get(host, 0) + 1
        members[host] = members.get(host, 0) + (key in ANTI_AFFINITY_MEMBERS)
    if not total:
        raise WorkloadError("no VM is assigned yet")
    return max(sorted(total), key=lambda h: (members.get(h, 0), total[h]))
