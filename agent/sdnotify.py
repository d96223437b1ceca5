"""systemd's notify protocol over $NOTIFY_SOCKET with a plain datagram socket, and the
optional kernel watchdog device (softdog) the renew loop pets."""

from __future__ import annotations

import contextlib
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


class WatchdogDevice:
    """/dev/watchdog: once opened, the host resets unless it is written to in time, so a
    hung agent cannot keep VMs running without a lease. Closed with the magic 'V'."""

    def __init__(self, path: str) -> None:
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CLOEXEC)

    def pet(self) -> None:
        if self._fd is not None:
            os.write(self._fd, b"\0")

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.write(self._fd, b"V")  # magic close: disarm on a clean exit
            os.close(self._fd)
            self._fd = None
