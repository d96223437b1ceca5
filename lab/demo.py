"""`hvplace lab demo`: the product in two minutes on one machine.

Starts the lab (etcd, two coordinators, four namespaced hosts with their own libvirtd and
real QEMU guests), creates a dozen VMs under rules from two seeds, prints where they
landed, kills the host holding the most rule members, shows the VMs re-placed with every
rule intact and how long it took, then says how to look around and how to tear down.
The lab stays up for that.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Callable
from typing import TextIO

from hvplace.lab import observe, workload
from hvplace.lab.control import Lab, LabError
from hvplace.lab.daemons import cluster_budget
from hvplace.lab.observe import ClusterState
from hvplace.lab.state import LabSettings, load_state

HOSTS = 4


class Progress:
    """One status line, redrawn in place on a terminal, printed every few seconds otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.last_print = 0.0
        self.text = ""

    def update(self, text: str) -> None:
        self.text = text
        if self.tty:
            self.out.write("\r\033[K" + text)
            self.out.flush()
        elif time.monotonic() - self.last_print > 2.0:
            self.out.write(text + "\n")
            self.last_print = time.monotonic()

    def done(self) -> None:
        if self.tty:
            self.out.write("\r\033[K" + self.text + "\n")
        else:
            self.out.write(self.text + "\n")
        self.out.flush()


def watch(
    endpoint: observe.Endpoint,
    done: Callable[[ClusterState], bool],
    line: Callable[[ClusterState, float], str],
    timeout: float,
    out: TextIO,
    started: float | None = None,
) -> ClusterState:
    """Poll the cluster, redrawing `line` until `done` (or raise after `timeout`)."""
    progress = Progress(out)
    started = time.time() if started is None else started
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = observe.read_cluster(endpoint)
        except observe.ObserveError:
            time.sleep(0.1)
            continue
        progress.update(line(state, time.time() - started))
        if done(state):
            progress.done()
            return state
        if time.monotonic() > deadline:
            progress.done()
            raise LabError(f"gave up after {timeout:.0f}s: {progress.text.strip()}")
        time.sleep(0.1)


def run(settings: LabSettings, replace: bool, out: TextIO = sys.stdout) -> int:
    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    def heading(text: str) -> None:
        say()
        say(f"\033[1m== {text}\033[0m" if out.isatty() else f"== {text}")

    if os.geteuid() != 0:
        raise LabError("the demo runs real QEMU guests in namespaced hosts: run it as root")
    lab = Lab(settings, out=out)
    if load_state(settings) is not None:
        if not replace:
            raise LabError(
                f"a lab is running ({settings.state_file}); `hvplace lab down` it or pass --replace"
            )
        heading("Removing the previous lab")
        lab.down()

    heading(f"Starting the lab: etcd, two coordinators, {HOSTS} hosts with their own libvirtd")
    lab.up(HOSTS, "real")
    state = lab.state()
    etcd = lab.etcd_endpoint()
    budget = cluster_budget(state.lease_ttl)

    heading("Creating rules and VMs, as an operator would type them")
    say("G8 (seed 000): scope `cloudspace` spreads same-label VMs over at least 2 hosts.")
    say("Exoscale (seed 001): anti-affinity groups in scope `acme`: db-1..3 never share a")
    say("hypervisor; cache-1 and cache-2 never share a rack (h1+h2 are rack r1, h3+h4 r2).")
    keys = workload.create(lab, echo=say)

    heading("Waiting for the guests to boot (QEMU under TCG)")
    started = time.time()
    before = watch(
        etcd,
        workload.all_running(keys),
        lambda s, t: (
            f"  {sum(workload.all_running([k])(s) for k in keys)}/{len(keys)}"
            f" VMs running  ({t:.1f}s)"
        ),
        180,
        out,
        started,
    )
    say(workload.hvplace(lab, "vm", "list"))
    say(workload.hvplace(lab, "rule", "list"))
    say(workload.hvplace(lab, "policy", "get", workload.G8))

    victim = workload.pick_victim(before, keys)
    moving = sorted(k for k in keys if before.host_of(k) == victim)
    heading(f"Killing host {victim} (kill -9 its agent, libvirtd and every QEMU)")
    say(f"It runs {len(moving)} VMs: {', '.join(moving)}.")
    say(
        f"Timing budget: lease TTL {budget.lease_ttl_s:g}s, agents fence after"
        f" {budget.fence_after_s:g}s, re-placement {budget.failover_delay_s:g}s after the"
        " lease expires."
    )
    killed_at = time.time()
    lab.kill_host(victim)

    def moved(s: ClusterState) -> bool:
        return (
            s.lost(victim)
            and workload.all_running(moving)(s)
            and all(s.host_of(k) != victim for k in moving)
        )

    def line(s: ClusterState, t: float) -> str:
        state_text = "LOST" if s.lost(victim) else "lease alive"
        assigned = sum(1 for k in moving if s.host_of(k) not in (None, victim))
        running = sum(1 for k in moving if s.host_of(k) not in (None, victim) and s.running_on(k))
        return (
            f"  t+{t:4.1f}s  {victim}: {state_text:11}  re-placed {assigned}/{len(moving)}"
            f"  running again {running}/{len(moving)}"
        )

    after = watch(etcd, moved, line, 120, out, killed_at)
    detect = after.host_status[victim].since - killed_at
    reassigned = max(after.vm_status[k].since for k in moving) - killed_at
    running = (
        max(d.since for k in moving for d in after.domains[k] if d.host == after.host_of(k))
        - killed_at
    )

    heading("After the failure")
    say(workload.hvplace(lab, "vm", "list"))
    say(workload.hvplace(lab, "rule", "list"))
    say(workload.hvplace(lab, "policy", "get", workload.G8))
    where = {k: after.running_on(k) for k in keys}
    broken = observe.anti_affinity_violations(after.rules, where, before.host_labels(), after.vms)
    twice = [k for k, hosts in where.items() if len(hosts) > 1]
    say(f"{victim} marked lost after {detect:.1f}s; its {len(moving)} VMs re-placed after")
    say(f"{reassigned:.1f}s and running again (per their agents) after {running:.1f}s.")
    say(
        "Required rules broken: "
        + (", ".join(broken) if broken else "none")
        + "; VMs running twice: "
        + (", ".join(twice) if twice else "none")
        + "."
    )
    say(
        "For comparison, default failure detection: vSphere HA declares a host failed after"
        " 15 s, Nomad about 20 s, Proxmox HA about 2 minutes, KubeVirt minutes."
    )

    heading("Look around (the lab stays up)")
    host = state.hosts["h2"]
    bin_dir = os.path.dirname(sys.executable)
    say(f"  sudo -s; export PATH={bin_dir}:$PATH")
    say('  eval "$(hvplace lab env)"        # endpoints, the CA, the admin token, etcd root')
    say("  hvplace vm list; hvplace host list; hvplace cluster status")
    say("  hvplace vm explain acme/db-1; hvplace simulate --fail h2")
    say(f"  virsh -c {shlex.quote(host.root_side_uri)} list   # h2's own libvirtd")
    say("  etcdctl get --prefix /hvplace/v1/ --keys-only")
    say(f"  hvplace lab status; hvplace lab start-host {victim}")
    say("  hvplace lab kill-host h2 | partition h3 | heal h3 | kill-leader | kill-etcd")
    say("Tear down (every process, namespace, domain and file): hvplace lab down")
    return 0 if not broken and not twice else 1
