"""The lab's etcd, coordinators and agents: their config files, start by PID, readiness, leader."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from hvplace.lab import hosts, secure
from hvplace.lab.observe import EtcdAccess
from hvplace.lab.processes import ProcessRecord, is_alive, kill9, spawn_detached, tail, wait_gone
from hvplace.lab.state import (
    CoordinatorRecord,
    EtcdMemberRecord,
    HostRecord,
    LabSettings,
    LabState,
)
from hvplace.proto import keyspace
from hvplace.proto.records import ClusterConfig
from hvplace.proto.timing import fence_after_for
from hvplace.proto.validation import validate_cluster_config


class DaemonError(RuntimeError):
    pass


AGENT_METRICS_PORT = 9464


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _free_port_on(*addresses: str) -> int:
    """A port free on every address (etcd listens on the bridge and on loopback)."""
    for _ in range(50):
        port = free_port(addresses[0])
        try:
            for address in addresses[1:]:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind((address, port))
        except OSError:
            continue
        return port
    raise DaemonError(f"no port free on all of {addresses}")


# -- etcd ---------------------------------------------------------------------------


def plan_etcd(settings: LabSettings, state: LabState, members: int) -> None:
    """Name the members and pick their URLs (each member its own ports); agents in a
    netns reach them on the bridge address, everything else on loopback."""
    if not 1 <= members <= 7:
        raise DaemonError(f"--etcd-members must be between 1 and 7, not {members}")
    addresses = ["127.0.0.1"]
    if state.mode == "real":
        addresses.insert(0, str(settings.bridge_address.ip))
    # Clients speak TLS (the certificate names every address here); peer traffic stays
    # plain http on loopback, which only this machine's root reaches.
    state.secrets_dir = str(settings.state_dir / "secrets")
    secure.make_certs(secure.Secrets(state.secrets_dir), addresses)
    state.etcd_members = []
    for index in range(1, members + 1):
        name = "etcd" if members == 1 else f"etcd{index}"
        client_port = _free_port_on(*addresses)
        state.etcd_members.append(
            EtcdMemberRecord(
                name=name,
                dir=str(settings.state_dir / "etcd" / ("" if members == 1 else name)),
                client_urls=[f"https://{a}:{client_port}" for a in addresses],
                peer_url=f"http://127.0.0.1:{free_port()}",
            )
        )


def start_etcd(
    settings: LabSettings,
    state: LabState,
    timeout: float = 20.0,
    *,
    members: int = 1,
    only: int | None = None,
) -> None:
    """Debian's etcd, `members` of them, each its own process with its data in the state
    dir. A restart (members already recorded) starts the dead ones (or member `only`)
    again on the same URLs and data. Each PID is saved as soon as it is known."""
    first = not state.etcd_members
    for attempt in range(3 if first else 1):
        if first:
            plan_etcd(settings, state, members)
        started = _spawn_etcd(settings, state, only)
        try:
            _wait_healthy(state, started, timeout)
            if first:
                with_auth(state)
            return
        except DaemonError as e:
            # A port picked free can be taken before etcd binds it (other labs and tests
            # run beside this one): a first start tries again on fresh ports.
            if not first or attempt == 2 or "address already in use" not in str(e):
                raise
        wait_gone([m.process.pid for m in started if m.process and kill9(m.process)])
        shutil.rmtree(settings.state_dir / "etcd", ignore_errors=True)


def _spawn_etcd(settings: LabSettings, state: LabState, only: int | None) -> list[EtcdMemberRecord]:
    cluster = ",".join(f"{m.name}={m.peer_url}" for m in state.etcd_members)
    several = len(state.etcd_members) > 1
    started = []
    for number, member in enumerate(state.etcd_members, start=1):
        if (only is not None and number != only) or is_alive(member.process):
            continue
        data = Path(member.dir)
        tls = secure.Secrets(state.secrets_dir)
        argv = [
            "etcd",
            f"--name={member.name}",
            f"--data-dir={data / 'data'}",
            f"--listen-client-urls={','.join(member.client_urls)}",
            f"--advertise-client-urls={','.join(member.client_urls)}",
            f"--listen-peer-urls={member.peer_url}",
            f"--initial-advertise-peer-urls={member.peer_url}",
            f"--initial-cluster={cluster}",
            "--initial-cluster-state=new",
            # Batches of 500 VMs are one transaction each (3 keys a VM).
            "--max-txn-ops=4096",
            "--max-request-bytes=16777216",
            # A dead raft leader stalls etcd until the others elect (1-2x this timeout):
            # 500 ms rather than 1 s keeps that well inside an agent's fence window (README).
            *(["--election-timeout=500", "--heartbeat-interval=50"] if several else []),
            f"--cert-file={tls.etcd_cert}",
            f"--key-file={tls.etcd_key}",
            "--log-level=warn",
            "--logger=zap",
        ]
        member.process = spawn_detached(member.name, argv, data / "etcd.log")
        state.save(settings)
        started.append(member)
    return started


def with_auth(state: LabState) -> None:
    """etcd's users (root, coordinator) and auth on: `hvplace etcd init-auth`."""
    secure.init_etcd_auth(secure.Secrets(state.secrets_dir), live_etcd_urls(state)[0])


def etcd_access(state: LabState, url: str) -> EtcdAccess:
    """Root's access to etcd at `url` for the lab's own readers (observe, checker)."""
    tls = secure.Secrets(state.secrets_dir)
    return EtcdAccess(url, str(tls.ca), secure.ROOT_USER, str(tls.root_password))


def _healthy(state: LabState, member: EtcdMemberRecord) -> bool:
    context = ssl.create_default_context(cafile=str(secure.Secrets(state.secrets_dir).ca))
    try:
        with urllib.request.urlopen(
            member.loopback_url + "/health", timeout=1, context=context
        ) as reply:
            return b'"health":"true"' in reply.read()
    except OSError:
        return False


def _wait_healthy(state: LabState, members: list[EtcdMemberRecord], timeout: float) -> None:
    """Until every member is healthy (members wait for a quorum: all were started first);
    at once when one has exited."""
    deadline = time.monotonic() + timeout
    waiting = list(members)
    while waiting:
        for member in waiting:
            assert member.process is not None
            if not is_alive(member.process):
                raise DaemonError(f"{member.name} exited: {tail(member.process.log)}")
        waiting = [m for m in waiting if not _healthy(state, m)]
        if waiting and time.monotonic() > deadline:
            late = waiting[0]
            assert late.process is not None
            raise DaemonError(f"{late.name} not healthy after {timeout}s: {tail(late.process.log)}")
        time.sleep(0.05)


def live_etcd_urls(state: LabState) -> list[str]:
    """The loopback URLs of the members running now (all of them if none is)."""
    live = [m.loopback_url for m in state.etcd_members if is_alive(m.process)]
    return live or state.etcd_urls(bridge=False)


def etcdctl(state: LabState, *args: str, timeout: float = 10.0) -> str:
    if not state.etcd_members:
        raise DaemonError("the lab has no etcd")
    # etcdctl refuses a flag and its ETCDCTL_* variable together, and `hvplace lab env`
    # exports ETCDCTL_ENDPOINTS: the flags here say everything, the caller's shell nothing.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    tls = secure.Secrets(state.secrets_dir)
    root = f"{secure.ROOT_USER}:{tls.root_password.read_text().strip()}"
    out = subprocess.run(
        [
            "etcdctl",
            f"--endpoints={','.join(live_etcd_urls(state))}",
            f"--cacert={tls.ca}",
            f"--user={root}",
            "--dial-timeout=2s",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env, ETCDCTL_API="3"),
    )
    if out.returncode != 0:
        raise DaemonError(f"etcdctl {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def _get_prefix(state: LabState, prefix: str) -> list[tuple[str, str, int]]:
    """(key, value, create revision) of every key under `prefix`."""
    raw = json.loads(etcdctl(state, "get", "--prefix", prefix, "-w", "json"))
    return [
        (
            base64.b64decode(kv["key"]).decode(),
            base64.b64decode(kv.get("value", "")).decode(errors="replace"),
            int(kv["create_revision"]),
        )
        for kv in raw.get("kvs", [])
    ]


def leader_id(state: LabState) -> str | None:
    """The election value with the lowest create revision: the leader (etcd's election rule)."""
    try:
        keys = _get_prefix(state, keyspace.ELECTION)
    except (DaemonError, subprocess.TimeoutExpired):
        return None
    if not keys:
        return None
    return min(keys, key=lambda kv: kv[2])[1]


def leader_name(state: LabState) -> str | None:
    """The lab's name of the leading coordinator, matched against its election value."""
    value = leader_id(state)
    if value is None:
        return None
    for coordinator in state.coordinators:
        if (
            value == coordinator.name
            or coordinator.name in value
            or coordinator.api_address in value
        ):
            return coordinator.name
    return value


def registered_hosts(state: LabState) -> list[str]:
    return [keyspace.classify(key).host for key, _, _ in _get_prefix(state, keyspace.HOSTS)]


# -- coordinators and agents --------------------------------------------------------


def _python_module(module: str) -> list[str]:
    """The daemons run from this interpreter's environment (the venv the CLI runs in)."""
    return [sys.executable, "-m", module]


def cluster_budget(lease_ttl: float | None) -> ClusterConfig:
    """The lab's timing budget: the defaults, or a lease TTL with fence_after derived from
    it; the watchdog timeout is the largest safe one either way."""
    if lease_ttl is None:
        return ClusterConfig()
    return validate_cluster_config(
        ClusterConfig(lease_ttl_s=lease_ttl, fence_after_s=fence_after_for(lease_ttl))
    )


def coordinator_config(state: LabState, name: str, api: str, metrics: str) -> str:
    """hvplace-coordinator's TOML (coordinator/config.py): every etcd member on loopback, its own ports."""
    budget = cluster_budget(state.lease_ttl)
    tls = secure.Secrets(state.secrets_dir)
    lines = [
        f'node_name = "{name}"',
        f"etcd_endpoints = {json.dumps(state.etcd_urls(bridge=False))}",
        f'listen = "{api}"',
        f'metrics_listen = "{metrics}"',
        f'etcd_ca = "{tls.ca}"',
        f'etcd_user = "{secure.COORDINATOR_USER}"',
        f'etcd_password_file = "{tls.coordinator_password}"',
        # TLS and a token even on loopback: the lab runs as production does.
        f'tls_cert = "{tls.api_cert}"',
        f'tls_key = "{tls.api_key}"',
        f'auth_file = "{tls.auth_file}"',
        # The leader's election lease: a standby takes over within about this long.
        f"session_ttl_s = {max(1.0, budget.lease_ttl_s)}",
        "",
        "[cluster]",
        f"lease_ttl_s = {budget.lease_ttl_s}",
        f"fence_after_s = {budget.fence_after_s}",
        f"failover_delay_s = {budget.failover_delay_s}",
        f"watchdog_timeout_s = {budget.watchdog_s}",
        # The lab is small: warn rather than refuse creates that a failure could strand.
        'admission_policy = "warn"',
    ]
    return "\n".join(lines) + "\n"


def build_guest_image(timeout: float = 600.0) -> dict[str, str]:
    """`hvplace-agent build-image` (cached after the first build): kernel, initrd, cmdline."""
    out = subprocess.run(
        [*_python_module("hvplace.agent"), "build-image"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if out.returncode != 0:
        raise DaemonError(f"building the guest image failed: {out.stderr.strip()[-1500:]}")
    image = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    if not {"kernel", "initrd", "cmdline"} <= set(image):
        raise DaemonError(f"build-image printed no kernel/initrd/cmdline: {out.stdout!r}")
    return image


GUEST_IMAGE_NAME = "tiny"
"""The catalogue name `lab up` gives the tiny guest: `hvplace vm create web-1 --image tiny`."""


def register_guest_image(state: LabState, env: dict[str, str]) -> None:
    """Add the tiny guest to the image catalogue (replacing an older build's record): its
    files relative to the guest cache directory, which is one of the agents' image_dirs."""
    image = state.guest_image
    kernel, initrd = Path(image["kernel"]), Path(image["initrd"])
    cli = [*_python_module("hvplace.cli"), "image"]
    run_env = dict(os.environ, **env)
    subprocess.run(
        [*cli, "delete", GUEST_IMAGE_NAME, "--force"], capture_output=True, env=run_env, timeout=60
    )
    added = subprocess.run(
        [*cli, "add", GUEST_IMAGE_NAME, "--kernel", kernel.name, "--initrd", initrd.name,
         "--cmdline", image["cmdline"], "--dir", str(kernel.parent)],
        capture_output=True, text=True, env=run_env, timeout=60,
    )  # fmt: skip
    if added.returncode != 0:
        raise DaemonError(f"registering the guest image failed: {added.stderr.strip()[-1500:]}")


def start_coordinator(settings: LabSettings, state: LabState, name: str) -> CoordinatorRecord:
    base = settings.state_dir / "coordinators" / name
    base.mkdir(parents=True, exist_ok=True)
    secure.admin_token(secure.Secrets(state.secrets_dir))
    api = f"127.0.0.1:{free_port()}"
    metrics = f"127.0.0.1:{free_port()}"
    config = base / "coordinator.toml"
    config.write_text(coordinator_config(state, name, api, metrics))
    record = CoordinatorRecord(
        name=name, config=str(config), api_address=api, metrics_address=metrics
    )
    state.coordinators.append(record)
    state.save(settings)
    argv = [*_python_module("hvplace.coordinator"), "--config", str(config)]
    record.process = spawn_detached(f"coordinator-{name}", argv, base / "coordinator.log")
    state.save(settings)  # with its PID: `lab down` stops it whoever called this
    return record


def agent_config(state: LabState, host: HostRecord) -> str:
    """hvplace-agent's TOML (agent/config.py). Inside a netns, loopback is the host's own:
    etcd is on the bridge address, and the metrics port on the host's address."""
    budget = cluster_budget(state.lease_ttl)
    tls = secure.Secrets(state.secrets_dir)
    if host.mode == "real":
        endpoints = state.etcd_urls(bridge=True)
        domain_type = "qemu"  # TCG: /dev/kvm here hangs Linux guests (see README)
        # Every lab host reports this machine's cores; the tiny guests idle, so overcommit
        # vCPUs as a KVM fleet does (Nova's cpu_allocation_ratio) to fit a dozen of them.
        extra = ["cpu_ratio = 8.0"]
        # The host's watchdog stand-in (lab/watchdog.py), as /dev/watchdog in production.
        extra += [
            f'watchdog_device = "{host.watchdog_fifo}"',
            f"watchdog_timeout_s = {budget.watchdog_s}",
        ]
        # Live migration: the other hosts' libvirtds reach this one's through its socket
        # file (peer to peer), the guest's memory goes over the lab network.
        extra += [
            f'address = "{(host.address or "").split("/")[0]}"',
            f'migration_uri = "{host.root_side_uri.replace("qemu://", "qemu+unix://", 1)}"',
        ]
        if state.guest_image:  # catalogue images (the `tiny` guest) are looked up only there
            guest_dir = Path(state.guest_image["kernel"]).parent
            extra.append(f"image_dirs = {json.dumps(['/var/lib/hvplace/images', str(guest_dir)])}")
    else:
        endpoints = state.etcd_urls(bridge=False)
        domain_type = "auto"
        extra = []
    lines = [
        f'host = "{host.name}"',
        f"etcd_endpoints = {json.dumps(endpoints)}",
        f'etcd_ca = "{tls.ca}"',
        f'etcd_user = "{secure.agent_user(host.name)}"',
        f'etcd_password_file = "{tls.agent_password(host.name)}"',
        f'libvirt_uri = "{host.libvirt_uri}"',
        f'state_dir = "{Path(host.dir) / "agent"}"',
        f'domain_type = "{domain_type}"',
        f'metrics_listen = "{host.metrics_address or ""}"',
        f"lease_ttl = {budget.lease_ttl_s}",
        f"fence_after = {budget.fence_after_s}",
        "resync_interval_s = 5.0",
        *extra,
        "",
        "[labels]",
        f'rack = "{host_rack(host.index)}"',
        f'zone = "{host_zone(host.index)}"',
    ]
    return "\n".join(lines) + "\n"


def agent_metrics_address(host: HostRecord) -> str | None:
    """Where the agent serves /metrics: in a netns, on the host's own address; test hosts
    share the machine's loopback, so each gets a free port of its own."""
    if host.mode == "real":
        return f"{host.address.split('/')[0]}:{AGENT_METRICS_PORT}" if host.address else None
    return f"127.0.0.1:{free_port()}"


def host_rack(index: int) -> str:
    """Two hosts a rack: h1 h2 in r1, h3 h4 in r2, ..."""
    return f"r{(index + 1) // 2}"


def host_zone(index: int) -> str:
    """Zones alternate: odd hosts west, even hosts east (so each rack spans both)."""
    return "east" if index % 2 == 0 else "west"


def start_agent(settings: LabSettings, state: LabState, host: HostRecord) -> ProcessRecord:
    base = Path(host.dir)
    config = base / "agent.toml"
    # Its own etcd user, made (or its password set again) at each start: a host added to
    # a running lab, or a restarted one, needs no other step.
    tls = secure.Secrets(state.secrets_dir)
    known = tls.agent_password(host.name).exists()
    try:
        secure.add_agent(tls, live_etcd_urls(state)[0], host.name)
    except secure.SecureError:
        if not known:
            raise  # a user made before may stay as it is while etcd is down
    host.metrics_address = host.metrics_address or agent_metrics_address(host)
    config.write_text(agent_config(state, host))
    host.agent_config = str(config)
    argv = [*_python_module("hvplace.agent"), "--config", str(config)]
    if host.mode == "real":
        if not is_alive(host.watchdog):
            timeout = cluster_budget(state.lease_ttl).watchdog_s
            host.watchdog = hosts.start_watchdog(host, timeout)
            state.save(settings)
        argv = hosts.inside(host, argv)
    host.agent = spawn_detached("agent", argv, base / "agent.log")
    return host.agent


def wait_ready(state: LabState, timeout: float) -> None:
    """Until every agent has registered its host and a coordinator leads."""
    wanted = set(state.hosts)
    deadline = time.monotonic() + timeout
    while True:
        for record in [h.agent for h in state.hosts.values()] + [
            c.process for c in state.coordinators
        ]:
            if record is not None and not is_alive(record):
                raise DaemonError(f"{record.role} exited: {tail(record.log)}")
        try:
            missing = wanted - set(registered_hosts(state))
        except (DaemonError, subprocess.TimeoutExpired):
            missing = wanted
        leader = leader_id(state)
        if not missing and leader is not None:
            return
        if time.monotonic() > deadline:
            raise DaemonError(
                f"not ready after {timeout}s: hosts not registered {sorted(missing)}, leader {leader}"
            )
        time.sleep(0.25)


def test_node_xml(name: str, cpus: int = 64, memory_mib: int = 262144) -> str:
    """A libvirt test-driver node: what `test:///<file>` reports as the host's capacity."""
    return f"""<node>
  <cpu>
    <mhz>2400</mhz>
    <model>x86_64</model>
    <active>{cpus}</active>
    <nodes>1</nodes>
    <sockets>1</sockets>
    <cores>{cpus}</cores>
    <threads>1</threads>
  </cpu>
  <memory>{memory_mib * 1024}</memory>
  <!-- lab host {name} -->
</node>
"""
