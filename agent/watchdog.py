"""The optional kernel watchdog device (softdog) that the agent's renew loop pets."""

from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger(__name__)


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
