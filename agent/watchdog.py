"""The host's watchdog device (softdog, hardware, or the lab's stand-in FIFO) and the
thread that pets it only while the agent says pets are safe (SPEC §4)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import stat
import struct
import threading
import time
from collections.abc import Callable

from hvplace.proto.errors import InvalidInput

log = logging.getLogger(__name__)

# <linux/watchdog.h>: _IOWR('W', 6, int) and _IOR('W', 7, int).
WDIOC_SETTIMEOUT = 0xC0045706
WDIOC_GETTIMEOUT = 0x80045707
_UNSUPPORTED = (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP)


def device_timeout(path: str, wanted_s: float) -> float:
    """The timeout a device at `path` will really run with: kernel watchdogs count whole
    seconds, so a character device rounds up; the lab's FIFO keeps fractions."""
    try:
        is_char = stat.S_ISCHR(os.stat(path).st_mode)
    except OSError as e:
        raise InvalidInput(
            f"watchdog_device {path}: {e.strerror} (load softdog: modprobe softdog)"
        ) from None
    return float(math.ceil(wanted_s - 1e-9)) if is_char else wanted_s


class WatchdogDevice:
    """An armed watchdog: once opened, the host resets unless it is written to within
    `timeout_s`. Written to by `pet()`; disarmed only by `disarm()` (the magic 'V');
    `close()` leaves it armed, as a dead process does."""

    def __init__(self, path: str, timeout_s: float) -> None:
        self.path = path
        # Non-blocking: a FIFO with no reader (the lab's stand-in not running) fails at
        # once with ENXIO instead of hanging the agent.
        try:
            self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise InvalidInput(f"watchdog_device {path}: cannot open: {e.strerror}") from None
        self.timeout_s = self._set_timeout(timeout_s)
        self._failing = False

    def _set_timeout(self, wanted_s: float) -> float:
        """WDIOC_SETTIMEOUT where the driver supports it (it answers the timeout it chose),
        else WDIOC_GETTIMEOUT; a FIFO answers neither and runs with what it was told."""
        assert self._fd is not None
        seconds = max(1, math.ceil(wanted_s - 1e-9))
        try:
            got = fcntl.ioctl(self._fd, WDIOC_SETTIMEOUT, struct.pack("i", seconds))
            return float(struct.unpack("i", got)[0])
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise InvalidInput(
                    f"watchdog_device {self.path}: setting the timeout: {e}"
                ) from None
        try:
            got = fcntl.ioctl(self._fd, WDIOC_GETTIMEOUT, struct.pack("i", 0))
            return float(struct.unpack("i", got)[0])
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise InvalidInput(
                    f"watchdog_device {self.path}: reading the timeout: {e}"
                ) from None
        return wanted_s

    def pet(self) -> bool:
        """One keepalive write; False (logged once per run of failures) when it failed."""
        if self._fd is None:
            return False
        try:
            os.write(self._fd, b"\0")
        except OSError as e:
            if not self._failing:
                log.error("watchdog %s: pet failed: %s", self.path, e)
            self._failing = True
            return False
        if self._failing:
            log.warning("watchdog %s: pets go through again", self.path)
        self._failing = False
        return True

    def disarm(self) -> None:
        """Magic close: only when nothing on the host needs fencing any more."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.write(self._fd, b"V")
            self.close()

    def close(self) -> None:
        """Close without the magic 'V': the device stays armed and resets the host on time."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Petter:
    """A thread, not a task of the agent's event loop: it pets whenever `may_pet()` says
    so, so a busy event loop does not reset the host, while a stale lease (the agent dead,
    frozen, or cut off from etcd) stops the pets within `fence_after`."""

    def __init__(
        self, device: WatchdogDevice, interval_s: float, may_pet: Callable[[], bool]
    ) -> None:
        self.device = device
        self.interval_s = interval_s
        self.may_pet = may_pet
        self.pets = 0
        self.last_pet: float | None = None  # time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog-petter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.may_pet() and self.device.pet():
                self.pets += 1
                self.last_pet = time.monotonic()
            self._stop.wait(self.interval_s)
