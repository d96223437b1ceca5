"""The agent and the host's watchdog (SPEC §4), against a real etcd and test:/// hosts: the
device is a FIFO this test reads, as the lab's stand-in does, timestamping every pet."""

from __future__ import annotations

import asyncio
import itertools
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agent.conftest import put_assignment, vm
from hvplace.agent.config import AgentConfig
from hvplace.agent.service import Agent
from hvplace.proto import keyspace
from hvplace.proto.codec import dumps
from hvplace.proto.errors import InvalidInput
from hvplace.proto.records import ClusterConfig, DomainState
from support.etcd import EtcdServer
from support.wait import eventually

StartAgent = Callable[[AgentConfig], Any]
FAST = {"lease_ttl": 2.0, "fence_after": 1.0}  # watchdog_timeout_s derived: 1 s


class FifoWatchdog:
    """The reading end of a watchdog FIFO: when each write came, and how each writer left."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path, 0o600)
        self.pets: list[float] = []  # time.monotonic() of every write
        self.closes: list[bool] = []  # per writer gone: True when its last write held 'V'
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._fd = self._open()
        self._thread.start()

    def _open(self) -> int:
        return os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)

    def _run(self) -> None:
        magic = False
        while not self._stop.is_set():
            if not select.select([self._fd], [], [], 0.05)[0]:
                continue
            data = os.read(self._fd, 4096)
            if data:
                self.pets.append(time.monotonic())
                magic = b"V" in data
                continue
            self.closes.append(magic)
            new = self._open()
            os.close(self._fd)
            self._fd, magic = new, False

    def between(self, start: float, end: float) -> list[float]:
        return [p for p in self.pets if start < p < end]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        os.close(self._fd)


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[FifoWatchdog]:
    reader = FifoWatchdog(tmp_path / "watchdog")
    yield reader
    reader.close()


def config(
    etcd: EtcdServer, make: Callable[..., AgentConfig], fifo: FifoWatchdog, **kw: Any
) -> AgentConfig:
    return make("h1", etcd_endpoints=(etcd.endpoint,), watchdog_device=str(fifo.path), **kw)


async def test_pets_continue_while_the_lease_is_fresh_and_stop_when_the_loop_hangs(
    etcd: EtcdServer, test_host: Callable[..., AgentConfig], run_agent: StartAgent, fifo: Any
) -> None:
    agent: Agent = await run_agent(config(etcd, test_host, fifo, **FAST))
    await eventually(lambda: len(fifo.pets) > 3, 5)
    fence_after = agent.cluster.fence_after_s
    # A fresh lease: pets keep coming, several per watchdog timeout.
    await asyncio.sleep(2 * fence_after)
    recent = fifo.between(time.monotonic() - 2 * fence_after, time.monotonic())
    assert max(b - a for a, b in itertools.pairwise(recent)) < 0.5
    # A hung agent: its event loop blocked (the lease unrenewed, no fence can run). The
    # petter thread goes on only until the last renewal is fence_after old.
    last_renewal = agent.lease.last_ack_sent
    blocked = time.monotonic()
    time.sleep(fence_after + 1.0)  # noqa: ASYNC251 - hangs the agent's event loop on purpose
    unblocked = time.monotonic()
    during = fifo.between(blocked, unblocked)
    assert during, "pets stopped with the event loop, before the lease went stale"
    assert max(during) < last_renewal + fence_after + 0.05
    assert unblocked - max(during) > 0.9


async def test_a_frozen_etcd_stops_the_pets_until_the_fence_is_confirmed(
    own_etcd: EtcdServer, test_host: Callable[..., AgentConfig], run_agent: StartAgent, fifo: Any
) -> None:
    agent: Agent = await run_agent(config(own_etcd, test_host, fifo, **FAST))
    put_assignment(own_etcd, "h1", vm("web"))

    async def web_running() -> bool:
        found = (await agent.hv.list_managed()).get("s/web")
        return found is not None and found.state is DomainState.RUNNING

    await eventually(web_running, 10)
    # libvirt slow to destroy (1.5 s): the fence stays unconfirmed, and unpetted, that long.
    destroy = agent.hv.destroy_all_managed

    async def slow_destroy() -> list[str]:
        await asyncio.sleep(1.5)
        return await destroy()

    agent.hv.destroy_all_managed = slow_destroy  # type: ignore[method-assign]
    confirmed: list[float] = []
    verify = agent.lease._verify_fenced

    async def spy() -> bool:
        ok = await verify()
        if ok:
            confirmed.append(time.monotonic())
        return ok

    agent.lease._verify_fenced = spy  # type: ignore[method-assign]
    own_etcd.signal(signal.SIGSTOP)
    try:
        await eventually(lambda: confirmed, 10)
        last_renewal = agent.lease.last_ack_sent
        assert not await web_running()
        # No pet from fence_after past the last renewal until nothing ran any more.
        stale = last_renewal + agent.cluster.fence_after_s
        assert confirmed[0] - stale > 1.4
        assert fifo.between(stale + 0.01, confirmed[0]) == []
        # Then the host is safe to keep: pets resume while the agent stays fenced.
        await eventually(lambda: fifo.between(confirmed[0], time.monotonic()), 2)
        assert agent.fenced
    finally:
        own_etcd.signal(signal.SIGCONT)
    await eventually(lambda: not agent.fenced and agent.lease_id is not None, 10)
    resumed = time.monotonic()
    await eventually(lambda: len(fifo.between(resumed, time.monotonic())) > 3, 5)


async def test_arms_after_a_timeout_on_a_new_lease_at_once_on_a_live_one(
    etcd: EtcdServer, test_host: Callable[..., AgentConfig], run_agent: StartAgent, fifo: Any
) -> None:
    """Opening a running watchdog pets it: a new agent arms at once only when its previous
    lease is still alive (nothing was re-placed), else a whole timeout after it started.
    Nothing starts before the watchdog is armed."""
    cfg = config(etcd, test_host, fifo, **FAST)
    started = time.monotonic()
    agent = Agent(cfg)
    task = asyncio.ensure_future(agent.run())
    put_assignment(etcd, "h1", vm("web"))

    async def web_running() -> bool:
        found = (await agent.hv.list_managed()).get("s/web")
        return found is not None and found.state is DomainState.RUNNING

    await eventually(web_running, 10, interval=0.02)
    running_at = time.monotonic()
    assert fifo.pets and fifo.pets[0] - started >= agent.cluster.watchdog_s
    assert fifo.pets[0] <= running_at
    # A clean stop with a guest running leaves the watchdog armed (no magic close).
    await agent.shutdown()
    await asyncio.wait_for(task, 15)
    await eventually(lambda: fifo.closes == [False], 2)

    # The next agent finds its lease alive in etcd: it arms at once.
    again = time.monotonic()
    second: Agent = await run_agent(cfg)
    await eventually(lambda: fifo.between(again, time.monotonic()), 5, interval=0.02)
    assert fifo.between(again, time.monotonic())[0] - again < agent.cluster.watchdog_s
    # Stopped cleanly with nothing running (the assignment gone), it disarms: 'V'.
    etcd.etcdctl("del", "--prefix", keyspace.ASSIGNMENTS)

    async def nothing_runs() -> bool:
        return not await second.hv.list_managed()

    await eventually(nothing_runs, 10)
    await second.shutdown()
    await eventually(lambda: fifo.closes == [False, True], 15)


async def test_refuses_a_watchdog_slower_than_the_budget(
    etcd: EtcdServer, test_host: Callable[..., AgentConfig], tmp_path: Path, fifo: Any
) -> None:
    slow = config(etcd, test_host, fifo, watchdog_timeout_s=3.0)
    # No cluster record: the agent's own budget (TTL 5 s, fence_after 3 s) is unsafe.
    with pytest.raises(InvalidInput, match=r"watchdog_timeout_s 3\.0 .* = 6\.5s after"):
        await Agent(slow).run()
    # The agent's timeout above the cluster's.
    etcd.etcdctl(
        "put",
        keyspace.CONFIG,
        dumps(ClusterConfig(lease_ttl_s=5, fence_after_s=3, watchdog_timeout_s=1.5)).decode(),
    )
    with pytest.raises(InvalidInput, match=r"watchdog_timeout_s 3\.0 exceeds the cluster's 1\.5"):
        await Agent(slow).run()
    # A kernel watchdog counts whole seconds: 1.5 s would run as 2 s.
    char = test_host("h1", etcd_endpoints=(etcd.endpoint,), watchdog_device="/dev/null")
    with pytest.raises(InvalidInput, match="counts whole seconds"):
        await Agent(char).run()
    missing = test_host("h1", etcd_endpoints=(etcd.endpoint,), watchdog_device=str(tmp_path / "x"))
    with pytest.raises(InvalidInput, match="modprobe softdog"):
        await Agent(missing).run()


async def test_keeps_its_budget_when_a_new_record_is_shorter_than_the_armed_watchdog(
    etcd: EtcdServer,
    test_host: Callable[..., AgentConfig],
    run_agent: StartAgent,
    fifo: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent: Agent = await run_agent(config(etcd, test_host, fifo, **FAST))
    await eventually(lambda: agent.lease.watchdog is not None, 5)
    before = agent.cluster
    shorter = ClusterConfig(lease_ttl_s=2, fence_after_s=1, watchdog_timeout_s=0.5)
    etcd.etcdctl("put", keyspace.CONFIG, dumps(shorter).decode())
    # The lease revoked: the agent fences, registers again and re-reads the record.
    etcd.etcdctl("lease", "revoke", f"{agent.lease_id:x}")
    await eventually(lambda: agent.fence_count == 1 and agent.lease_id is not None, 10)
    assert agent.cluster == before
    assert "the armed watchdog's 1s exceeds its watchdog timeout 0.5s" in caplog.text
