"""Processes the lab starts and ends: started detached, recorded by PID and start time, ended by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessRecord:
    """One process the lab started. The start time tells it apart from a later reuse of its PID."""

    role: str
    pid: int
    start_time: int
    log: str

    def to_json(self) -> dict[str, object]:
        return {"role": self.role, "pid": self.pid, "start_time": self.start_time, "log": self.log}

    @classmethod
    def from_json(cls, raw: Mapping[str, object]) -> ProcessRecord:
        return cls(
            role=str(raw["role"]),
            pid=int(str(raw["pid"])),
            start_time=int(str(raw["start_time"])),
            log=str(raw["log"]),
        )


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a PID, or None when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def start_time(pid: int) -> int | None:
    stat = _stat(pid)
    return None if stat is None else stat[1]


def is_alive(record: ProcessRecord | None) -> bool:
    """True while the recorded process runs (a zombie or a reused PID counts as gone)."""
    if record is None:
        return False
    stat = _stat(record.pid)
    return stat is not None and stat[0] not in ("Z", "X") and stat[1] == record.start_time


def pid_alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def spawn_detached(
    role: str, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None
) -> ProcessRecord:
    """Start `argv` in its own session, not our child, and return its record.

    The process must outlive `hvplace lab up`; starting it from a throwaway `sh` makes PID 1
    its parent, so nothing here has to reap it. `setsid` and every wrapper we use
    (`ip netns exec`, `unshare` without --fork, `nsenter` without -p) exec in place, so `$!`
    is the PID of the final program.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    script = 'log=$1; shift; setsid "$@" </dev/null >>"$log" 2>&1 & echo $!'
    out = subprocess.run(
        ["sh", "-c", script, "sh", str(log), *argv],
        check=True,
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else None,
        timeout=30,
    )
    pid = int(out.stdout.strip())
    started = start_time(pid)
    if started is None:
        raise RuntimeError(f"{role} exited at once; see {log}: {tail(log)}")
    return ProcessRecord(role=role, pid=pid, start_time=started, log=str(log))


def tail(path: Path | str, chars: int = 1500) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def kill9(record: ProcessRecord | None) -> bool:
    """SIGKILL the recorded process if it is still that process; True when a signal was sent."""
    if not is_alive(record):
        return False
    assert record is not None
    return kill_pid(record.pid, signal.SIGKILL)


def kill_pid(pid: int, sig: int = signal.SIGKILL) -> bool:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pids: Iterable[int], timeout: float = 10.0) -> list[int]:
    """Wait until none of `pids` runs; returns those still running at the deadline."""
    pending = set(pids)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pending = {pid for pid in pending if pid_alive(pid)}
        if pending:
            time.sleep(0.05)
    return sorted(pending)


def terminate(record: ProcessRecord | None, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL when the process has not ended within `timeout`."""
    if record is None or not is_alive(record):
        return
    kill_pid(record.pid, signal.SIGTERM)
    if wait_gone([record.pid], timeout):
        kill9(record)
        wait_gone([record.pid], 5.0)


def namespace_inode(path: str) -> int | None:
    """The inode of a namespace file (/run/netns/X or /proc/PID/ns/net), None when it is gone."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def pids_in_namespace(kind: str, inode: int) -> list[int]:
    """Every live PID whose `kind` namespace ("net", "mnt") has this inode.

    How a host's QEMU processes are found: libvirtd starts them, so the lab never sees
    their PIDs at start, but they live in the host's network namespace.
    """
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        if namespace_inode(f"/proc/{entry}/ns/{kind}") == inode and pid_alive(int(entry)):
            found.append(int(entry))
    return sorted(found)
