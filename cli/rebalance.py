"""CLI commands of the rebalancer and labels: `hvplace rebalance --preview | --apply
[--max-moves N]`, `hvplace host label H k=v ... [k-] [--rebalance]` and `hvplace vm label
SCOPE/NAME k=v ... [k-]`."""

from __future__ import annotations

import argparse
from typing import Any

from hvplace.cli.client import Client
from hvplace.cli.render import add_scope, emit, ref, table
from hvplace.proto.errors import InvalidInput
from hvplace.proto.v1 import hvplace_pb2 as pb

MOVES_TIMEOUT_S = 900.0
"""Calls that move VMs wait for them (each a stop and a start): at least this long."""


def wait_for_moves(c: Client, moving: bool) -> None:
    """A call that moves VMs waits for them: at least MOVES_TIMEOUT_S."""
    if moving:
        c.timeout = max(c.timeout, MOVES_TIMEOUT_S)


def rebalance_text(resp: pb.RebalanceResponse) -> str:
    rows: list[list[object]] = []
    for m in resp.moves:
        state = ("done" if m.done else f"FAILED: {m.error}") if resp.applied else "planned"
        rows.append([m.vm, m.source, m.target, state, m.why])
    out = [table(("VM", "FROM", "TO", "STATE", "WHY"), rows) if rows else "no moves needed"]
    if resp.broken:
        proof = "fewest possible" if resp.minimal else "not proven fewest (search budget)"
        out.append(f"repairs {', '.join(resp.broken)} with {resp.repair_moves} move(s) ({proof})")
    out.extend(f"cannot repair {k}: {v}" for k, v in sorted(resp.unrepaired.items()))
    if resp.improved:
        out.append(f"improves preferred {', '.join(resp.improved)}")
    if resp.truncated:
        out.append(f"{resp.truncated} more move(s) left for later by --max-moves")
    return "\n".join(out)


def cmd_rebalance(c: Client, args: argparse.Namespace) -> None:
    request = pb.RebalanceRequest(max_moves=args.max_moves)
    method = "Rebalance" if args.apply else "PreviewRebalance"
    wait_for_moves(c, args.apply)
    resp: pb.RebalanceResponse = c.call("cluster", method, request)
    emit(args, resp, lambda: rebalance_text(resp))


def parse_labels(items: list[str]) -> tuple[dict[str, str], list[str]]:
    """`k=v` sets, `k-` removes."""
    set_labels: dict[str, str] = {}
    remove: list[str] = []
    for item in items:
        key, sep, value = item.partition("=")
        if sep and key:
            set_labels[key] = value
        elif item.endswith("-") and len(item) > 1:
            remove.append(item[:-1])
        else:
            raise InvalidInput(f"label {item!r} must be KEY=VALUE or KEY- (to remove)")
    return set_labels, remove


def cmd_host_label(c: Client, args: argparse.Namespace) -> None:
    from hvplace.cli.hosts import HOST_HEADERS, _host_rows  # hosts registers this module

    set_labels, remove = parse_labels(args.labels)
    request = pb.LabelHostRequest(
        name=args.host, set=set_labels, remove=remove, rebalance=args.rebalance
    )
    wait_for_moves(c, args.rebalance)
    view: pb.HostView = c.call("host", "LabelHost", request)

    def text() -> str:
        out = table(HOST_HEADERS, _host_rows([view]))
        if view.status.labels:
            labels = ",".join(f"{k}={v}" for k, v in sorted(view.status.labels.items()))
            out += f"\noperator labels: {labels}"
        return out

    emit(args, view, text)


def cmd_vm_label(c: Client, args: argparse.Namespace) -> None:
    scope, name = ref(args.name, args.scope)
    set_labels, remove = parse_labels(args.labels)
    request = pb.LabelVMRequest(scope=scope, name=name, set=set_labels, remove=remove)
    view: pb.VMView = c.call("vm", "LabelVM", request)
    labels = ",".join(f"{k}={v}" for k, v in sorted(view.spec.labels.items())) or "-"
    emit(args, view, lambda: f"{view.spec.scope}/{view.spec.name} labels: {labels}")


def register_vm(vm: Any) -> None:
    """`vm label`, under `vm`'s subparsers."""
    p = vm.add_parser("label", help="set (k=v) or remove (k-) a VM's labels")
    p.add_argument("name", metavar="NAME")
    add_scope(p)
    p.add_argument("labels", nargs="+", metavar="KEY=VALUE|KEY-")
    p.set_defaults(func=cmd_vm_label)


def register_host(host: Any) -> None:
    """`host label`, under `host`'s subparsers."""
    p = host.add_parser("label", help="set (k=v) or remove (k-) operator labels of a host")
    p.add_argument("host", metavar="HOST")
    p.add_argument("labels", nargs="+", metavar="KEY=VALUE|KEY-")
    p.add_argument(
        "--rebalance",
        action="store_true",
        help="move VMs until every required rule holds under the new labels",
    )
    p.set_defaults(func=cmd_host_label)


def register(top: Any) -> None:
    """`rebalance`, under the top-level parser."""
    p = top.add_parser(
        "rebalance", help="the fewest moves repairing broken rules, then preferred ones"
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--preview", action="store_true", help="print the moves; change nothing")
    mode.add_argument("--apply", action="store_true", help="carry the moves out")
    p.add_argument("--max-moves", type=int, default=0, help="at most this many moves (0: all)")
    p.set_defaults(func=cmd_rebalance)
