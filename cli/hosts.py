"""`hvplace host ...`: hosts, their usage and maintenance (cordon, drain)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable

from hvplace.cli import maintenance, rebalance
from hvplace.cli.client import Client
from hvplace.cli.render import emit, labels_text, table
from hvplace.proto.v1 import hvplace_pb2 as pb

HOST_HEADERS = ("NAME", "STATE", "ALIVE", "LABELS", "VCPUS", "MEMORY_MIB", "DISK_GIB", "VMS")


def _host_rows(views: Iterable[pb.HostView]) -> list[list[object]]:
    return [
        [
            h.info.name,
            h.status.state or "ready",
            "yes" if h.alive else "no",
            labels_text(h.info.labels),
            f"{h.used.vcpus}/{h.allocatable.vcpus}",
            f"{h.used.memory_mib}/{h.allocatable.memory_mib}",
            f"{h.used.disk_gib}/{h.allocatable.disk_gib}",
            len(h.vms),
        ]
        for h in views
    ]


def cmd_host_list(c: Client, args: argparse.Namespace) -> None:
    resp: pb.ListHostsResponse = c.call("host", "ListHosts", pb.Empty())

    def text() -> str:
        out = table(HOST_HEADERS, _host_rows(resp.hosts))
        # Degraded and lost hosts say why under the table.
        notes = [
            f"{h.info.name}: {h.status.reason}"
            for h in resp.hosts
            if h.status.state in ("degraded", "lost") and h.status.reason
        ]
        return out + "".join(f"\n{n}" for n in notes)

    emit(args, resp, text)


def _host_call(method: str) -> Callable[[Client, argparse.Namespace], None]:
    def run(c: Client, args: argparse.Namespace) -> None:
        view: pb.HostView = c.call("host", method, pb.HostRef(name=args.host))

        def text() -> str:
            out = table(HOST_HEADERS, _host_rows([view]))
            if view.status.reason:
                out += f"\nreason: {view.status.reason}"
            if method == "GetHost" and view.vms:
                out += "\nvms: " + ", ".join(view.vms)
            return out

        emit(args, view, text)

    return run


def register(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    host = top.add_parser("host", help="hosts and maintenance").add_subparsers(
        dest="cmd", required=True
    )
    p = host.add_parser("list", help="list hosts with state and usage")
    p.set_defaults(func=cmd_host_list)
    for name, method, what in (
        ("get", "GetHost", "show a host and its VMs"),
        ("cordon", "CordonHost", "take no new VMs"),
        ("uncordon", "UncordonHost", "take VMs again"),
    ):
        p = host.add_parser(name, help=what)
        p.add_argument("host", metavar="HOST")
        p.set_defaults(func=_host_call(method))
    maintenance.register_host(host)
    rebalance.register_host(host)
