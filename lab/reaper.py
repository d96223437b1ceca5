"""Run a daemon as the child of a subreaper that reaps every orphan at once.

`python -m hvplace.lab.reaper libvirtd` — QEMU is double-forked by libvirtd, so its parent
becomes the nearest child subreaper, else PID 1. A PID 1 that reaps slowly (as in some
sandboxes and containers) leaves a killed QEMU a zombie for a second or more, and
libvirtd waits for it to vanish before it reports the domain off, which would stretch
every fence and failover. The daemon dies with the wrapper (PDEATHSIG), SIGTERM and
SIGINT are passed on, and the wrapper exits with the daemon's status.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m hvplace.lab.reaper PROGRAM [ARG...]", file=sys.stderr)
        return 2
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    child = os.fork()
    if child == 0:
        try:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            os.execvp(argv[0], argv)
        except OSError as exc:
            print(f"reaper: cannot run {argv[0]}: {exc}", file=sys.stderr)
        os._exit(127)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda number, _frame: os.kill(child, number))
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 1
        except InterruptedError:
            continue
        if pid == child:
            return os.waitstatus_to_exitcode(status) & 0xFF


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
