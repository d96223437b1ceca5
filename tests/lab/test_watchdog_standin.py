"""The lab's watchdog stand-in (lab/watchdog.py) on a real network namespace: it speaks
/dev/watchdog's protocol over a FIFO and, unpetted, kills everything in the namespace but
its holder, as a reset would; a magic close disarms it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hvplace.lab.processes import namespace_inode, pid_alive, pids_in_namespace
from lab.conftest import require_root
from support import processes

TIMEOUT_S = 0.5


@dataclass
class Namespace:
    holder: subprocess.Popen[bytes]
    inode: int
    started: list[subprocess.Popen[bytes]]

    def spawn(self) -> subprocess.Popen[bytes]:
        """A process inside the namespace (a stand-in for QEMU or libvirtd)."""
        proc = subprocess.Popen(["nsenter", "-t", str(self.holder.pid), "-n", "sleep", "600"])
        self.started.append(proc)
        deadline = time.monotonic() + 5
        while proc.pid not in pids_in_namespace("net", self.inode):
            assert time.monotonic() < deadline, "the process never entered the namespace"
            time.sleep(0.02)
        return proc


@pytest.fixture
def netns() -> Iterator[Namespace]:
    require_root()
    holder = subprocess.Popen(["unshare", "--net", "sleep", "600"])
    ns = Namespace(holder, 0, [])
    try:
        deadline = time.monotonic() + 5
        while True:
            inode = namespace_inode(f"/proc/{holder.pid}/ns/net")
            if inode is not None and inode != namespace_inode("/proc/self/ns/net"):
                break
            assert time.monotonic() < deadline
            time.sleep(0.02)
        ns.inode = inode
        yield ns
    finally:
        for proc in [*ns.started, holder]:
            processes.stop(proc, 2)


@pytest.fixture
def standin(netns: Namespace, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    fifo, log = tmp_path / "watchdog", tmp_path / "watchdog.log"
    argv = [
        sys.executable, "-m", "hvplace.lab.watchdog", "--fifo", str(fifo), "--timeout",
        str(TIMEOUT_S), "--netns-inode", str(netns.inode), "--keep", str(netns.holder.pid),
    ]  # fmt: skip
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while "watchdog on" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        yield fifo, log
    finally:
        processes.stop(proc, 5)


def writer(fifo: Path) -> int:
    return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)


def test_unpetted_it_kills_the_namespace_but_its_holder(
    netns: Namespace, standin: tuple[Path, Path]
) -> None:
    fifo, log = standin
    qemu = netns.spawn()
    fd = writer(fifo)
    try:
        # Petted well inside the timeout for three timeouts: nothing happens.
        until = time.monotonic() + 3 * TIMEOUT_S
        while time.monotonic() < until:
            os.write(fd, b"\0")
            time.sleep(TIMEOUT_S / 5)
        assert qemu.poll() is None
        stopped = time.monotonic()
        qemu.wait(timeout=5)
        fired_after = time.monotonic() - stopped
    finally:
        os.close(fd)
    assert TIMEOUT_S * 0.8 < fired_after < TIMEOUT_S + 1.0
    assert pid_alive(netns.holder.pid)
    assert "FIRED" in log.read_text()  # written before the first kill
    # Like a rebooted host's watchdog, it is disarmed until the next opener arms it.
    later = netns.spawn()
    time.sleep(3 * TIMEOUT_S)
    assert later.poll() is None


def test_close_without_magic_stays_armed_a_new_opener_pets_it(
    netns: Namespace, standin: tuple[Path, Path]
) -> None:
    """kill -9 of the agent closes the FIFO without 'V': the countdown goes on, unless a
    restarted agent opens it and pets in time."""
    fifo, log = standin
    qemu = netns.spawn()
    fd = writer(fifo)
    os.write(fd, b"\0")
    os.close(fd)
    time.sleep(TIMEOUT_S / 2)
    again = writer(fifo)
    try:
        until = time.monotonic() + 3 * TIMEOUT_S
        while time.monotonic() < until:
            os.write(again, b"\0")
            time.sleep(TIMEOUT_S / 5)
        assert qemu.poll() is None
    finally:
        os.close(again)
    qemu.wait(timeout=5)
    text = log.read_text()
    assert text.count("still armed") == 2 and "FIRED" in text


def test_magic_close_disarms(netns: Namespace, standin: tuple[Path, Path]) -> None:
    fifo, log = standin
    qemu = netns.spawn()
    fd = writer(fifo)
    os.write(fd, b"\0")
    os.write(fd, b"V")
    os.close(fd)
    time.sleep(3 * TIMEOUT_S)
    assert qemu.poll() is None
    assert "magic close: disarmed" in log.read_text() and "FIRED" not in log.read_text()
