"""`hvplace vm migrate` and `hvplace host drain`: the CLI side of MaintenanceService."""

from __future__ import annotations

import argparse
import json
from typing import Any

from hvplace.cli.render import add_scope
from hvplace.coordinator.convert import proto_to_dict
from hvplace.proto.v1 import hvplace_pb2 as pb

MIGRATE_TIMEOUT_S = 300.0
"""A live migration returns when libvirt has moved the guest (or given up): allow for it."""


def cmd_vm_migrate(c: Any, args: argparse.Namespace) -> None:
    scope, name = args.name.split("/", 1) if args.name.count("/") == 1 else (args.scope, args.name)
    request = pb.MigrateVMRequest(scope=scope, name=name, to=args.to or "", dry_run=args.dry_run)
    saved, c.timeout = c.timeout, max(c.timeout, MIGRATE_TIMEOUT_S)
    try:
        r: pb.MigrateVMResponse = c.call("maintenance", "MigrateVM", request)
    finally:
        c.timeout = saved
    if args.json:
        print(json.dumps(proto_to_dict(r), sort_keys=True))
    elif r.mode == "none":
        print(f"{scope}/{name} would move {r.source} -> {r.target} (dry run)")
    else:
        print(f"{scope}/{name}: {r.source} -> {r.target} ({r.mode}, {r.seconds:.2f}s)")


def cmd_host_drain(c: Any, args: argparse.Namespace) -> None:
    request = pb.DrainRequest(host=args.host, dry_run=args.dry_run, parallel=args.parallel)
    for p in c.stream("maintenance", "Drain", request):
        if args.json:
            print(json.dumps(proto_to_dict(p), sort_keys=True), flush=True)
            continue
        count = f"[{p.done}/{p.total}]"
        if p.vm:
            arrow = f"{p.from_host} -> {p.to_host}" if p.to_host else p.from_host
            why = f"  {p.reason}" if p.reason else ""
            print(f"{count:>9} {p.vm:<28} {p.state:<10} {arrow}{why}", flush=True)
        else:
            print(f"{count:>9} host {p.from_host}: {p.state}  {p.reason}", flush=True)


def register_vm(vm: Any) -> None:
    """`vm migrate` on the CLI's `vm` subparsers."""
    p = vm.add_parser(
        "migrate", help="live-migrate a VM; the engine picks the host, or checks --to"
    )
    p.add_argument("name", metavar="NAME")
    add_scope(p)
    p.add_argument("--to", metavar="HOST", help="the host wanted (refused if it breaks a rule)")
    p.add_argument("--dry-run", action="store_true", help="check and choose only")
    p.set_defaults(func=cmd_vm_migrate)


def register_host(host: Any) -> None:
    """`host drain` on the CLI's `host` subparsers."""
    p = host.add_parser(
        "drain", help="move every VM off the host (live, bounded), then mark it drained"
    )
    p.add_argument("host", metavar="HOST")
    p.add_argument("--dry-run", action="store_true", help="print the plan and what would stay")
    p.add_argument("--parallel", type=int, default=0, help="migrations at once (default 2)")
    p.set_defaults(func=cmd_host_drain)
