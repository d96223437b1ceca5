"""systemd's notify protocol for both daemons: $NOTIFY_SOCKET with a plain datagram socket
(no extra dependency), and the watchdog ping interval systemd asked for."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send e.g. "READY=1" or "WATCHDOG=1"; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("sd_notify %s failed: %s", state, e)
        return False
    return True


def watchdog_interval_s() -> float | None:
    """Half systemd's WatchdogSec, when systemd asked for pings (and asked this process)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None
