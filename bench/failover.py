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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hvplace.lab import observe, workload
from hvplace.lab.control import Lab, scratch_settings
from hvplace.lab.observe import ClusterState
from hvplace.lab.processes import kill9
from hvplace.lab.state import LabState
from support.sampler import EtcdSampler, LibvirtSampler, Sampler


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
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:18} {value}")
    return 0 if not result["violations"] and not result["duplicates"] else 1


if __name__ == "__main__":
    sys.exit(main())
