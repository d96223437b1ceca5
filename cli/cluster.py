"""`hvplace cluster status` and `hvplace events`: cluster-wide state and its changes."""

from __future__ import annotations

import argparse
import json
from typing import Any

from hvplace.cli.client import Client
from hvplace.cli.render import emit, table
from hvplace.coordinator.convert import proto_to_dict
from hvplace.proto.v1 import hvplace_pb2 as pb


def _counts(m: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(m.items())) or "-"


def cmd_cluster_status(c: Client, args: argparse.Namespace) -> None:
    s: pb.ClusterStatus = c.call("cluster", "GetClusterStatus", pb.Empty())

    def text() -> str:
        rows: list[list[object]] = [
            ["leader", s.leader or "-"],
            ["fencing token", s.fencing_token],
            ["revision", s.revision],
            ["hosts", _counts(s.hosts_by_state)],
            ["vms", _counts(s.vms_by_phase)],
            ["pending", _counts(s.pending_by_reason)],
            [
                "timing",
                f"lease_ttl {s.config.lease_ttl_s}s, fence_after {s.config.fence_after_s}s,"
                f" failover_delay {s.config.failover_delay_s}s",
            ],
            [
                "admission",
                f"{s.config.admission_policy or 'warn'}, any {s.config.admission_failures or 1}"
                f" {s.config.admission_topology or 'host'} failure(s)",
            ],
            ["headroom", "ok" if s.headroom.ok else "AT RISK"],
        ]
        out = table(("FIELD", "VALUE"), rows)
        for imp in s.headroom.impacts:
            out += f"\n  losing {imp.failed or '-'} strands {', '.join(imp.stranded)}"
        return out

    emit(args, s, text)


def cmd_events(c: Client, args: argparse.Namespace) -> None:
    for ev in c.stream("cluster", "WatchEvents", pb.WatchEventsRequest(kinds=args.kinds)):
        if args.json:
            print(json.dumps(proto_to_dict(ev), sort_keys=True), flush=True)
        else:
            print(f"{ev.revision:>8}  {ev.kind:<10} {ev.type:<6} {ev.key}", flush=True)


def register(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cl = top.add_parser("cluster", help="cluster-wide state").add_subparsers(
        dest="cmd", required=True
    )
    p = cl.add_parser("status", help="leader, counts, timing budget and failover headroom")
    p.set_defaults(func=cmd_cluster_status)

    p = top.add_parser("events", help="stream changes as they happen")
    p.add_argument("--kinds", default="", help="comma-separated: vm,host,rule,assignment,domain")
    p.set_defaults(func=cmd_events)
