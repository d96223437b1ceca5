"""A real libvirtd + virtlogd for tests (root): configured for QEMU as root, started only if
not already running, and the PIDs this module started are stopped at session end."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from support import processes

INSTALL_HINT = (
    "apt-get install -y libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients"
    " qemu-system-x86 qemu-utils busybox-static"
)
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
# QEMU as root without a security driver: these test machines have no AppArmor/SELinux
# profiles for it, and the guest files live in root-owned temp dirs.
QEMU_SETTINGS = {"user": '"root"', "group": '"root"', "security_driver": '"none"'}
SOCKET = Path("/run/libvirt/libvirt-sock")
URI = "qemu:///system"


@dataclass
class Libvirtd:
    uri: str = URI
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def stop_started(self) -> None:
        for proc in reversed(self.started):
            processes.stop(proc)
        self.started.clear()


def _require_root_and_binaries() -> None:
    if os.geteuid() != 0:
        raise RuntimeError("the libvirtd tests need root (they start libvirtd and QEMU)")
    for binary in ("libvirtd", "virtlogd", "qemu-system-x86_64", "qemu-img", "virsh"):
        if shutil.which(binary) is None and not Path(f"/usr/sbin/{binary}").exists():
            raise RuntimeError(f"{binary} is missing; install it with: {INSTALL_HINT}")


def _ensure_qemu_user() -> None:
    """libvirtd's QEMU driver resolves its built-in user even when qemu.conf says root."""
    try:
        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "libvirt-qemu",
            ],
            check=True,
        )


def _ensure_qemu_conf() -> bool:
    """Set our keys in qemu.conf (leaving other lines alone); True when the file changed."""
    QEMU_CONF.parent.mkdir(parents=True, exist_ok=True)
    lines = QEMU_CONF.read_text().splitlines() if QEMU_CONF.exists() else []
    current = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            current[key.strip()] = value.strip()
    missing = {k: v for k, v in QEMU_SETTINGS.items() if current.get(k) != v}
    if not missing:
        return False
    kept = [ln for ln in lines if ln.partition("=")[0].strip() not in missing]
    kept += [f"{k} = {v}" for k, v in missing.items()]
    QEMU_CONF.write_text("\n".join(kept) + "\n")
    return True


SOCKETS = {"virtlogd": Path("/run/libvirt/virtlogd-sock"), "libvirtd": SOCKET}


def _running(name: str) -> bool:
    """By its socket in this mount namespace: the lab runs more libvirtds in namespaces of
    their own, so a process-name match would mislead."""
    path = SOCKETS[name]
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _virsh_ok() -> bool:
    probe = subprocess.run(
        ["virsh", "-c", URI, "version"], capture_output=True, timeout=20, check=False
    )
    return probe.returncode == 0


def start() -> Libvirtd:
    """Idempotent: a libvirtd already running (with our qemu.conf) is reused, not restarted."""
    _require_root_and_binaries()
    _ensure_qemu_user()
    changed = _ensure_qemu_conf()
    daemon = Libvirtd()
    if _running("libvirtd") and changed:
        raise RuntimeError(
            f"libvirtd is running with an older {QEMU_CONF}; restart it so it reads"
            f" {QEMU_SETTINGS} (e.g. `systemctl restart libvirtd`)"
        )
    log_dir = Path("/var/log/libvirt")
    log_dir.mkdir(parents=True, exist_ok=True)
    # Foreground processes (not `-d`) so that the PID we record is the daemon's own.
    for name in ("virtlogd", "libvirtd"):
        if _running(name):
            continue
        log = open(log_dir / f"hvplace-test-{name}.log", "ab")  # noqa: SIM115 - the daemon's
        daemon.started.append(
            subprocess.Popen(
                # Under hvplace.lab.reaper: QEMU orphans are reaped at once (see there).
                [sys.executable, "-m", "hvplace.lab.reaper", name],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if SOCKET.exists() and _virsh_ok():
            return daemon
        for proc in daemon.started:
            if proc.poll() is not None:
                daemon.stop_started()
                raise RuntimeError(
                    f"{proc.args} exited with {proc.returncode}; see /var/log/libvirt"
                )
        time.sleep(0.2)
    daemon.stop_started()
    raise RuntimeError("libvirtd did not answer `virsh version` within 30 s")
