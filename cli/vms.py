"""`hvplace vm ...`: create, inspect, power and explain VMs."""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from hvplace.cli import maintenance, rebalance
from hvplace.cli.client import Client
from hvplace.cli.render import (
    add_scope,
    admission_text,
    emit,
    explanation_text,
    json_to_proto,
    kv,
    labels_text,
    ref,
    resources_text,
    table,
)
from hvplace.proto.errors import InvalidInput
from hvplace.proto.v1 import hvplace_pb2 as pb

VM_HEADERS = ("SCOPE", "NAME", "PHASE", "HOST", "SIZE", "POWER", "DOMAIN", "REASON")


def _vm_rows(views: Iterable[pb.VMView]) -> list[list[object]]:
    rows: list[list[object]] = []
    for v in views:
        phase = v.status.phase or "pending"
        # The coordinator writes the explanation's summary as the reason.
        reason = v.status.reason
        rows.append(
            [
                v.spec.scope,
                v.spec.name,
                phase,
                v.status.host or "-",
                resources_text(v.spec.resources),
                v.spec.power or "running",
                v.domain.state or "-",
                reason or "",
            ]
        )
    return rows


def cmd_vm_create(c: Client, args: argparse.Namespace) -> None:
    vms: list[dict[str, Any]] = []
    if args.file:
        data = json.loads(Path(args.file).read_text())
        vms.extend(data if isinstance(data, list) else [data])
    names = list(args.names)
    if args.count:
        if len(names) != 1:
            raise InvalidInput("--count takes exactly one name prefix")
        names = [f"{names[0]}-{i}" for i in range(1, args.count + 1)]
    for name in names:
        scope, vm_name = ref(name, args.scope)
        vm: dict[str, Any] = {
            "scope": scope,
            "name": vm_name,
            "labels": kv(args.label, "label"),
            "resources": {"vcpus": args.vcpus, "memory_mib": args.memory, "disk_gib": args.disk},
            "ha_priority": args.ha,
            "power": "stopped" if args.stopped else "running",
        }
        if args.description:
            vm["description"] = args.description
        if args.migration:
            vm["migration"] = args.migration
        if args.image and args.kernel:
            raise InvalidInput("give --image or --kernel, not both")
        if args.image:
            vm["image"] = {"name": args.image}
        elif args.kernel:
            vm["image"] = {"kernel": args.kernel, "initrd": args.initrd, "cmdline": args.cmdline}
        if args.node:
            vm["node_affinity"] = {
                "required": [
                    {
                        "match_expressions": [
                            {"key": k, "operator": "In", "values": [v]}
                            for k, v in kv(args.node, "--node").items()
                        ]
                    }
                ]
            }
        vms.append(vm)
    if not vms:
        raise InvalidInput("name at least one VM (or --file)")
    request = pb.CreateVMsRequest(
        request_id=args.request_id or uuid.uuid4().hex, atomic=args.atomic
    )
    for vm in vms:
        request.vms.append(json_to_proto(vm, pb.VM))
    resp: pb.CreateVMsResponse = c.call("vm", "CreateVMs", request)

    def text() -> str:
        out = table(VM_HEADERS, _vm_rows(resp.vms))
        adm = admission_text(resp.admission)
        return out + ("\n" + adm if adm else "")

    emit(args, resp, text)


def cmd_vm_get(c: Client, args: argparse.Namespace) -> None:
    scope, name = ref(args.name, args.scope)
    view: pb.VMView = c.call("vm", "GetVM", pb.VMRef(scope=scope, name=name))

    def text() -> str:
        out = table(VM_HEADERS, _vm_rows([view]))
        details = [
            f"labels: {labels_text(view.spec.labels)}",
            f"ha_priority: {view.spec.ha_priority or 'medium'}",
            f"uid: {view.spec.uid or '-'}  epoch: {view.status.epoch}",
        ]
        if view.status.degraded:
            details.append(f"degraded: {', '.join(view.status.degraded)}")
        if view.domain.last_error:
            details.append(f"last error: {view.domain.last_error}")
        if view.status.start_failures:
            details.append(
                f"failed to start on {len(view.status.start_failures)} host(s) in a row"
                " (`hvplace vm start` clears the count and retries):"
            )
            details.extend(
                f"  {f.host} (epoch {f.epoch}): {f.reason}" for f in view.status.start_failures
            )
        if view.status.HasField("explanation"):
            details.append(explanation_text(view.status.explanation))
        return out + "\n" + "\n".join(details)

    emit(args, view, text)


def cmd_vm_list(c: Client, args: argparse.Namespace) -> None:
    resp: pb.ListVMsResponse = c.call(
        "vm", "ListVMs", pb.ListVMsRequest(scope=args.scope, host=args.host, phase=args.phase)
    )
    emit(args, resp, lambda: table(VM_HEADERS, _vm_rows(resp.vms)))


def cmd_vm_delete(c: Client, args: argparse.Namespace) -> None:
    scope, name = ref(args.name, args.scope)
    resp = c.call("vm", "DeleteVM", pb.DeleteVMRequest(scope=scope, name=name))
    emit(args, resp, lambda: f"deleted {scope}/{name}")


def _power(method: str) -> Callable[[Client, argparse.Namespace], None]:
    def run(c: Client, args: argparse.Namespace) -> None:
        scope, name = ref(args.name, args.scope)
        view: pb.VMView = c.call("vm", method, pb.VMRef(scope=scope, name=name))
        emit(args, view, lambda: table(VM_HEADERS, _vm_rows([view])))

    return run


def cmd_vm_explain(c: Client, args: argparse.Namespace) -> None:
    scope, name = ref(args.name, args.scope)
    e: pb.Explanation = c.call("vm", "ExplainVM", pb.VMRef(scope=scope, name=name))
    emit(args, e, lambda: explanation_text(e))


def register(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    vm = top.add_parser("vm", help="create, inspect and power VMs").add_subparsers(
        dest="cmd", required=True
    )
    p = vm.add_parser(
        "create", help="create VMs (one batch); placed at once or left pending with a reason"
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="VM names (or SCOPE/NAME)")
    add_scope(p)
    p.add_argument("--count", type=int, help="create NAME-1..NAME-COUNT")
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--memory", type=int, default=512, metavar="MIB")
    p.add_argument("--disk", type=int, default=0, metavar="GIB")
    p.add_argument("--label", action="append", metavar="KEY=VALUE", help="VM label (repeatable)")
    p.add_argument(
        "--node", action="append", metavar="KEY=VALUE", help="required host label (repeatable)"
    )
    p.add_argument(
        "--ha", choices=["high", "medium", "low", "off"], default="medium", help="HA priority"
    )
    p.add_argument("--stopped", action="store_true", help="create powered off")
    p.add_argument("--image", help="a catalogue image's name (`hvplace image list`)")
    p.add_argument("--kernel", help="direct kernel boot: kernel path on the hosts")
    p.add_argument("--initrd", default="")
    p.add_argument("--cmdline", default="")
    p.add_argument("--description")
    p.add_argument(
        "--migration",
        choices=("live", "live_or_restart", "restart"),
        help="how a drain moves it: live (default), live else a cold restart, or cold only",
    )
    p.add_argument("--file", help="JSON file with a VM or a list of VMs (proto field names)")
    p.add_argument("--atomic", action="store_true", help="all placed or none created")
    p.add_argument("--request-id", help="idempotency key; a retry with it creates nothing new")
    p.set_defaults(func=cmd_vm_create)
    for name, func, what in (
        ("get", cmd_vm_get, "show a VM, its status and where it runs"),
        ("delete", cmd_vm_delete, "delete a VM (its host stops it)"),
        ("start", _power("StartVM"), "set a VM's desired power to running"),
        ("stop", _power("StopVM"), "set a VM's desired power to stopped"),
        ("explain", cmd_vm_explain, "why a VM can or cannot go on each host"),
    ):
        p = vm.add_parser(name, help=what)
        p.add_argument("name", metavar="NAME")
        add_scope(p)
        p.set_defaults(func=func)
    maintenance.register_vm(vm)
    rebalance.register_vm(vm)
    p = vm.add_parser("list", help="list VMs")
    p.add_argument("--scope", default="", help="only this scope")
    p.add_argument("--host", default="", help="only VMs on this host")
    p.add_argument("--phase", default="", help="pending|scheduled|running|stopped|failed")
    p.set_defaults(func=cmd_vm_list)


def register_explain(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The top-level `hvplace explain`, the same as `hvplace vm explain`."""
    p = top.add_parser("explain", help="why a VM can or cannot go on each host (as vm explain)")
    p.add_argument("name", metavar="NAME")
    add_scope(p)
    p.set_defaults(func=cmd_vm_explain)
