"""The lab's operations: up, down, status and the failures it injects, over the state file."""

from __future__ import annotations

import ipaddress
import os
import random
import shlex
import shutil
import signal
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

from hvplace.lab import daemons, hosts, network, secure
from hvplace.lab.observe import EtcdAccess
from hvplace.lab.processes import (
    ProcessRecord,
    is_alive,
    kill9,
    kill_pid,
    namespace_inode,
    pids_in_namespace,
    spawn_detached,
    tail,
    wait_gone,
)
from hvplace.lab.state import EtcdMemberRecord, HostRecord, LabSettings, LabState, load_state

Only = Literal["all", "etcd", "hosts"]

REAL_TOOLS = ("ip", "unshare", "nsenter", "libvirtd", "virtlogd", "virsh")

# Paths a lab must never live under: each is hidden inside a host by a bind mount.
_SHADOWED = tuple(Path(p) for p in hosts.BIND_MOUNTS.values())


class LabError(RuntimeError):
    pass


def scratch_settings(state_dir: Path, prefix: str = "hvs") -> LabSettings:
    """Settings for a throwaway lab (tests, benchmarks) beside any running one: a random
    name prefix and a free /24 under 10.213.0.0/16 other than the default lab's."""
    rng = random.SystemRandom()
    prefix = prefix + "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(4))
    for _ in range(50):
        subnet = ipaddress.IPv4Network(f"10.213.{rng.randrange(100, 250)}.0/24")
        if os.geteuid() != 0 or not network.subnet_conflicts(subnet):
            return LabSettings(state_dir=state_dir, prefix=prefix, subnet=subnet)
    raise LabError("no free subnet under 10.213.0.0/16")


@dataclass(frozen=True)
class StatusRow:
    component: str
    name: str
    pid: int | None
    alive: bool | None  # None: a row about something that is not a process
    detail: str


class Lab:
    """One lab, named by its settings; every method re-reads the state file."""

    def __init__(self, settings: LabSettings, out: TextIO | None = None) -> None:
        self.settings = settings
        self.out = out if out is not None else sys.stderr

    # -- progress -------------------------------------------------------------------

    def say(self, message: str) -> None:
        print(message, file=self.out, flush=True)

    @contextmanager
    def step(self, message: str) -> Iterator[None]:
        self.say(f"==> {message} ...")
        started = time.monotonic()
        yield
        self.say(f"    done in {time.monotonic() - started:.1f}s")

    # -- up -------------------------------------------------------------------------

    def up(
        self,
        host_count: int,
        mode: str = "real",
        lease_ttl: float | None = None,
        only: Only = "all",
        etcd_members: int = 1,
    ) -> LabState:
        """Start the lab (`only`: hosts alone, hosts and etcd, or all); on failure undo and raise."""
        if mode not in ("real", "test"):
            raise LabError(f"mode must be real or test, not {mode!r}")
        if not 1 <= host_count <= 40:
            raise LabError("--hosts must be between 1 and 40")
        if only not in ("all", "etcd", "hosts"):
            raise LabError(f"only must be all, etcd or hosts, not {only!r}")
        if not 1 <= etcd_members <= 7:
            raise LabError("--etcd-members must be between 1 and 7")
        self._preflight(mode, only != "hosts")
        state = LabState(
            prefix=self.settings.prefix,
            subnet=str(self.settings.subnet),
            mode=mode,
            lease_ttl=lease_ttl,
        )
        state.save(self.settings)
        started = time.monotonic()
        try:
            self._up(state, host_count, only, etcd_members)
        except BaseException as exc:
            self.say(f"!! lab up failed: {exc}; tearing down what was made")
            self.down()
            raise
        self.say(f"lab up: {host_count} {mode} host(s) in {time.monotonic() - started:.1f}s")
        return state

    def _preflight(self, mode: str, with_etcd: bool) -> None:
        existing = load_state(self.settings)
        if existing is not None:
            raise LabError(
                f"a lab is already recorded in {self.settings.state_file}; run `hvplace lab down` first"
            )
        state_dir = self.settings.state_dir.resolve()
        for shadowed in _SHADOWED:
            if state_dir == shadowed or shadowed in state_dir.parents:
                raise LabError(f"the lab state dir may not be under {shadowed}")
        tools = list(REAL_TOOLS) if mode == "real" else []
        if with_etcd:
            tools += ["etcd", "etcdctl"]
        missing = [tool for tool in tools if shutil.which(tool) is None]
        if missing:
            raise LabError(
                f"missing programs: {', '.join(missing)} (install them with lab/install.sh)"
            )
        if mode == "real":
            if os.geteuid() != 0:
                raise LabError(
                    "a real lab needs root (namespaces, libvirtd); use --test without root"
                )
            conflicts = network.subnet_conflicts(self.settings.subnet)
            if conflicts:
                raise LabError(f"subnet {self.settings.subnet} is already in use: {conflicts}")
            if network.link_exists(self.settings.bridge):
                raise LabError(
                    f"bridge {self.settings.bridge} already exists; run `hvplace lab down`"
                )

    def _up(self, state: LabState, host_count: int, only: Only, etcd_members: int = 1) -> None:
        settings = self.settings
        if state.mode == "real":
            with self.step("preparing the machine (libvirt-qemu user, bind-mount targets)"):
                hosts.ensure_qemu_user()
                for target in hosts.missing_mount_targets():
                    # Recorded before it is made, so `down` removes it even if this fails.
                    state.created_dirs.append(target)
                    state.save(settings)
                    Path(target).mkdir(parents=True)
            with self.step(f"creating bridge {settings.bridge} ({settings.bridge_address})"):
                state.bridge = settings.bridge
                state.save(settings)
                network.create_bridge(settings.bridge, settings.bridge_address)
        if state.mode == "real" and only == "all":
            with self.step("building the tiny guest image (cached after the first time)"):
                state.guest_image = daemons.build_guest_image()
                state.save(settings)
        if only != "hosts":
            what = "etcd" if etcd_members == 1 else f"{etcd_members} etcd members"
            with self.step(f"starting {what}"):
                daemons.start_etcd(settings, state, members=etcd_members)
                state.save(settings)
        for index in range(1, host_count + 1):
            host = self._new_host(state, index)
            if state.mode == "real":
                with self.step(f"starting host {host.name} (netns {host.netns}, {host.address})"):
                    self._start_real_host(host, state)
            else:
                hostdir = Path(host.dir)
                hostdir.mkdir(parents=True, exist_ok=True)
                (hostdir / "node.xml").write_text(daemons.test_node_xml(host.name))
        if only == "all":
            for index, name in enumerate(("c1", "c2"), start=1):
                with self.step(
                    f"starting coordinator {name}" + (" (standby)" if index > 1 else "")
                ):
                    daemons.start_coordinator(settings, state, name)
                    state.save(settings)
            for host in state.hosts.values():
                with self.step(f"starting the agent of {host.name}"):
                    daemons.start_agent(settings, state, host)
                    state.save(settings)
            with self.step("waiting for the agents to register and a leader to be elected"):
                daemons.wait_ready(state, timeout=60.0)
            if state.guest_image:
                with self.step(
                    f"adding the guest image to the catalogue as {daemons.GUEST_IMAGE_NAME!r}"
                ):
                    daemons.register_guest_image(state, self.env())

    def _new_host(self, state: LabState, index: int) -> HostRecord:
        settings = self.settings
        name = settings.host_name(index)
        hostdir = settings.host_dir(name)
        if state.mode == "real":
            host = HostRecord(
                name=name,
                index=index,
                mode="real",
                dir=str(hostdir),
                libvirt_uri="qemu:///system",
                address=str(settings.host_address(index)),
                netns=settings.netns(index),
                veth=settings.veth_root(index),
            )
        else:
            host = HostRecord(
                name=name,
                index=index,
                mode="test",
                dir=str(hostdir),
                libvirt_uri=f"test://{hostdir / 'node.xml'}",
            )
        state.hosts[name] = host
        state.save(settings)
        return host

    def _start_real_host(self, host: HostRecord, state: LabState) -> None:
        hosts.create_network(self.settings, host)
        state.save(self.settings)
        script = hosts.prepare(host)
        first = next(iter(state.hosts.values()))
        if first is not host:
            hosts.seed_capabilities(host, hosts.capabilities_dir(first))
        host.supervisor = hosts.start_supervisor(host, script)
        state.save(self.settings)
        host.virtlogd, host.libvirtd = hosts.start_libvirt(host)
        state.save(self.settings)

    # -- down -----------------------------------------------------------------------

    def down(self) -> list[str]:
        """Undo everything the state file records, and sweep our names; idempotent."""
        started = time.monotonic()
        problems: list[str] = []
        state = load_state(self.settings)
        if state is not None:
            with self.step("stopping agents and coordinators"):
                records = [h.agent for h in state.hosts.values()]
                records += [c.process for c in state.coordinators]
                pids = [r.pid for r in records if r is not None and kill9(r)]
                wait_gone(pids)
            for host in state.hosts.values():
                with self.step(f"removing host {host.name}"):
                    problems += hosts.teardown(host)
            etcd = state.etcd_processes()
            if etcd:
                with self.step("stopping etcd"):
                    wait_gone([r.pid for r in etcd if kill9(r)])
        problems += self._sweep_network()
        if state is not None:
            for target in reversed(state.created_dirs):
                try:
                    Path(target).rmdir()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    # Something else (a system libvirtd) now uses it: not ours to remove.
                    self.say(f"    left {target}: {exc.strerror}")
        shutil.rmtree(self.settings.state_dir, ignore_errors=True)
        if self.settings.state_dir.exists():
            problems.append(f"could not remove {self.settings.state_dir}")
        for problem in problems:
            self.say(f"!! {problem}")
        self.say(f"lab down in {time.monotonic() - started:.1f}s")
        return problems

    def _sweep_network(self) -> list[str]:
        """Our netns and links, by the lab's prefix: catches what a lost state file forgot."""
        problems: list[str] = []
        if os.geteuid() != 0 or shutil.which("ip") is None:
            return problems
        prefix = self.settings.prefix + "-"
        for netns in network.netns_list():
            if netns.startswith(prefix):
                inode = namespace_inode(f"/run/netns/{netns}")
                if inode is not None:
                    pids = pids_in_namespace("net", inode)
                    for pid in pids:
                        kill_pid(pid)
                    wait_gone(pids)
                network.delete_netns(netns)
        for link in network.links_with_prefix(prefix):
            network.delete_link(link)
        left = [n for n in network.netns_list() if n.startswith(prefix)]
        left += network.links_with_prefix(prefix)
        if left:
            problems.append(f"still present: {left}")
        return problems

    # -- inspection and failures ----------------------------------------------------

    def state(self) -> LabState:
        state = load_state(self.settings)
        if state is None:
            raise LabError(f"no lab in {self.settings.state_dir}; start one with `hvplace lab up`")
        return state

    def host(self, name: str) -> tuple[LabState, HostRecord]:
        state = self.state()
        if name not in state.hosts:
            raise LabError(f"no host {name!r} in the lab (hosts: {', '.join(state.hosts)})")
        return state, state.hosts[name]

    def status(self) -> list[StatusRow]:
        state = self.state()
        rows: list[StatusRow] = []
        for member in state.etcd_members:
            proc = member.process
            rows.append(
                StatusRow(
                    "etcd",
                    member.name,
                    None if proc is None else proc.pid,
                    is_alive(proc),
                    " ".join(member.client_urls),
                )
            )
        etcd_up = any(is_alive(m.process) for m in state.etcd_members)
        leader = daemons.leader_name(state) if etcd_up else None
        for coordinator in state.coordinators:
            role = "leader" if coordinator.name == leader else "standby"
            proc = coordinator.process
            rows.append(
                StatusRow(
                    "coordinator",
                    coordinator.name,
                    None if proc is None else proc.pid,
                    is_alive(proc),
                    f"{role} api={coordinator.api_address}"
                    f" metrics=http://{coordinator.metrics_address}/metrics",
                )
            )
        try:
            registered = set(daemons.registered_hosts(state)) if etcd_up else set()
        except (daemons.DaemonError, subprocess.TimeoutExpired):
            registered = set()
        for host in state.hosts.values():
            detail = host.mode
            if host.mode == "real":
                detail += f" {host.address}" + (" PARTITIONED" if host.partitioned else "")
            if etcd_up:
                detail += " registered" if host.name in registered else " NOT registered"
            # What an operator types to look at this host's libvirt from the root namespace.
            detail += f" virsh -c {shlex.quote(host.root_side_uri)}"
            if host.metrics_address:
                detail += f" metrics=http://{host.metrics_address}/metrics"
            rows.append(StatusRow("host", host.name, None, None, detail))
            for record in host.processes():
                rows.append(StatusRow(record.role, host.name, record.pid, is_alive(record), ""))
            if host.mode == "real":
                qemu = hosts.qemu_pids(host)
                rows.append(StatusRow("qemu", host.name, None, None, f"{len(qemu)} running {qemu}"))
        return rows

    def kill_host(self, name: str) -> list[int]:
        state, host = self.host(name)
        if host.mode == "real":
            killed = hosts.crash(host)
        else:
            killed = [host.agent.pid] if host.agent is not None and kill9(host.agent) else []
        state.save(self.settings)
        self.say(f"killed host {name}: PIDs {killed}")
        return killed

    def start_host(self, name: str) -> None:
        """Bring a killed host back: its libvirtd (which finds its dead domains) and agent."""
        state, host = self.host(name)
        if host.mode == "real":
            if not is_alive(host.supervisor):
                raise LabError(f"host {name}: its namespaces are gone; recreate the lab")
            if not is_alive(host.libvirtd):
                kill9(host.virtlogd)
                with self.step(f"starting libvirtd of {name}"):
                    host.virtlogd, host.libvirtd = hosts.start_libvirt(host)
                    state.save(self.settings)
        if state.coordinators and not is_alive(host.agent):
            with self.step(f"starting the agent of {name}"):
                daemons.start_agent(self.settings, state, host)
                state.save(self.settings)

    def partition(self, name: str) -> None:
        self._set_partition(name, True)

    def heal(self, name: str) -> None:
        self._set_partition(name, False)

    def _set_partition(self, name: str, cut: bool) -> None:
        state, host = self.host(name)
        if host.mode == "real":
            assert host.veth is not None
            network.set_link_up(host.veth, not cut)
        else:
            # A test host has no network of its own: freezing its agent stops the lease
            # renewals the same way, though its open connections do not break.
            if host.agent is None or not is_alive(host.agent):
                raise LabError(f"host {name}: no agent running")
            kill_pid(host.agent.pid, signal.SIGSTOP if cut else signal.SIGCONT)
        host.partitioned = cut
        state.save(self.settings)
        self.say(f"host {name}: {'partitioned' if cut else 'healed'}")

    def endpoints(self) -> list[str]:
        """The coordinators' gRPC addresses (the CLI finds the leader among them)."""
        return [c.api_address for c in self.state().coordinators]

    def etcd_endpoint(self) -> EtcdAccess:
        """A running etcd member's loopback client URL with root's credentials, for the
        lab's observers."""
        state = self.state()
        if not state.etcd_members:
            raise LabError("the lab has no etcd")
        return daemons.etcd_access(state, daemons.live_etcd_urls(state)[0])

    def env(self) -> dict[str, str]:
        """What a shell needs to use this lab: `eval "$(hvplace lab env)"`."""
        state = self.state()
        env = {
            "HVPLACE_LAB_DIR": str(self.settings.state_dir),
            "HVPLACE_ENDPOINT": ",".join(self.endpoints()),
        }
        tls = secure.Secrets(state.secrets_dir)
        if state.secrets_dir:
            env["HVPLACE_CA"] = str(tls.ca)
            env["HVPLACE_TOKEN_FILE"] = str(tls.admin_token)
        if state.etcd_members:
            env["ETCDCTL_API"] = "3"
            env["ETCDCTL_ENDPOINTS"] = ",".join(state.etcd_urls(bridge=False))
            env["ETCDCTL_CACERT"] = str(tls.ca)
            root = tls.root_password.read_text().strip()
            env["ETCDCTL_USER"] = f"{secure.ROOT_USER}:{root}"
        return env

    def _etcd_members(self, state: LabState, member: int | None) -> list[EtcdMemberRecord]:
        if member is None:
            return list(state.etcd_members)
        if not 1 <= member <= len(state.etcd_members):
            raise LabError(
                f"no etcd member {member}: the lab has {len(state.etcd_members)} (1-based)"
            )
        return [state.etcd_members[member - 1]]

    def kill_etcd(self, member: int | None = None) -> list[int]:
        """kill -9 every etcd member, or member `member` (1-based); the data stays, so
        `restart-etcd` brings the same cluster back."""
        state = self.state()
        chosen = self._etcd_members(state, member)
        killed = [m.process.pid for m in chosen if m.process is not None and kill9(m.process)]
        if not killed:
            raise LabError(
                "etcd is not running" if member is None else f"etcd member {member} is not running"
            )
        wait_gone(killed)
        self.say(f"killed {', '.join(m.name for m in chosen)} (PID {', '.join(map(str, killed))})")
        return killed

    def restart_etcd(self, member: int | None = None) -> None:
        """Start the dead etcd members (or member `member`) again on the same URLs and data."""
        state = self.state()
        chosen = self._etcd_members(state, member)
        if all(is_alive(m.process) for m in chosen):
            raise LabError(f"{', '.join(m.name for m in chosen)} running; kill it first")
        daemons.start_etcd(self.settings, state, only=member)
        state.save(self.settings)
        pids = [str(m.process.pid) for m in chosen if m.process is not None]
        self.say(f"etcd running again (PID {', '.join(pids)})")

    def kill_leader(self) -> str:
        state = self.state()
        leader = daemons.leader_name(state)
        if leader is None:
            raise LabError("no leader is elected (no key under /hvplace/v1/election/)")
        for coordinator in state.coordinators:
            if coordinator.name == leader and kill9(coordinator.process):
                assert coordinator.process is not None
                wait_gone([coordinator.process.pid])
                self.say(f"killed leader {leader} (PID {coordinator.process.pid})")
                return leader
        raise LabError(f"the leader {leader!r} is not a running coordinator of this lab")

    # -- single processes, for the fault campaign -----------------------------------

    def kill_agent(self, name: str) -> int:
        """kill -9 the host's agent alone: its libvirtd and guests keep running."""
        state, host = self.host(name)
        if host.agent is None or not kill9(host.agent):
            raise LabError(f"host {name}: no agent running")
        wait_gone([host.agent.pid])
        state.save(self.settings)
        self.say(f"killed the agent of {name} (PID {host.agent.pid})")
        return host.agent.pid

    def start_agent(self, name: str) -> int:
        """Start a killed agent again with its config (it adopts or fences its guests).
        If the host's watchdog reset it meanwhile (its libvirtd is gone too), the host
        comes back as a rebooted one would: libvirtd first, then the agent."""
        state, host = self.host(name)
        if is_alive(host.agent):
            raise LabError(f"host {name}: its agent is running")
        if host.mode == "real" and not is_alive(host.supervisor):
            raise LabError(f"host {name}: its namespaces are gone; recreate the lab")
        if host.mode == "real" and not is_alive(host.libvirtd):
            kill9(host.virtlogd)
            with self.step(f"{name} was reset by its watchdog: starting its libvirtd"):
                host.virtlogd, host.libvirtd = hosts.start_libvirt(host)
                state.save(self.settings)
        record = daemons.start_agent(self.settings, state, host)
        state.save(self.settings)
        self.say(f"agent of {name} running again (PID {record.pid})")
        return record.pid

    def kill_libvirtd(self, name: str) -> int:
        """kill -9 the host's libvirtd (real hosts): its QEMU guests keep running."""
        state, host = self.host(name)
        if host.mode != "real":
            raise LabError(f"host {name}: a test:/// host's libvirt lives inside its agent")
        if host.libvirtd is None or not kill9(host.libvirtd):
            raise LabError(f"host {name}: libvirtd is not running")
        wait_gone([host.libvirtd.pid])
        state.save(self.settings)
        self.say(f"killed libvirtd of {name} (PID {host.libvirtd.pid})")
        return host.libvirtd.pid

    def start_libvirtd(self, name: str, timeout: float = 30.0) -> int:
        """Start libvirtd alone again (virtlogd still holds the running guests' logs); it
        finds its running QEMU guests from their status files."""
        state, host = self.host(name)
        if host.mode != "real":
            raise LabError(f"host {name}: a test:/// host's libvirt lives inside its agent")
        if is_alive(host.libvirtd):
            raise LabError(f"host {name}: libvirtd is running")
        if not is_alive(host.virtlogd):
            host.virtlogd, host.libvirtd = hosts.start_libvirt(host, timeout)
        else:
            host.libvirtd = _start_libvirtd(host, timeout)
        state.save(self.settings)
        self.say(f"libvirtd of {name} running again (PID {host.libvirtd.pid})")
        return host.libvirtd.pid

    def kill_coordinators(self) -> list[str]:
        """kill -9 every coordinator: the control plane is down until `start-coordinator`."""
        state = self.state()
        killed: list[str] = []
        pids: list[int] = []
        for coordinator in state.coordinators:
            if kill9(coordinator.process):
                assert coordinator.process is not None
                killed.append(coordinator.name)
                pids.append(coordinator.process.pid)
        wait_gone(pids)
        self.say(f"killed coordinators {killed} (PIDs {pids})")
        return killed

    def start_coordinator(self, name: str) -> int:
        """Start a killed coordinator again on its config and ports (a new name adds one)."""
        state = self.state()
        if state.etcd is None:
            raise LabError("the lab has no etcd, hence no coordinators")
        for coordinator in state.coordinators:
            if coordinator.name != name:
                continue
            if is_alive(coordinator.process):
                raise LabError(f"coordinator {name} is running")
            argv = [sys.executable, "-m", "hvplace.coordinator", "--config", coordinator.config]
            log = Path(coordinator.config).parent / "coordinator.log"
            coordinator.process = spawn_detached(f"coordinator-{name}", argv, log)
            state.save(self.settings)
            self.say(f"coordinator {name} running again (PID {coordinator.process.pid})")
            return coordinator.process.pid
        record = daemons.start_coordinator(self.settings, state, name)
        state.save(self.settings)
        assert record.process is not None
        self.say(f"coordinator {name} started (PID {record.process.pid})")
        return record.process.pid


def _start_libvirtd(host: HostRecord, timeout: float) -> ProcessRecord:
    """libvirtd under the reaper inside the host, as hosts.start_libvirt starts it."""
    base = Path(host.dir)
    reaped = [sys.executable, "-m", "hvplace.lab.reaper", "libvirtd"]
    record = spawn_detached("libvirtd", hosts.inside(host, reaped), base / "libvirtd.log")
    deadline = time.monotonic() + timeout
    while True:
        if not is_alive(record):
            raise LabError(f"host {host.name}: libvirtd exited: {tail(record.log)}")
        if hosts.virsh(host, "version", timeout=10).returncode == 0:
            return record
        if time.monotonic() > deadline:
            kill9(record)
            raise LabError(f"host {host.name}: libvirtd not answering after {timeout}s")
        time.sleep(0.1)
