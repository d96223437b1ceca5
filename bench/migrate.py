"""Live migration and drain times on a real lab: two namespaced hosts, QEMU guests (TCG).

Starts a throwaway lab (root: real hosts), creates the tiny guest and measures, per run:

  migrate_s      `hvplace vm migrate` wall time, from the call to the assignment settled on
                 the target (the engine's choice, the record, libvirt's job, the commit)
  libvirt_s      libvirt's own time for the job (the destination's completed job stats)
  downtime_ms    libvirt's measured downtime: the guest paused for the switchover
  dark_s         the longest window the sampler (libvirt of every host, every 100 ms, from
                 outside hvplace) saw the guest running on no host (its resolution: 0.1 s)
  duplicates     samples in which the guest ran on both hosts (must be 0)

then, with N guests on one host (`--guests`, created while the other is cordoned):

  drain_s        `hvplace host drain` wall time until the host is `drained` (2 at once)
  moved          guests moved (live); failed: those that stayed

Each run moves the guests back the other way, so every run moves the same number. The
rebalance move counts (`rebalance`) are the rebalancer's (issue 12 item 3): null here.

Run: sudo python bench/migrate.py --json --runs 3 --guests 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import libvirt
from hvplace.agent.domain_xml import domain_name
from hvplace.lab import observe, workload
from hvplace.lab.control import Lab, scratch_settings
from hvplace.lab.observe import ClusterState
from support.sampler import LibvirtSampler

SCOPE = "bench"


def cli(lab: Lab, *args: str) -> str:
    return workload.hvplace(lab, *args)


def running(keys: list[str]) -> observe.Condition:
    return workload.all_running(keys)


def job_stats(uri: str, key: str) -> dict[str, float]:
    """The completed migration job's stats as the destination's libvirt kept them."""
    scope, name = key.split("/")
    conn = libvirt.open(uri)
    try:
        stats = conn.lookupByName(domain_name(scope, name)).jobStats(
            libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED
        )
    except libvirt.libvirtError:
        return {}
    finally:
        conn.close()
    return {k: float(v) for k, v in stats.items() if isinstance(v, int | float)}


def dark(sampler: LibvirtSampler, key: str, start: float, end: float) -> float:
    """The longest run of samples in [start, end] in which `key` ran nowhere."""
    longest, since = 0.0, None
    for s in sampler.samples:
        if s.at < start or s.at > end:
            continue
        if any(key in keys for keys in s.running.values()):
            if since is not None:
                longest = max(longest, s.at - since)
            since = None
        elif since is None:
            since = s.at
    return longest


def summary(values: list[float]) -> dict[str, float]:
    return {
        "min": round(min(values), 3),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    if os.geteuid() != 0:
        raise SystemExit("bench/migrate.py needs root: real namespaced hosts and QEMU")
    tmp = Path(tempfile.mkdtemp(prefix="hvplace-bench-migrate-"))
    lab = Lab(scratch_settings(tmp / "lab", prefix="hvg"), out=sys.stderr)
    try:
        lab.up(2, "real", None)
        state = lab.state()
        etcd = lab.etcd_endpoint()
        hosts = sorted(state.hosts)
        uris = {h.name: h.root_side_uri for h in state.hosts.values()}
        size = [
            "--vcpus",
            "1",
            "--memory",
            str(workload.MEMORY_MIB),
            *workload.image_args(state),
        ]
        tiny = f"{SCOPE}/tiny"
        cli(lab, "vm", "create", "--scope", SCOPE, "tiny", *size)
        observe.wait_for(etcd, running([tiny]), 120, "the tiny guest running")
        sampler = LibvirtSampler(uris, [tiny], running_only=True)
        sampler.start()
        migrations: list[dict[str, float]] = []
        try:
            for _ in range(args.runs):
                started = time.time()
                t0 = time.perf_counter()
                out = json.loads(cli(lab, "--json", "vm", "migrate", tiny))
                took = time.perf_counter() - t0
                s = observe.wait_for(etcd, running([tiny]), 60, "the tiny guest on its target")
                stats = job_stats(uris[out["target"]], tiny)
                migrations.append(
                    {
                        "migrate_s": took,
                        "libvirt_s": stats.get("time_elapsed", float("nan")) / 1000,
                        "downtime_ms": stats.get("downtime", float("nan")),
                        "dark_s": dark(sampler, tiny, started, time.time()),
                    }
                )
                assert s.host_of(tiny) == out["target"]
        finally:
            sampler.stop()
        duplicates = len(sampler.duplicates())

        # -- drain: N guests on one host, moved to the other and back, once per run -------
        names = [f"g{i}" for i in range(args.guests)]
        keys = [f"{SCOPE}/{n}" for n in names]
        cli(lab, "host", "cordon", hosts[1])
        cli(lab, "vm", "create", "--scope", SCOPE, *names, *size)
        observe.wait_for(etcd, running(keys), 180, "the guests running")
        cli(lab, "host", "uncordon", hosts[1])
        drains: list[dict[str, float]] = []
        source = hosts[0]
        for _ in range(args.runs):
            t0 = time.perf_counter()
            lines = cli(lab, "--json", "host", "drain", source, "--parallel", str(args.parallel))
            took = time.perf_counter() - t0
            progress = [json.loads(line) for line in lines.splitlines() if line.strip()]
            moved = sum(1 for p in progress if p.get("state") == "migrated")
            failed = sum(1 for p in progress if p.get("state") == "failed")
            drains.append({"drain_s": took, "moved": moved, "failed": failed})

            def away(s: ClusterState, src: str = source) -> bool:
                return running(keys)(s) and all(s.host_of(k) != src for k in keys)

            observe.wait_for(etcd, away, 120, "the guests running on the other host")
            cli(lab, "host", "uncordon", source)
            source = hosts[1] if source == hosts[0] else hosts[0]
        return {
            "bench": "migrate",
            "hosts": 2,
            "runs": args.runs,
            "guest_memory_mib": workload.MEMORY_MIB,
            "migrate_s": summary([m["migrate_s"] for m in migrations]),
            "libvirt_s": summary([m["libvirt_s"] for m in migrations]),
            "downtime_ms": summary([m["downtime_ms"] for m in migrations]),
            "dark_s": summary([m["dark_s"] for m in migrations]),
            "duplicates": duplicates,
            "guests": args.guests,
            "parallel": args.parallel,
            "drain_s": summary([d["drain_s"] for d in drains]),
            "drain_moved": [d["moved"] for d in drains],
            "drain_failed": [d["failed"] for d in drains],
            "rebalance": None,
            "load": os.getloadavg()[0],
            "cpus": os.cpu_count(),
        }
    finally:
        lab.down()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--guests", type=int, default=4, help="guests on the drained host")
    p.add_argument("--parallel", type=int, default=2, help="migrations at once in a drain")
    p.add_argument("--json", action="store_true", help="one JSON line")
    args = p.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for k, v in result.items():
            print(f"{k:>18}: {v}")


if __name__ == "__main__":
    main()
