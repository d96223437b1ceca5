"""A lab host's watchdog: a FIFO that speaks /dev/watchdog's protocol and, when its writer
stops petting, does to the host what a reset does (kills everything in its netns).

`python -m hvplace.lab.watchdog --fifo F --timeout S --netns-inode N --keep PID`, started
by the lab beside each namespaced host (its own process, outside the host's namespaces,
so kill -9 of the agent leaves it counting down). As /dev/watchdog: the first write arms
it, any write pets it, a write holding 'V' followed by close disarms it (magic close); a
close without it leaves it armed. When it fires it SIGKILLs every process in the host's
network namespace but the namespace holder (`--keep`): libvirtd, virtlogd, QEMU, a hung
agent. Then it waits, disarmed, for the next opener, as a rebooted host's watchdog does.

test:/// lab hosts have none: their domains live inside the agent process and die with it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import stat
import sys
import time
from pathlib import Path

from hvplace.lab.processes import kill_pid, pids_in_namespace, wait_gone


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def open_reader(fifo: Path) -> int:
    """A read end that reports a writer's close once (a fresh one does not see old ones)."""
    return os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)


def reset(netns_inode: int, keep: set[int]) -> list[int]:
    """What a host reset does to the host's processes."""
    victims = [p for p in pids_in_namespace("net", netns_inode) if p not in keep]
    killed = [p for p in victims if kill_pid(p)]
    wait_gone(killed, 10.0)
    return killed


def serve(fifo: Path, timeout_s: float, netns_inode: int, keep: set[int]) -> None:
    if not fifo.exists():
        os.mkfifo(fifo, 0o600)
    elif not stat.S_ISFIFO(fifo.stat().st_mode):
        raise SystemExit(f"{fifo} exists and is not a FIFO")
    keep = keep | {os.getpid()}
    fd = open_reader(fifo)
    deadline: float | None = None  # armed while set
    magic = False
    say(f"watchdog on {fifo}: timeout {timeout_s}s, host netns inode {netns_inode}")
    while True:
        wait = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not select.select([fd], [], [], wait)[0]:
            if deadline is not None and time.monotonic() >= deadline:
                say(f"FIRED: not petted for {timeout_s}s; resetting the host")
                say(f"reset: killed {reset(netns_inode, keep)}")
                deadline, magic = None, False
            continue
        data = os.read(fd, 4096)
        if data:
            if deadline is None:
                say("armed")
            deadline = time.monotonic() + timeout_s
            # The kernel disarms on close only when the last write held the magic 'V'.
            magic = b"V" in data
            continue
        # The writer closed.
        if deadline is not None and magic:
            say("magic close: disarmed")
            deadline = None
        elif deadline is not None:
            left = deadline - time.monotonic()
            say(f"closed without magic close: still armed, fires in {left:.2f}s")
        new = open_reader(fifo)  # before closing the old one: a writer is never refused
        os.close(fd)
        fd, magic = new, False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fifo", type=Path, required=True)
    p.add_argument("--timeout", type=float, required=True, help="seconds without a pet")
    p.add_argument("--netns-inode", type=int, required=True)
    p.add_argument("--keep", type=int, action="append", default=[], help="PIDs never killed")
    args = p.parse_args(argv)
    if args.timeout <= 0:
        p.error("--timeout must be positive")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.fifo, args.timeout, args.netns_inode, set(args.keep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
