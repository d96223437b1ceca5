"""Placement engine benchmark: a seeded synthetic cluster placed in batches, checked by brute force.

python bench/engine.py --hosts 1000 --vms 10000 --json [--seed 1 --batch 500 --profile --rebuild]
python bench/engine.py --curve [--rebuild]      # the README's points, one JSON line each
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Mapping

import immutables
from hvplace.coordinator.placement import Batch, place
from hvplace.coordinator.snapshot import Derived, Snapshot, Usage
from hvplace.proto.records import (
    VM,
    Enforcement,
    Host,
    Ratios,
    Resources,
    Rule,
    RuleKind,
    ScopePolicy,
)
from hvplace.proto.selectors import (
    LabelExpression,
    NodeAffinity,
    NodeSelectorTerm,
    Op,
    PreferredTerm,
)

CURVE = ((100, 1000), (1000, 10_000), (5000, 25_000), (10_000, 50_000), (20_000, 100_000))
"""The README's curve; 10,000 / 50,000 and 20,000 / 100,000 are issue 14's goal points."""
VMS_PER_SCOPE = 100
HOSTS_PER_RACK = 20


def build_hosts(count: int, rng: random.Random) -> dict[str, Host]:
    zones = max(3, count // 100)
    hosts = {}
    for i in range(count):
        name = f"h{i:05d}"
        labels = {"zone": f"z{i % zones}", "rack": f"r{i // HOSTS_PER_RACK}"}
        if rng.random() < 0.3:
            labels["disktype"] = "ssd"
        hosts[name] = Host(
            name=name,
            labels=labels,
            capacity=Resources(vcpus=64, memory_mib=256 * 1024, disk_gib=4000),
            ratios=Ratios(cpu=4.0),
            reserved_memory_mib=4096,
        )
    return hosts


def build_workload(
    vm_count: int, zones: int, rng: random.Random
) -> tuple[list[VM], dict[str, Rule], dict[str, ScopePolicy]]:
    """VMs in scopes of 100; anti-affinity groups of 3–5; spread label scopes; node
    affinity on a fifth; a required affinity pair and some preferred pairs per scope."""
    vms: list[VM] = []
    rules: dict[str, Rule] = {}
    policies: dict[str, ScopePolicy] = {}
    for start in range(0, vm_count, VMS_PER_SCOPE):
        scope = f"s{start // VMS_PER_SCOPE:04d}"
        spread_scope = rng.random() < 0.25
        if spread_scope:
            policies[scope] = ScopePolicy(
                scope, label_anti_affinity=True, spread=3, label_keys=("role",)
            )
        names = []
        for i in range(start, min(vm_count, start + VMS_PER_SCOPE)):
            name = f"vm{i:06d}"
            names.append(name)
            labels = {"app": f"a{rng.randrange(10)}"}
            if spread_scope:
                labels["role"] = f"role{rng.randrange(5)}"
            affinity = NodeAffinity()
            if rng.random() < 0.2:
                zone_pick = tuple(sorted({f"z{rng.randrange(zones)}" for _ in range(2)}))
                affinity = NodeAffinity(
                    required=(NodeSelectorTerm((LabelExpression("zone", Op.IN, zone_pick),)),),
                    preferred=(
                        PreferredTerm(
                            20,
                            NodeSelectorTerm((LabelExpression("disktype", Op.IN, ("ssd",)),)),
                        ),
                    ),
                )
            vms.append(
                VM(
                    scope=scope,
                    name=name,
                    labels=labels,
                    resources=Resources(
                        vcpus=rng.choice((1, 2, 4, 8)),
                        memory_mib=rng.choice((1024, 2048, 4096, 8192, 16384)),
                        disk_gib=rng.choice((10, 20, 50)),
                    ),
                    node_affinity=affinity,
                )
            )
        # Anti-affinity groups over a third of the scope, then preferred pairs.
        pool = names[:]
        rng.shuffle(pool)
        taken = 0
        group = 0
        while taken < len(pool) // 3:
            size = rng.randint(3, 5)
            members = tuple(sorted(pool[taken : taken + size]))
            taken += size
            if len(members) < 2:
                break
            by_rack = rng.random() < 0.2
            rule = Rule(
                scope=scope,
                name=f"aag{group}",
                kind=RuleKind.ANTI_AFFINITY,
                members=members,
                topology_key="rack" if by_rack else "host",
                min_domains=2 if by_rack else 0,
            )
            rules[rule.key] = rule
            group += 1
        together = tuple(sorted(pool[taken : taken + 2]))
        taken += 2
        if len(together) == 2:
            rule = Rule(scope=scope, name="together", kind=RuleKind.AFFINITY, members=together)
            rules[rule.key] = rule
        for pair in range(3):
            members = tuple(sorted(pool[taken : taken + 2]))
            taken += 2
            if len(members) < 2:
                break
            rule = Rule(
                scope=scope,
                name=f"pref{pair}",
                kind=RuleKind.AFFINITY,
                enforcement=Enforcement.PREFERRED,
                weight=50,
                members=members,
            )
            rules[rule.key] = rule
    return vms, rules, policies


def count_violations(
    hosts: Mapping[str, Host],
    vms: Mapping[str, VM],
    placements: Mapping[str, str],
    rules: Mapping[str, Rule],
    policies: Mapping[str, ScopePolicy],
) -> int:
    """Brute force, independent of the engine: capacity, node affinity, every required
    rule and policy group (max_per_domain, min_domains, affinity, topology label)."""
    violations = 0
    used: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for key, host in placements.items():
        r = vms[key].resources
        u = used[host]
        u[0] += r.vcpus
        u[1] += r.memory_mib
        u[2] += r.disk_gib
        if not vms[key].node_affinity.admits(hosts[host]):
            violations += 1
    for host, (cpu, mem, disk) in used.items():
        a = hosts[host].allocatable()
        violations += cpu > a.vcpus or mem > a.memory_mib or disk > a.disk_gib
    by_scope: dict[str, list[VM]] = defaultdict(list)
    for vm in vms.values():
        by_scope[vm.scope].append(vm)
    groups: list[tuple[str, list[str], int, int, bool]] = []
    for rule in rules.values():
        if rule.enforcement is not Enforcement.REQUIRED:
            continue
        members = [
            vm.key
            for vm in by_scope[rule.scope]
            if vm.name in rule.members
            or (rule.selector is not None and rule.selector.matches(vm.labels))
        ]
        groups.append(
            (
                rule.topology_key,
                members,
                rule.max_per_domain,
                rule.min_domains,
                rule.kind is RuleKind.ANTI_AFFINITY,
            )
        )
    for policy in policies.values():
        if not policy.label_anti_affinity:
            continue
        pairs: dict[tuple[str, str], list[str]] = defaultdict(list)
        for vm in by_scope[policy.scope]:
            for k, v in vm.labels.items():
                if not policy.label_keys or k in policy.label_keys:
                    pairs[(k, v)].append(vm.key)
        cap = 1 << 40 if policy.spread else 1
        for members in pairs.values():
            groups.append(("host", members, cap, policy.spread, True))
    for topology, members, cap, min_domains, anti in groups:
        domains = []
        for m in members:
            if m in placements:
                d = hosts[placements[m]].topology(topology)
                if d is None:
                    violations += 1
                else:
                    domains.append(d)
        per = Counter(domains)
        if anti:
            violations += sum(1 for c in per.values() if c > cap)
            need = min(min_domains, len(domains)) if min_domains > 1 else 0
            violations += len(per) < need
        else:
            violations += len(per) > 1
    return violations


def run(
    hosts_n: int, vms_n: int, seed: int, batch_size: int, profile: bool, rebuild: bool = False
) -> dict[str, object]:
    rng = random.Random(seed)
    hosts = build_hosts(hosts_n, rng)
    zones = max(3, hosts_n // 100)
    workload, rules, policies = build_workload(vms_n, zones, rng)
    vms: dict[str, VM] = {}
    placements: dict[str, str] = {}
    pending = 0
    profiler = None
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler()
        profiler.start()
    # As the coordinator's cache does: counters moved per placed VM (snapshot.Usage), so a
    # batch costs what it places, not what the cluster holds. --rebuild gives the engine
    # plain dicts instead (every batch recounts them: the curve before issue 14).
    usage = Usage()
    host_map = immutables.Map(hosts)
    engine_seconds = 0.0
    started = time.perf_counter()
    cpu_started = time.process_time()
    for start in range(0, len(workload), batch_size):
        batch = tuple(workload[start : start + batch_size])
        if rebuild:
            snapshot = Snapshot(
                revision=start,
                hosts=hosts,
                vms=vms,
                placements=placements,
                rules=rules,
                policies=policies,
            )
        else:
            snapshot = Snapshot(
                revision=start,
                hosts=host_map,
                vms=usage.vms,
                placements=usage.placements,
                rules=rules,
                policies=policies,
                derived=Derived.of(usage),
            )
        placing = time.perf_counter()
        plan = place(snapshot, Batch(batch))
        engine_seconds += time.perf_counter() - placing
        pending += len(plan.pending)
        if rebuild:
            for vm in batch:
                vms[vm.key] = vm
            placements.update(plan.assignments)
            continue
        # The coordinator's cache moving its counters per event: counted, as it is the
        # price of the O(1) snapshots above.
        for vm in batch:
            usage.set_vm(vm.key, vm)
        for key, host in plan.assignments.items():
            usage.set_placement(key, host)
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    if not rebuild:
        # The checker's plain dicts, taken from the counters' maps after the clock stops.
        vms = dict(usage.vms)
        placements = dict(usage.placements)
    if profiler is not None:
        profiler.stop()
        print(profiler.output_text(unicode=False, color=False), file=sys.stderr)
    violations = count_violations(hosts, vms, placements, rules, policies)
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "hosts": hosts_n,
        "vms": vms_n,
        "seed": seed,
        "batch": batch_size,
        "state": "rebuilt" if rebuild else "incremental",
        "rules": len(rules),
        "policies": len(policies),
        "placed": len(placements),
        "pending": pending,
        "seconds": round(seconds, 3),
        "placements_per_s": round(len(placements) / seconds) if seconds else 0,
        # CPU time of this process over the same region: on a shared machine, the wall
        # figure above includes time other processes held the core.
        "cpu_seconds": round(cpu_seconds, 3),
        # place() alone, without the counters' upkeep per event (the cache's work).
        "engine_seconds": round(engine_seconds, 3),
        "violations": violations,
        "peak_rss_mb": round(rss_kib / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--vms", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--profile", action="store_true", help="pyinstrument report on stderr")
    parser.add_argument(
        "--rebuild", action="store_true", help="plain dicts per batch, no kept counters"
    )
    parser.add_argument(
        "--curve",
        action="store_true",
        help="one JSON line per point: 100/1k, 1k/10k, 5k/25k, 10k/50k, 20k/100k hosts/VMs",
    )
    args = parser.parse_args()
    if args.curve:
        for hosts_n, vms_n in CURVE:
            print(json.dumps(run(hosts_n, vms_n, args.seed, args.batch, False, args.rebuild)))
        return
    result = run(args.hosts, args.vms, args.seed, args.batch, args.profile, args.rebuild)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for key, value in result.items():
            print(f"{key:>18}: {value}")


if __name__ == "__main__":
    main()
