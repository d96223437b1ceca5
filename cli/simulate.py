"""`hvplace simulate`: what-if failover, from the coordinator or offline (`--cluster FILE`:
the placement engine run in-process on a described cluster, no etcd)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hvplace.cli.client import Client
from hvplace.cli.render import emit, explanation_text, labels_text, table
from hvplace.coordinator import whatif
from hvplace.proto import codec
from hvplace.proto.v1 import hvplace_pb2 as pb


def _simulate_text(
    moves: Sequence[tuple[str, str, str]], pending: Sequence[str], degraded: Sequence[str]
) -> str:
    out = [table(("VM", "FROM", "TO"), moves) if moves else "no VM moves"]
    if pending:
        out.append("stays pending:")
        out.extend(f"  {p}" for p in pending)
    out.extend(f"degraded: {d}" for d in degraded)
    return "\n".join(out)


def cmd_simulate(c: Client | None, args: argparse.Namespace) -> None:
    if args.cluster:
        simulate_offline(args)
        return
    assert c is not None
    request = pb.SimulateRequest(fail_hosts=args.fail or [])
    if args.domain:
        key, _, value = args.domain.partition("=")
        request.topology_key, request.domain = key, value
    resp: pb.SimulateResponse = c.call("cluster", "Simulate", request)
    emit(
        args,
        resp,
        lambda: _simulate_text(
            [(m.vm, m.from_host, m.to_host) for m in resp.moves],
            [explanation_text(e) for e in resp.pending],
            list(resp.degraded),
        ),
    )


def simulate_offline(args: argparse.Namespace) -> None:
    """`simulate --cluster FILE`: place a described cluster in-process (no etcd), print
    the placement, each pending VM's explanation, and with --fail the failover plan."""
    from hvplace.coordinator.placement import rule_compliance

    cluster = whatif.load_cluster(Path(args.cluster))
    snapshot, plan = whatif.place_cluster(cluster)
    compliance = rule_compliance(snapshot)
    result: whatif.SimulateResult | None = None
    if args.fail or args.domain:
        key, _, value = (args.domain or "").partition("=")
        lost = whatif.failed_hosts(snapshot, args.fail or [], key, value)
        result = whatif.simulate_failure(snapshot, lost)
    if args.json:
        out: dict[str, Any] = {
            "placements": dict(sorted(plan.assignments.items())),
            "pending": [codec.to_dict(e) for _, e in sorted(plan.pending.items())],
            "rules": {
                k: {"satisfied": v.satisfied, "violations": list(v.violations)}
                for k, v in compliance.items()
            },
        }
        if result is not None:
            out["failover"] = codec.to_dict(result)
        print(json.dumps(out, sort_keys=True))
        return
    by_key = {vm.key: vm for vm in cluster.vms}
    rows = []
    for key in sorted(by_key):
        vm = by_key[key]
        host = plan.assignments.get(key)
        rows.append(
            [
                vm.scope,
                vm.name,
                host or "-",
                "scheduled" if host else "pending",
                f"{vm.resources.vcpus}c/{vm.resources.memory_mib}M/{vm.resources.disk_gib}G",
                labels_text(vm.labels),
            ]
        )
    print(
        f"placement of {args.cluster}: {len(plan.assignments)} placed, {len(plan.pending)} pending"
    )
    print(table(("SCOPE", "NAME", "HOST", "PHASE", "SIZE", "LABELS"), rows))
    for key, e in sorted(plan.pending.items()):
        print()
        print(f"why {key} is pending: {e.summary()}")
        print(
            table(
                ("HOSTS", "REASON", "RULE"),
                ([r.hosts, r.message, r.rule or "-"] for r in e.reasons),
            )
        )
    print()
    print(
        table(
            ("RULE", "SATISFIED", "VIOLATIONS"),
            (
                [k, "yes" if v.satisfied else "NO", "; ".join(v.violations) or "-"]
                for k, v in compliance.items()
            ),
        )
    )
    if result is not None:
        print()
        print(f"if {', '.join(lost)} failed:")
        print(
            _simulate_text(
                [(m.vm, m.from_host, m.to_host) for m in result.moves],
                [f"{e.vm}: {e.summary()}" for e in result.pending],
                list(result.degraded),
            )
        )


def register(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = top.add_parser(
        "simulate",
        help="what-if: the failover plan if hosts or a domain failed; changes nothing",
    )
    p.add_argument("--fail", action="append", metavar="HOST", help="a host to fail (repeatable)")
    p.add_argument(
        "--domain", metavar="KEY=VALUE", help="fail every host with this label (rack=r1)"
    )
    p.add_argument(
        "--cluster",
        metavar="FILE",
        help="offline: place the cluster described in FILE (TOML/JSON) in-process, no coordinator",
    )
    p.set_defaults(func=cmd_simulate)
