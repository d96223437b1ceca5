"""A namespaced lab host: its own network and mount namespaces, virtlogd and libvirtd.

A long-lived supervisor (`sleep infinity`) holds both namespaces; everything else in the
host is started with `nsenter -t <supervisor> -m -n`, and found again by its netns.
"""

from __future__ import annotations

import ipaddress
import pwd
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from hvplace.lab import network
from hvplace.lab.processes import (
    ProcessRecord,
    is_alive,
    kill9,
    kill_pid,
    namespace_inode,
    pid_alive,
    pids_in_namespace,
    spawn_detached,
    tail,
    wait_gone,
)
from hvplace.lab.state import HostRecord, LabSettings

# Host dir subfolder -> the path it is bind-mounted over inside the host.
BIND_MOUNTS: dict[str, str] = {
    "run": "/run",
    "lib": "/var/lib/libvirt",
    "log": "/var/log/libvirt",
    "cache": "/var/cache/libvirt",
    "etc": "/etc/libvirt",
}

# QEMU as root without a security driver: the lab has no AppArmor/SELinux to speak of,
# and `namespaces = []` keeps QEMU in the host's mount namespace, where the bind mounts
# (and the guest images) are.
QEMU_CONF = """\
user = "root"
group = "root"
security_driver = "none"
dynamic_ownership = 0
remember_owner = 0
namespaces = [ ]
"""

LIBVIRTD_CONF = """\
unix_sock_group = "root"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:stderr"
"""

VIRTLOGD_CONF = 'log_outputs = "3:stderr"\n'

QEMU_USER = "libvirt-qemu"


class HostError(RuntimeError):
    pass


def ensure_qemu_user() -> bool:
    """libvirtd's QEMU driver resolves its built-in user even when qemu.conf says root."""
    try:
        pwd.getpwnam(QEMU_USER)
        return False
    except KeyError:
        pass
    subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/var/lib/libvirt",
            "--shell",
            "/usr/sbin/nologin",
            QEMU_USER,
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return True


def missing_mount_targets() -> list[str]:
    return [target for target in BIND_MOUNTS.values() if not Path(target).is_dir()]


def prepare(host: HostRecord) -> Path:
    """The host's private dirs, libvirt config and supervisor script; returns the script."""
    base = Path(host.dir)
    for sub in BIND_MOUNTS:
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "etc" / "qemu.conf").write_text(QEMU_CONF)
    # Each host its own host UUID: libvirt refuses a live migration between two daemons
    # that report the same one ("migrate guest to the same host").
    host_uuid = uuid.uuid5(uuid.NAMESPACE_URL, f"hvplace-lab:{base}")
    (base / "etc" / "libvirtd.conf").write_text(LIBVIRTD_CONF + f'host_uuid = "{host_uuid}"\n')
    (base / "etc" / "virtlogd.conf").write_text(VIRTLOGD_CONF)
    lines = ["set -eu"]
    lines += [
        f"mount --bind {shlex.quote(str(base / sub))} {target}"
        for sub, target in BIND_MOUNTS.items()
    ]
    # The marker is written after the mounts: the lab waits for it before using the host.
    lines += [f"touch {shlex.quote(str(base / 'ready'))}", "exec sleep infinity"]
    script = base / "supervisor.sh"
    script.write_text("\n".join(lines) + "\n")
    (base / "ready").unlink(missing_ok=True)
    return script


def create_network(settings: LabSettings, host: HostRecord) -> None:
    assert host.netns is not None and host.veth is not None and host.address is not None
    network.create_host_network(
        host.netns,
        host.veth,
        settings.veth_peer(host.index),
        settings.bridge,
        ipaddress.IPv4Interface(host.address),
    )
    host.netns_inode = namespace_inode(f"/run/netns/{host.netns}")


def start_supervisor(host: HostRecord, script: Path, timeout: float = 10.0) -> ProcessRecord:
    """Enter the netns, unshare a private mount namespace, bind-mount, then sleep forever."""
    assert host.netns is not None
    argv = ["ip", "netns", "exec", host.netns, "unshare", "-m", "--propagation", "private"]
    record = spawn_detached(
        "supervisor", [*argv, "sh", str(script)], Path(host.dir) / "supervisor.log"
    )
    ready = Path(host.dir) / "ready"
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if not is_alive(record) or time.monotonic() > deadline:
            kill9(record)
            raise HostError(f"host {host.name}: supervisor failed: {tail(record.log)}")
        time.sleep(0.02)
    return record


def seed_capabilities(host: HostRecord, source: Path) -> None:
    """Copy another host's QEMU capability cache: libvirtd then skips ~8 s of probing QEMU."""
    target = Path(host.dir) / "cache" / "qemu" / "capabilities"
    if not source.is_dir() or target.exists():
        return
    shutil.copytree(source, target)


def capabilities_dir(host: HostRecord) -> Path:
    return Path(host.dir) / "cache" / "qemu" / "capabilities"


def inside(host: HostRecord, argv: list[str]) -> list[str]:
    """`argv` run in the host's mount and network namespaces."""
    if host.supervisor is None or not is_alive(host.supervisor):
        raise HostError(f"host {host.name}: its supervisor is not running")
    return ["nsenter", "-t", str(host.supervisor.pid), "-m", "-n", "--", *argv]


def run_inside(
    host: HostRecord, argv: list[str], timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(inside(host, argv), capture_output=True, text=True, timeout=timeout)


def virsh(host: HostRecord, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """`virsh -c qemu:///system ...` from inside the host: it sees only that host's libvirtd."""
    return run_inside(host, ["virsh", "-c", "qemu:///system", *args], timeout=timeout)


def start_libvirt(host: HostRecord, timeout: float = 60.0) -> tuple[ProcessRecord, ProcessRecord]:
    """virtlogd then libvirtd in the foreground (detached), so their PIDs are known at once."""
    base = Path(host.dir)
    virtlogd = spawn_detached("virtlogd", inside(host, ["virtlogd"]), base / "virtlogd.log")
    # Under the reaper (its PID is recorded; libvirtd dies with it): killed QEMUs are
    # reaped at once, so libvirtd reports them off at once.
    reaped = [sys.executable, "-m", "hvplace.lab.reaper", "libvirtd"]
    libvirtd = spawn_detached("libvirtd", inside(host, reaped), base / "libvirtd.log")
    deadline = time.monotonic() + timeout
    while True:
        if not is_alive(libvirtd):
            kill9(virtlogd)
            raise HostError(f"host {host.name}: libvirtd exited: {tail(libvirtd.log)}")
        if (base / "run" / "libvirt" / "libvirt-sock").exists() and _answers(host):
            return virtlogd, libvirtd
        if time.monotonic() > deadline:
            raise HostError(
                f"host {host.name}: libvirtd not answering after {timeout}s: {tail(libvirtd.log)}"
            )
        time.sleep(0.1)


def start_watchdog(host: HostRecord, timeout_s: float) -> ProcessRecord:
    """The host's watchdog stand-in (lab/watchdog.py), outside the host's namespaces so
    that it outlives whatever it kills; returns once its FIFO has a reader."""
    assert host.netns_inode is not None and host.supervisor is not None
    fifo = host.watchdog_fifo
    fifo.unlink(missing_ok=True)
    argv = [
        sys.executable, "-m", "hvplace.lab.watchdog", "--fifo", str(fifo),
        "--timeout", str(timeout_s), "--netns-inode", str(host.netns_inode),
        "--keep", str(host.supervisor.pid),
    ]  # fmt: skip
    record = spawn_detached("watchdog", argv, Path(host.dir) / "watchdog.log")
    deadline = time.monotonic() + 10.0
    while "watchdog on" not in tail(record.log):
        if not is_alive(record) or time.monotonic() > deadline:
            kill9(record)
            raise HostError(f"host {host.name}: watchdog stand-in failed: {tail(record.log)}")
        time.sleep(0.02)
    return record


def _answers(host: HostRecord) -> bool:
    """libvirtd answers `virsh version`; a slow answer (its first QEMU probe on a loaded
    machine) is not an error but a retry, until start_libvirt's deadline."""
    try:
        return virsh(host, "version", timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def stray_pids(host: HostRecord) -> list[int]:
    """Processes in the host's netns that the lab did not start itself: QEMU, helpers."""
    if host.netns_inode is None:
        return []
    recorded = {p.pid for p in host.processes()}
    return [pid for pid in pids_in_namespace("net", host.netns_inode) if pid not in recorded]


def qemu_pids(host: HostRecord) -> list[int]:
    """QEMU processes of the host, by their libvirt pid files (they may outlive libvirtd)."""
    pids: set[int] = set()
    for pidfile in (host.run_dir / "libvirt" / "qemu").glob("*.pid"):
        if pidfile.name == "driver.pid":  # libvirtd's own
            continue
        try:
            pids.add(int(pidfile.read_text().strip()))
        except (OSError, ValueError):
            continue
    return sorted(pid for pid in pids if pid_alive(pid))


def crash(host: HostRecord) -> list[int]:
    """kill -9 the agent, libvirtd, virtlogd, the watchdog and every QEMU of the host, as a
    power cut would (a new watchdog comes with the next agent).

    The supervisor and the network stay, so the host can be started again.
    """
    killed: list[int] = []
    for record in (host.watchdog, host.agent, host.libvirtd, host.virtlogd):
        if kill9(record):
            assert record is not None
            killed.append(record.pid)
    keep = {host.supervisor.pid} if host.supervisor is not None else set()
    for pid in stray_pids(host):
        if pid not in keep and kill_pid(pid):
            killed.append(pid)
    wait_gone(killed, 10.0)
    return killed


def teardown(host: HostRecord) -> list[str]:
    """End every process of the host (by PID) and remove its netns and veth; returns problems."""
    problems: list[str] = []
    pids: list[int] = []
    for record in host.processes():
        if kill9(record):
            pids.append(record.pid)
    if host.netns_inode is not None:
        for pid in pids_in_namespace("net", host.netns_inode):
            kill_pid(pid)
            pids.append(pid)
    left = wait_gone(pids, 10.0)
    if left:
        problems.append(f"host {host.name}: processes still running: {left}")
    if host.veth is not None:
        network.delete_link(host.veth)
    if host.netns is not None:
        network.delete_netns(host.netns)
        if network.netns_exists(host.netns):
            problems.append(f"host {host.name}: netns {host.netns} still exists")
    return problems
