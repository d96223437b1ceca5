"""`hvplace lab ...`: start, inspect, break and remove the single-machine lab."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict

from hvplace.lab import chaos, demo
from hvplace.lab.control import Lab, LabError
from hvplace.lab.daemons import DaemonError
from hvplace.lab.hosts import HostError
from hvplace.lab.network import NetworkError
from hvplace.lab.state import LabSettings
from hvplace.lab.workload import WorkloadError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hvplace lab",
        description="A single-machine hvplace lab: etcd, two coordinators and N hosts.",
    )
    parser.add_argument(
        "--state-dir",
        help="where the lab keeps its state (env HVPLACE_LAB_DIR; /var/lib/hvplace-lab)",
    )
    parser.add_argument(
        "--prefix",
        help="prefix of the lab's netns, bridge and veth names (env HVPLACE_LAB_PREFIX; hvlab)",
    )
    parser.add_argument(
        "--subnet", help="the lab's private subnet (env HVPLACE_LAB_SUBNET; 10.213.0.0/24)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start etcd, two coordinators and N hosts with their agents")
    up.add_argument("--hosts", type=int, default=3, help="number of hosts (default 3)")
    kind = up.add_mutually_exclusive_group()
    kind.add_argument(
        "--real",
        dest="mode",
        action="store_const",
        const="real",
        help="namespaced hosts with libvirtd and QEMU (root; the default as root)",
    )
    kind.add_argument(
        "--test",
        dest="mode",
        action="store_const",
        const="test",
        help="hosts on libvirt's test:/// driver (no root needed)",
    )
    up.add_argument(
        "--ttl", type=float, help="host lease TTL in seconds for agents and coordinators"
    )
    up.add_argument(
        "--etcd-members",
        type=int,
        default=1,
        help="etcd members, each its own process (default 1; 3 survives losing one)",
    )
    up.add_argument(
        "--only",
        choices=("all", "etcd", "hosts"),
        default="all",
        help="start less: hosts (network and libvirtd) alone, or hosts and etcd",
    )

    status = sub.add_parser("status", help="processes, hosts and the leader")
    status.add_argument("--json", action="store_true")
    sub.add_parser("down", help="remove every process, namespace, link, mount and file of the lab")
    for name, text in (
        ("kill-host", "kill -9 a host's agent, libvirtd and QEMU processes"),
        ("start-host", "restart a killed host's libvirtd and agent"),
        ("partition", "cut a host's network"),
        ("heal", "restore a host's network"),
    ):
        sub.add_parser(name, help=text).add_argument("host")
    for name, text in (
        ("kill-agent", "kill -9 a host's agent alone (its guests keep running)"),
        ("start-agent", "start a killed agent again"),
        ("kill-libvirtd", "kill -9 a real host's libvirtd alone (its guests keep running)"),
        ("start-libvirtd", "start a killed libvirtd again"),
    ):
        sub.add_parser(name, help=text).add_argument("host")
    sub.add_parser("kill-coordinators", help="kill -9 every coordinator")
    sub.add_parser(
        "start-coordinator", help="start a killed coordinator again (a new name adds one)"
    ).add_argument("name")
    sub.add_parser("kill-leader", help="kill -9 the leading coordinator")
    for name, text in (
        ("kill-etcd", "kill -9 etcd, every member or --member N (its data stays)"),
        ("restart-etcd", "start the killed etcd members (or --member N) again on the same URLs"),
    ):
        sub.add_parser(name, help=text).add_argument(
            "--member", type=int, help="only this member (1-based, as `status` lists them)"
        )
    sub.add_parser("env", help='shell exports for this lab: eval "$(hvplace lab env)"')
    demo = sub.add_parser(
        "demo", help="start a real lab, place VMs under rules, kill a host, show the failover"
    )
    demo.add_argument(
        "--replace", action="store_true", help="take down a lab already running first"
    )
    chaos_p = sub.add_parser(
        "chaos",
        help="fault campaign: a lab of its own, random faults, an independent checker",
        description="Starts a lab of its own (its own prefix, subnet and state dir, beside"
        " any running lab), runs the workload, injects seeded random faults one at a time"
        " and overlapping, checks every 100 ms sample, takes the lab down. Prints a table"
        " and one JSON line; exits 1 when an invariant broke.",
    )
    chaos_p.add_argument("--faults", type=int, default=10, help="how many faults (default 10)")
    chaos_p.add_argument("--seed", type=int, default=1, help="the RNG seed (default 1)")
    chaos_p.add_argument("--hosts", type=int, default=4, help="lab hosts (default 4)")
    chaos_kind = chaos_p.add_mutually_exclusive_group()
    chaos_kind.add_argument(
        "--real",
        dest="mode",
        action="store_const",
        const="real",
        help="namespaced hosts with QEMU guests (root; the default as root)",
    )
    chaos_kind.add_argument(
        "--test", dest="mode", action="store_const", const="test", help="test:/// hosts"
    )
    chaos_p.add_argument(
        "--kinds",
        help=f"comma-separated fault kinds ({', '.join(chaos.KINDS)}; 'all' for every one);"
        " default: the kinds that pass today",
    )
    chaos_p.add_argument("--ttl", type=float, help="host lease TTL of the campaign's lab")
    chaos_p.add_argument("--max-time", type=float, help="stop injecting after this many seconds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        settings = LabSettings.from_env(args.state_dir, args.prefix, args.subnet)
        lab = Lab(settings)
        if args.command == "up":
            mode = args.mode or ("real" if os.geteuid() == 0 else "test")
            lab.up(args.hosts, mode, args.ttl, only=args.only, etcd_members=args.etcd_members)
            _print_status(lab, as_json=False)
        elif args.command == "status":
            _print_status(lab, as_json=args.json)
        elif args.command == "down":
            return 1 if lab.down() else 0
        elif args.command == "kill-host":
            lab.kill_host(args.host)
        elif args.command == "start-host":
            lab.start_host(args.host)
        elif args.command == "partition":
            lab.partition(args.host)
        elif args.command == "heal":
            lab.heal(args.host)
        elif args.command == "kill-agent":
            lab.kill_agent(args.host)
        elif args.command == "start-agent":
            lab.start_agent(args.host)
        elif args.command == "kill-libvirtd":
            lab.kill_libvirtd(args.host)
        elif args.command == "start-libvirtd":
            lab.start_libvirtd(args.host)
        elif args.command == "kill-coordinators":
            lab.kill_coordinators()
        elif args.command == "start-coordinator":
            lab.start_coordinator(args.name)
        elif args.command == "chaos":
            return _chaos(args)
        elif args.command == "kill-leader":
            lab.kill_leader()
        elif args.command == "kill-etcd":
            lab.kill_etcd(args.member)
        elif args.command == "restart-etcd":
            lab.restart_etcd(args.member)
        elif args.command == "demo":
            return demo.run(settings, args.replace)
        elif args.command == "env":
            for key, value in lab.env().items():
                print(f"export {key}={shlex.quote(value)}")
    except (
        LabError,
        DaemonError,
        HostError,
        NetworkError,
        WorkloadError,
        chaos.ChaosError,
        ValueError,
    ) as exc:
        print(f"hvplace lab: {exc}", file=sys.stderr)
        return 1
    return 0


def _chaos(args: argparse.Namespace) -> int:
    mode = args.mode or ("real" if os.geteuid() == 0 else "test")
    kinds = None
    if args.kinds:
        kinds = list(chaos.KINDS) if args.kinds == "all" else args.kinds.split(",")
    report = chaos.run_campaign(
        args.faults,
        args.seed,
        mode,
        hosts=args.hosts,
        kinds=kinds,
        lease_ttl=args.ttl,
        max_time_s=args.max_time,
    )
    chaos.print_report(report, sys.stdout)
    return 0 if report.passed else 1


def _print_status(lab: Lab, as_json: bool) -> None:
    rows = lab.status()
    if as_json:
        print(json.dumps([asdict(row) for row in rows], indent=2))
        return
    table = [("COMPONENT", "NAME", "PID", "ALIVE", "DETAIL")]
    table += [
        (
            r.component,
            r.name,
            "-" if r.pid is None else str(r.pid),
            "-" if r.alive is None else "yes" if r.alive else "NO",
            r.detail,
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True))
            + "  "
            + row[4]
        )
