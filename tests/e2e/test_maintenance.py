"""Maintenance end to end with real QEMU guests (TCG) on namespaced libvirtds: a live
migration keeps the guest running (no new boot), an explicit target that breaks a rule is
refused, and a drain empties a host holding an anti-affinity member while the 100 ms
sampler sees no VM running on two hosts and no required rule broken in any sample."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from hvplace.agent.domain_xml import NAMESPACE, domain_name, parse_tag
from hvplace.agent.guest_image import MARKER
from hvplace.lab import observe, workload
from hvplace.lab.control import Lab
from hvplace.lab.observe import ClusterState
from hvplace.proto import keyspace
from hvplace.proto.records import HostState
from support.labs import LabFactory
from support.sampler import LibvirtSampler

pytestmark = pytest.mark.e2e

SCOPE = "ops"
VMS = [f"{SCOPE}/a", f"{SCOPE}/b", f"{SCOPE}/c"]


def cli(lab: Lab, *args: str) -> str:
    return workload.hvplace(lab, *args)


def console(lab: Lab, host: str, key: str) -> str:
    scope, name = key.split("/")
    path = (
        Path(lab.state().hosts[host].dir) / "agent" / "console" / f"{domain_name(scope, name)}.log"
    )
    return path.read_text(errors="replace") if path.exists() else ""


def qemu_log(lab: Lab, host: str, key: str) -> str:
    """libvirt's log of the QEMU command lines of this domain on that host."""
    scope, name = key.split("/")
    path = Path(lab.state().hosts[host].dir) / "log" / "qemu" / f"{domain_name(scope, name)}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def tagged_epoch(lab: Lab, host: str, key: str) -> int:
    """The epoch in the hvplace tag of the VM's domain on that host, read from its libvirt."""
    scope, name = key.split("/")
    conn = libvirt.open(lab.state().hosts[host].root_side_uri)
    try:
        dom = conn.lookupByName(domain_name(scope, name))
        tag = parse_tag(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE))
    except libvirt.libvirtError:
        return 0
    finally:
        conn.close()
    return tag.epoch if tag is not None else 0


def settled(keys: list[str]) -> observe.Condition:
    def check(s: ClusterState) -> bool:
        return workload.all_running(keys)(s) and not any(
            v.reason.startswith("restarting") for v in s.vm_status.values()
        )

    return check


def test_live_migration_and_drain_keep_guests_running_and_rules_unbroken(
    make_lab: LabFactory,
) -> None:
    lab = make_lab(3, "real")
    size = ["--vcpus", "1", "--memory", str(workload.MEMORY_MIB), *workload.image_args(lab.state())]
    cli(
        lab,
        "rule",
        "create",
        "pair",
        "--scope",
        SCOPE,
        "--kind",
        "anti-affinity",
        "--member",
        "a,b",
    )
    cli(lab, "vm", "create", "--scope", SCOPE, "a", "b", "c", *size)
    before = observe.wait_for(lab.etcd_endpoint(), settled(VMS), 120, "the guests running")
    uris = {h.name: h.root_side_uri for h in lab.state().hosts.values()}
    sampler = LibvirtSampler(uris, VMS, running_only=True)
    sampler.start()
    try:
        # -- live migration: the guest keeps running, no new boot ------------------------
        key = f"{SCOPE}/a"
        source = before.host_of(key)
        assert source is not None
        observe.wait_for(
            lab.etcd_endpoint(),
            lambda s: MARKER in console(lab, source, key),
            60,
            "a's boot marker on its console",
        )
        partner = before.host_of(f"{SCOPE}/b")
        assert partner is not None and partner != source
        refused = workload.hvplace(lab, "vm", "migrate", key, "--to", partner, check=False)
        assert "anti-affinity rule `pair`" in refused, refused
        out = json.loads(cli(lab, "--json", "vm", "migrate", key))
        target = out["target"]
        assert out["mode"] == "live" and out["source"] == source and target not in (source, partner)
        moved = observe.wait_for(lab.etcd_endpoint(), settled(VMS), 60, "a running on its target")
        assert moved.host_of(key) == target
        assignment = moved.assignments[key][0]
        assert assignment.adopt_epoch == before.assignments[key][0].epoch
        # The target adopted the running guest: re-tagged with the new epoch, no error.
        observe.wait_for(
            lab.etcd_endpoint(),
            lambda s: tagged_epoch(lab, target, key) == assignment.epoch,
            30,
            "a's domain re-tagged with its new epoch",
        )
        reports = observe.read_cluster(lab.etcd_endpoint()).domains[key]
        assert [(d.host, d.last_error) for d in reports] == [(target, "")]
        # The target's QEMU took the guest's state over the network (-incoming) and the
        # guest never booted there: its console shows no boot marker.
        assert "-incoming" in qemu_log(lab, target, key)
        assert MARKER not in console(lab, target, key)
        # -- drain the host holding member b --------------------------------------------
        victim = moved.host_of(f"{SCOPE}/b")
        assert victim is not None
        plan = cli(lab, "host", "drain", victim, "--dry-run")
        assert f"{SCOPE}/b" in plan
        lines = cli(lab, "--json", "host", "drain", victim).splitlines()
        progress = [json.loads(line) for line in lines if line.strip()]
        assert progress[-1]["state"] == "drained", progress
        after = observe.wait_for(lab.etcd_endpoint(), settled(VMS), 60, "every guest running")
        assert all(after.host_of(k) != victim for k in VMS)
        assert after.host_status[victim].state is HostState.DRAINED
        assert after.host_of(f"{SCOPE}/a") != after.host_of(f"{SCOPE}/b")
        cli(lab, "host", "uncordon", victim)
        back = observe.read_cluster(lab.etcd_endpoint())
        assert back.host_status[victim].state is HostState.READY
    finally:
        sampler.stop()
    assert sampler.max_gap() < 1.0, "the sampler fell behind; its samples prove little"
    assert sampler.duplicates() == []
    assert sampler.violations(after.rules, after.vms, before.host_labels()) == []


@contextlib.contextmanager
def migrating(lab: Lab, name: str) -> Iterator[tuple[str, LibvirtSampler]]:
    """Create `name`, let it boot, then start `vm migrate` on it with the libvirt sampler
    on both hosts; yields (its source host, the sampler) once the migration is recorded
    (in flight), and stops the CLI and the sampler after the block."""
    key = f"{SCOPE}/{name}"
    size = ["--vcpus", "1", "--memory", str(workload.MEMORY_MIB), *workload.image_args(lab.state())]
    cli(lab, "vm", "create", "--scope", SCOPE, name, *size)
    before = observe.wait_for(lab.etcd_endpoint(), settled([key]), 120, f"{name} running")
    source = before.host_of(key)
    assert source is not None
    # Booted before it moves: a marker on the target's console would then be a new boot.
    observe.wait_for(
        lab.etcd_endpoint(),
        lambda s: MARKER in console(lab, source, key),
        60,
        f"{name}'s boot marker on its console",
    )
    uris = {h.name: h.root_side_uri for h in lab.state().hosts.values()}
    sampler = LibvirtSampler(uris, [key], running_only=True)
    sampler.start()
    mover = subprocess.Popen(
        [sys.executable, "-m", "hvplace.cli", "vm", "migrate", key],
        env=dict(os.environ, **lab.env()),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        observe.wait_for(
            lab.etcd_endpoint(), lambda _s: in_flight(lab), 60, "the migration recorded"
        )
        yield source, sampler
    finally:
        mover.kill()
        mover.wait()
        sampler.stop()


def in_flight(lab: Lab) -> bool:
    """A migration record is in etcd now (read directly)."""
    return bool(observe.read_prefix(lab.etcd_endpoint(), keyspace.MIGRATIONS)[1])


def test_a_migration_in_flight_is_settled_by_the_next_leader(make_lab: LabFactory) -> None:
    """The leader that started a live migration is killed -9 while libvirt moves the guest:
    the standby takes over and settles it from the records (derived, not remembered)."""
    lab = make_lab(2, "real")
    key = f"{SCOPE}/x"
    with migrating(lab, "x") as (source, sampler):
        lab.kill_leader()
        assert in_flight(lab), "settled before the leader died: this run proves nothing"

        def moved(s: ClusterState) -> bool:
            return settled([key])(s) and s.host_of(key) not in (None, source) and not in_flight(lab)

        after = observe.wait_for(lab.etcd_endpoint(), moved, 120, "x settled on the other host")
    target = after.host_of(key)
    assert target is not None
    assert "-incoming" in qemu_log(lab, target, key)
    assert MARKER not in console(lab, target, key)
    assert sampler.max_gap() < 1.0
    assert sampler.duplicates() == []


@pytest.mark.parametrize("side", ["source", "target"])
def test_an_agent_killed_mid_migration_leaves_the_vm_on_one_host(
    make_lab: LabFactory, side: str
) -> None:
    """The source's (or the target's) agent is killed -9 while libvirt moves the guest,
    and started again (as systemd would): the VM ends running on exactly one host, never
    two in any sample, and no migration record is left."""
    lab = make_lab(2, "real")
    key = f"{SCOPE}/y"
    with migrating(lab, "y") as (source, sampler):
        victim = source if side == "source" else next(h for h in lab.state().hosts if h != source)
        lab.kill_agent(victim)
        assert in_flight(lab), "settled before the agent died: this run proves nothing"
        lab.start_agent(victim)

        def one_host(s: ClusterState) -> bool:
            return settled([key])(s) and s.host_of(key) is not None and not in_flight(lab)

        after = observe.wait_for(lab.etcd_endpoint(), one_host, 180, "y settled on one host")
        # Ten more samples of libvirt on both hosts once it settled: still one copy.
        seen = len(sampler.samples)
        observe.wait_for(
            lab.etcd_endpoint(), lambda s: len(sampler.samples) >= seen + 10, 30, "ten samples"
        )
    host = after.host_of(key)
    assert host is not None
    assert sampler.duplicates() == []
    last = sampler.where(sampler.samples[-1])
    assert last.get(key) == [host], last
