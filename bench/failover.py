"""Failover time end to end: a lab of 4 hosts, a dozen VMs under rules, one host killed.

Starts a throwaway lab (real namespaced hosts with QEMU guests as root, else test:///
hosts), creates the VMs through the `hvplace` CLI, waits until all run, kill -9s the
host with the most rule members, and measures from the kill:

  detect_s      until the coordinator marked the host lost (its HostStatus record)
  reassigned_s  until every VM of the host was assigned elsewhere (their VMStatus records)
  running_s     until all of them ran again (libvirt sampled every 100 ms on real hosts;
                the agents' domain reports on test hosts)
  violations    samples in which running VMs broke a required anti-affinity rule
  duplicates    samples in which one VM ran on two hosts

`--fail agent` kill -9s only the agent of that host (its libvirtd and QEMUs live on): the
host's watchdog must end its guests before they are re-placed; it adds

  reset_s       until libvirt showed none of the host's VMs running there any more
                (the watchdog stand-in killed the host's QEMUs and libvirtd)

Run: sudo python bench/failover.py --ttl 5 --json   (and --ttl 2, and --fail agent)

At scale, `--mode test --hosts 200 --fail-rack`: a rack of 20 hosts holding ~800 VMs
fails at once. The rack is 20 real hvplace-agent processes (test:///), killed -9 together;
20 more real agents and 160 hosts of bench/hostsim.py (one process registering hosts on
leases and reporting the domains of their assignments through the agents' etcd keys)
receive the VMs; two real coordinators as in the lab. 40 VMs a host are written
straight into etcd (as bench/scale.py does). From the kill:

  reassigned_s  until every VM of the rack was assigned elsewhere (max VMStatus.since)
  running_s     until every one was reported running by its new host (max
                DomainStatus.since); running_real_s: those on real agents
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hvplace.lab import observe, workload
from hvplace.lab.control import Lab, scratch_settings
from hvplace.lab.observe import ClusterState, EtcdAccess
from hvplace.lab.processes import kill9
from hvplace.lab.state import LabState
from support.sampler import EtcdSampler, LibvirtSampler, Sampler

if TYPE_CHECKING:
    from hvplace.coordinator.store import Store


def run(args: argparse.Namespace) -> dict[str, object]:

    mode = args.mode or ("real" if os.geteuid() == 0 else "test")
    tmp = Path(tempfile.mkdtemp(prefix="hvplace-bench-failover-"))
    lab = Lab(scratch_settings(tmp / "lab", prefix="hvb"), out=sys.stderr)
    try:
        lab.up(args.hosts, mode, args.ttl)
        state = lab.state()
        etcd = lab.etcd_endpoint()
        keys = workload.create(lab)
        before = observe.wait_for(etcd, workload.all_running(keys), 120, "all VMs running")
        victim = workload.pick_victim(before, keys)
        moving = sorted(k for k in keys if before.host_of(k) == victim)
        hosts = {h.name: h.root_side_uri for h in state.hosts.values()}
        sampler: Sampler = LibvirtSampler(hosts, keys) if mode == "real" else EtcdSampler(etcd)
        sampler.start()
        time.sleep(1.0)  # a second of samples before the failure
        killed_at = time.time()
        if args.fail == "agent":
            kill9(state.hosts[victim].agent)
        else:
            lab.kill_host(victim)

        def reassigned(s: ClusterState) -> bool:
            return s.lost(victim) and all(
                s.host_of(k) not in (None, victim) and s.vm_status[k].phase.value == "scheduled"
                for k in moving
            )

        after = observe.wait_for(etcd, reassigned, 120, f"the VMs of {victim} reassigned")
        ran = observe.wait_for(etcd, workload.all_running(moving), 120, "the moved VMs running")
        detect = after.host_status[victim].since - killed_at
        reassigned_at = max(after.vm_status[k].since for k in moving)
        deadline = time.monotonic() + 60
        running_at = sampler.first_all_running(moving, killed_at, victim)
        while running_at is None and time.monotonic() < deadline:
            time.sleep(0.1)
            running_at = sampler.first_all_running(moving, killed_at, victim)
        time.sleep(1.0)  # and a second after
        sampler.stop()
        gone_at = next(
            (
                smp.at
                for smp in sampler.samples
                if smp.at > killed_at and not set(moving) & smp.running.get(victim, frozenset())
            ),
            float("nan"),
        )
        duplicates = sampler.duplicates()
        violations = sampler.violations(ran.rules, ran.vms, before.host_labels())
        budget = lab_budget(state)
        return {
            "mode": mode,
            "ttl_s": budget["lease_ttl_s"],
            "fence_after_s": budget["fence_after_s"],
            "failover_delay_s": budget["failover_delay_s"],
            "watchdog_timeout_s": budget["watchdog_timeout_s"],
            "fail": args.fail,
            "hosts": args.hosts,
            "vms": len(keys),
            "killed_host": victim,
            "moved_vms": len(moving),
            "reset_s": round(gone_at - killed_at, 2),
            "detect_s": round(detect, 2),
            "reassigned_s": round(reassigned_at - killed_at, 2),
            "running_s": round((running_at or float("nan")) - killed_at, 2),
            "violations": len(violations),
            "duplicates": len(duplicates),
            # Real hosts: libvirt itself; test hosts: what the agents report in etcd.
            "sampled": "libvirt" if mode == "real" else "etcd",
            "samples": len(sampler.samples),
            "max_sample_gap_s": round(sampler.max_gap(), 3),
            "problems": (violations + duplicates)[:10],
        }
    finally:
        if not args.keep:
            lab.down()


REAL_AGENTS = 40
"""Real agent processes (test:///) in the rack benchmark: the failed rack and one more."""


def run_rack(args: argparse.Namespace) -> dict[str, object]:
    import subprocess

    if args.mode != "test":
        raise SystemExit("--fail-rack runs on test:/// hosts: give --mode test")
    rack = args.rack_size
    real = min(args.real_agents, args.hosts)
    if real < rack + 1:
        raise SystemExit(f"--hosts must be at least {rack + 1}")
    tmp = Path(tempfile.mkdtemp(prefix="hvplace-bench-rack-"))
    lab = Lab(scratch_settings(tmp / "lab", prefix="hvr"), out=sys.stderr)
    sim: subprocess.Popen[str] | None = None
    try:
        started = time.monotonic()
        lab.up(real, "test", args.ttl)
        state = lab.state()
        etcd = lab.etcd_endpoint()
        budget = lab_budget(state)
        sim_count = args.hosts - real
        if sim_count:
            sim = subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).with_name("hostsim.py")),
                    "--endpoint", etcd.url,
                    "--first", str(real + 1),
                    "--count", str(sim_count),
                    "--ttl", str(budget["lease_ttl_s"]),
                    "--rack-size", str(rack),
                    *(["--ca", etcd.ca] if etcd.ca else []),
                    *(["--user", etcd.user] if etcd.user else []),
                    *(["--password-file", etcd.password_file] if etcd.password_file else []),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            assert sim.stdout is not None
            if sim.stdout.readline().strip() != "ready":
                raise SystemExit("the host simulator did not start")
        real_names = [h.name for h in state.hosts.values()]
        failed = real_names[:rack]
        from hostsim import sim_name

        names = real_names + [sim_name(i) for i in range(real + 1, args.hosts + 1)]

        async def scenario() -> tuple[dict[str, str], list[str], dict[str, object]]:
            keys = await _load(etcd, names, args.vms_per_host)
            print(f"loaded {len(keys)} VMs on {len(names)} hosts", file=sys.stderr)
            moving = sorted(k for k, h in keys.items() if h in failed)
            await _wait_running(etcd, set(keys), 300)
            print(f"all running after {time.monotonic() - started:.0f}s", file=sys.stderr)
            agents = [state.hosts[name].agent for name in failed]
            killed_at = time.time()
            for record in agents:  # the whole rack at once (kill -9 of every agent)
                kill9(record)
            kill_spread = time.time() - killed_at
            result = await _measure(etcd, moving, set(failed), killed_at, 120)
            result["kill_spread_s"] = round(kill_spread, 3)
            return keys, moving, result

        keys, moving, result = asyncio.run(scenario())
        goal = budget["lease_ttl_s"] + 1.0
        return {
            "mode": "test",
            "hosts": len(names),
            "real_agents": real,
            "simulated_hosts": sim_count,
            "vms": len(keys),
            "failed_hosts": len(failed),
            "moved_vms": len(moving),
            **{k: v for k, v in budget.items()},
            **result,
            "goal_s": goal,
            "within_goal": bool(result["reassigned_s"] <= goal),  # type: ignore[operator]
        }
    finally:
        if sim is not None:
            sim.kill()
            sim.wait()
        if not args.keep:
            lab.down()


async def _connect(etcd: EtcdAccess) -> Store:
    """The lab's etcd as root (TLS with the lab's CA, etcd auth on)."""
    from hvplace.coordinator.store import Store
    from hvplace.runtime.etcd import EtcdAuth, EtcdTLS

    tls = EtcdTLS(ca=Path(etcd.ca)) if etcd.ca else None
    pw = Path(etcd.password_file) if etcd.password_file else None
    auth = EtcdAuth(user=etcd.user, password_file=pw) if etcd.user else None
    return await Store.connect([etcd.url], timeout=30, tls=tls, auth=auth)


async def _load(endpoint: EtcdAccess, hosts: list[str], per_host: int) -> dict[str, str]:
    """`per_host` VMs on every host, spec + assignment + status, as the planner writes."""
    from hvplace.proto import codec, keyspace
    from hvplace.proto.records import VM, Assignment, Image, Phase, Resources, VMStatus

    store = await _connect(endpoint)
    where: dict[str, str] = {}
    puts: dict[str, bytes] = {}
    now = time.time()
    for i, host in enumerate(hosts):
        for j in range(per_host):
            n = i * per_host + j
            vm = VM(
                scope="bench",
                name=f"vm{n:05d}",
                uid=f"u{n:05d}",
                labels={"app": f"app{n % 50}"},
                resources=Resources(vcpus=1, memory_mib=1024, disk_gib=0),
                image=Image(kernel="/var/cache/hvplace/guest/vmlinuz"),
                created_at=now,
            )
            puts[keyspace.vm(vm.scope, vm.name)] = codec.dumps(vm)
            puts[keyspace.assignment(host, vm.scope, vm.name)] = codec.dumps(
                Assignment(vm=vm, host=host, epoch=1)
            )
            status = VMStatus(
                scope=vm.scope, name=vm.name, phase=Phase.SCHEDULED, host=host, epoch=1, since=now
            )
            puts[keyspace.vm_status(vm.scope, vm.name)] = codec.dumps(status)
            where[vm.key] = host
            if len(puts) >= 900:
                await store.commit([], puts, fence=None)
                puts = {}
    if puts:
        await store.commit([], puts, fence=None)
    await store.close()
    return where


async def _domains(store: object) -> dict[str, list[object]]:
    from hvplace.coordinator.store import Store
    from hvplace.proto import codec, keyspace
    from hvplace.proto.records import DomainStatus

    assert isinstance(store, Store)
    out: dict[str, list[object]] = {}
    kvs, _rev = await store.list_prefix(keyspace.DOMAINS)
    for kv in kvs:
        d = codec.loads(DomainStatus, kv.value)
        out.setdefault(f"{d.scope}/{d.name}", []).append(d)
    return out


async def _wait_running(endpoint: EtcdAccess, keys: set[str], limit_s: float) -> None:
    from hvplace.proto.records import DomainState, DomainStatus

    store = await _connect(endpoint)
    deadline = time.monotonic() + limit_s
    try:
        while True:
            doms = await _domains(store)
            running = {
                k
                for k, ds in doms.items()
                if any(isinstance(d, DomainStatus) and d.state is DomainState.RUNNING for d in ds)
            }
            if keys <= running:
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"{len(keys - running)} VMs not running after {limit_s}s")
            await asyncio.sleep(1.0)
    finally:
        await store.close()


async def _measure(
    endpoint: EtcdAccess, moving: list[str], failed: set[str], killed_at: float, limit_s: float
) -> dict[str, object]:
    from hvplace.proto import codec, keyspace
    from hvplace.proto.records import DomainState, DomainStatus, HostStatus, Phase, VMStatus

    store = await _connect(endpoint)
    deadline = time.monotonic() + limit_s
    try:
        while True:  # every moved VM assigned off the rack
            kvs, _rev = await store.list_prefix(keyspace.VM_STATUS)
            statuses = {
                f"{s.scope}/{s.name}": s for s in (codec.loads(VMStatus, kv.value) for kv in kvs)
            }
            done = [statuses[k] for k in moving if statuses[k].host not in failed]
            if len(done) == len(moving) and all(s.phase is Phase.SCHEDULED for s in done):
                break
            if time.monotonic() > deadline:
                pending = sum(1 for k in moving if statuses[k].phase is Phase.PENDING)
                raise SystemExit(f"not reassigned after {limit_s}s ({pending} pending)")
            await asyncio.sleep(0.2)
        new_host = {k: statuses[k].host for k in moving}
        while True:  # and reported running there, at the new epoch
            doms = await _domains(store)
            found: dict[str, DomainStatus] = {}
            for k in moving:
                for d in doms.get(k, []):
                    if (
                        isinstance(d, DomainStatus)
                        and d.host == new_host[k]
                        and d.state is DomainState.RUNNING
                        and d.epoch >= 2
                    ):
                        found[k] = d
            if len(found) == len(moving):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{len(moving) - len(found)} moved VMs not running")
            await asyncio.sleep(0.2)
        lost = []
        for name in sorted(failed):
            kv = await store.get(keyspace.host_status(name))
            if kv is not None:
                lost.append(codec.loads(HostStatus, kv.value).since)
        on_real = [d.since for d in found.values() if not d.host.startswith("s")]
        return {
            "detect_s": round(min(lost) - killed_at, 2) if lost else None,
            "detect_last_s": round(max(lost) - killed_at, 2) if lost else None,
            "reassigned_s": round(max(statuses[k].since for k in moving) - killed_at, 2),
            "running_s": round(max(d.since for d in found.values()) - killed_at, 2),
            "running_real_s": round(max(on_real) - killed_at, 2) if on_real else None,
            "moved_to_real_agents": len(on_real),
            "hosts_receiving": len(set(new_host.values())),
        }
    finally:
        await store.close()


def lab_budget(state: LabState) -> dict[str, float]:
    from hvplace.lab.daemons import cluster_budget

    budget = cluster_budget(state.lease_ttl)
    return {
        "lease_ttl_s": budget.lease_ttl_s,
        "fence_after_s": budget.fence_after_s,
        "failover_delay_s": budget.failover_delay_s,
        "watchdog_timeout_s": budget.watchdog_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ttl", type=float, default=5.0, help="host lease TTL (default 5 s)")
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--mode", choices=("real", "test"), help="default: real as root")
    parser.add_argument(
        "--fail",
        choices=("host", "agent"),
        default="host",
        help="kill the whole host (default) or only its agent",
    )
    parser.add_argument("--keep", action="store_true", help="leave the lab running")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--fail-rack", action="store_true", help="kill a whole rack at once")
    parser.add_argument("--rack-size", type=int, default=20)
    parser.add_argument("--real-agents", type=int, default=REAL_AGENTS)
    parser.add_argument("--vms-per-host", type=int, default=40)
    args = parser.parse_args()
    if args.fail_rack:
        result = run_rack(args)
        print(json.dumps(result) if args.json else result)
        return 0 if result["within_goal"] else 1
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:18} {value}")
    return 0 if not result["violations"] and not result["duplicates"] else 1


if __name__ == "__main__":
    sys.exit(main())
