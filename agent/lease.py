"""The agent's lease and fence state machine (SPEC §4): register the host on a lease,
renew it, fence (destroy every managed domain, start nothing) when renewals stop being
acknowledged within `fence_after_s`, and pet the host's watchdog only while that is safe.

States: no lease -> held (registered; starts allowed once the watchdog, if configured,
is armed) -> fenced (no lease; starts refused) -> held again on a new lease. `fence_gen`
counts fences, so a reconcile pass can tell that one overtook it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from hvplace.agent import reconcile, watchdog
from hvplace.agent.config import AgentConfig, cluster_config, watchdog_timeout
from hvplace.agent.hypervisor import Hypervisor, HypervisorError
from hvplace.agent.metrics import AgentMetrics
from hvplace.agent.store import EtcdStore, StoreError
from hvplace.proto.codec import dumps, loads
from hvplace.proto.errors import InvalidInput
from hvplace.proto.records import ClusterConfig, HostInfo
from hvplace.runtime import systemd

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Holds this host's lease and decides, from it, whether domains may run here."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        store: EtcdStore,
        hv: Hypervisor,
        metrics: AgentMetrics,
        clock: Callable[[], float],
        stopping: asyncio.Event,
        trigger: Callable[[], None],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        host_info: Callable[[], HostInfo | None],
        on_lease: Callable[[], Awaitable[None]],
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.hv = hv
        self.metrics = metrics
        self._clock = clock
        self._stopping = stopping
        self._trigger = trigger
        self._spawn = spawn
        self._host_info = host_info
        self._on_lease = on_lease
        """Called on each new lease before it is used: the agent re-reads what it wrote."""
        self.registered = asyncio.Event()
        self.cluster: ClusterConfig = ClusterConfig()
        self.lease_id: int | None = None
        self.last_ack_sent: float = 0.0
        # Fencing: `fenced` destroys and blocks starts; `fence_gen` lets an in-flight
        # reconcile pass notice it was overtaken by a fence.
        self.fenced = False
        self.fence_gen = 0
        self.fence_count = 0
        self.may_start = False
        # The host's watchdog (SPEC §4): armed once pets are safe, petted by a thread
        # while `may_pet()`; `fence_verified` says a fence left no domain active.
        self.watchdog: watchdog.WatchdogDevice | None = None
        self._petter: watchdog.Petter | None = None
        self.started_at = 0.0
        self._lease_reused = False
        self.fence_verified = False

    def start(self) -> None:
        """The budget is measured from the agent's start until the first renewal:
        domains adopted from a previous agent are fenced if etcd stays unreachable."""
        self.last_ack_sent = self.started_at = self._clock()

    @property
    def renew_interval_s(self) -> float:
        """Renew several times per fence budget, so one slow round trip never fences."""
        return min(self.cluster.lease_ttl_s / 3, self.cluster.fence_after_s / 4)

    def _lease_file(self) -> Path:
        return self.cfg.state_dir / "lease.json"

    def _host_file(self) -> Path:
        return self.cfg.state_dir / "host.json"

    def saved_host_info(self) -> HostInfo | None:
        """The host record of the previous run (capacity needs libvirt to be measured)."""
        try:
            info = loads(HostInfo, self._host_file().read_bytes())
        except (OSError, InvalidInput):
            return None
        return info if info.name == self.cfg.host else None

    async def _previous_lease(self) -> int | None:
        """A lease a previous run of this agent still holds: reusing it keeps the host
        key from flapping across a restart."""
        try:
            saved = json.loads(self._lease_file().read_text())
            lease = int(saved["lease_id"])
            if saved.get("host") != self.cfg.host:
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        try:
            ttl = await self.store.keepalive(lease, self.cfg.etcd_timeout_s)
        except StoreError:
            return None
        return lease if ttl > 0 else None

    async def _acquire(self) -> None:
        try:
            budget = cluster_config(await self.store.cluster_config(), self.cfg)
            armed = self.watchdog
            if armed is not None and armed.timeout_s > budget.watchdog_s:
                raise InvalidInput(
                    f"the armed watchdog's {armed.timeout_s:g}s exceeds its watchdog timeout"
                    f" {budget.watchdog_s}s"
                )
            self.cluster = budget
        except InvalidInput as e:
            log.error("cluster config is unsafe; keeping the previous budget: %s", e)
        sent = self._clock()
        lease = None if self.fence_count else await self._previous_lease()
        if lease is not None:
            # Still alive in etcd: the coordinator has re-placed nothing, so pets based
            # on it are safe at once (see arm_watchdog).
            self._lease_reused = True
        else:
            lease = await self.store.grant(self.cluster.lease_ttl_s)
        info = self._host_info()
        assert info is not None
        await self.store.put_host(info, lease)
        try:
            self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
            self._lease_file().write_text(json.dumps({"host": self.cfg.host, "lease_id": lease}))
            self._host_file().write_bytes(dumps(info))
        except OSError as e:
            log.warning("cannot save the lease id: %s", e)
        await self._on_lease()
        self.last_ack_sent = sent
        self.lease_id = lease
        self.metrics.lease_held.set(1)
        # Holding a lease again ends the fence; the next reconcile pass reads the
        # assignments afresh (after this point) before anything is started.
        if self.fenced:
            log.warning("new lease %x held: assignments will be re-read before any start", lease)
        self.fenced = False
        self.metrics.fenced.set(0)
        # Nothing starts on a host whose watchdog is configured but not armed yet.
        self.may_start = not self.cfg.watchdog_device or self.watchdog is not None
        self.registered.set()
        systemd.notify("READY=1")
        log.info("host %s registered on lease %x", self.cfg.host, lease)
        self._trigger()

    async def lease_loop(self) -> None:
        delay = 0.2
        while not self._stopping.is_set():
            lease = self.lease_id
            if lease is None:
                try:
                    await self._acquire()
                    delay = 0.2
                except StoreError as e:
                    log.warning("registering host %s: %s", self.cfg.host, e)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                continue
            sent = self._clock()
            try:
                ttl = await self.store.keepalive(lease, self.renew_interval_s)
            except StoreError as e:
                self.metrics.lease_renew_failures.inc()
                log.warning("lease renewal failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            if self.lease_id != lease:
                continue  # fenced meanwhile: that lease is abandoned
            if ttl <= 0:
                # etcd dropped the lease: the coordinator may already be re-placing.
                await self.fence("etcd reports the lease expired")
                continue
            self.last_ack_sent = sent
            self.metrics.lease_renew.observe(self._clock() - sent)
            await asyncio.sleep(max(0.0, self.renew_interval_s - (self._clock() - sent)))

    # -- the host's watchdog ------------------------------------------------------------

    def may_pet(self) -> bool:
        """Called from the petter thread. Pets keep the host (and its guests) alive, so
        only while the lease is fresh -- its last renewal younger than fence_after: a dead
        or hung agent's host resets by fence_after + watchdog_timeout after it, before the
        coordinator may re-place -- or while fenced with no managed domain left active."""
        if self.fenced:
            return self.fence_verified
        return (
            self.lease_id is not None
            and self._clock() - self.last_ack_sent < self.cluster.fence_after_s
        )

    def _may_arm(self, timeout: float) -> bool:
        return (
            self.may_pet()
            and not self.fenced
            and (self._lease_reused or self._clock() - self.started_at >= timeout)
        )

    async def arm_watchdog(self) -> None:
        """Open the device once pets are safe. Opening a running watchdog counts as a pet,
        and one armed by a previous agent may still be counting down on guests whose lease
        has expired: so arm at once only on a lease still alive in etcd (reused), else
        only once a whole timeout has passed since this agent started (that countdown is
        over). Until armed, nothing is started."""
        path = self.cfg.watchdog_device
        if not path:
            await self._stopping.wait()
            return
        timeout = watchdog_timeout(self.cfg, self.cluster)
        # Conditions on the clock and the lease's age: polled.
        while not self._may_arm(timeout):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        device = await asyncio.to_thread(watchdog.WatchdogDevice, path, timeout)
        if device.timeout_s > self.cluster.watchdog_s:
            # Left armed (no magic close): resetting the host is the safe way out.
            device.close()
            raise InvalidInput(
                f"watchdog {path} runs with a {device.timeout_s:g}s timeout, above the"
                f" cluster's watchdog timeout {self.cluster.watchdog_s}s"
            )
        self.watchdog = device
        self._petter = watchdog.Petter(device, min(0.2, device.timeout_s / 5), self.may_pet)
        self._petter.start()
        log.info(
            "watchdog %s armed: %gs timeout, petted while the lease is fresh (fence_after %gs)",
            path,
            device.timeout_s,
            self.cluster.fence_after_s,
        )
        if self.lease_id is not None and not self.fenced:
            self.may_start = True
            self._trigger()
        await self._stopping.wait()

    async def release_watchdog(self) -> None:
        """On a clean stop: disarm (magic 'V') only when no managed domain is active, so
        nothing is left to fence; else leave it armed: guests run on for a restarted
        agent to adopt, and the host resets before they are re-placed if none comes."""
        petter, device = self._petter, self.watchdog
        if petter is not None:
            petter.stop()
        if device is None:
            return
        try:
            active = await self._active_domains()
        except HypervisorError as e:
            active = [f"(unknown: {e})"]
        if active:
            device.close()
            log.warning(
                "watchdog %s left armed over %d running guest(s): an agent back within"
                " %gs adopts them, else the host resets before they are re-placed",
                device.path,
                len(active),
                device.timeout_s,
            )
        else:
            device.disarm()
            log.info("watchdog %s disarmed: no guest runs here", device.path)

    # -- fencing ----------------------------------------------------------------------

    async def fence_monitor(self) -> None:
        while not self._stopping.is_set():
            await asyncio.sleep(0.05)
            silent = self._clock() - self.last_ack_sent
            if not self.fenced and silent >= self.cluster.fence_after_s:
                await self.fence(f"lease not renewed for {silent:.2f}s")
            elif self.fenced and not self.fence_verified and self.watchdog is not None:
                # The watchdog stays unpetted until the fence is confirmed.
                await self._verify_fenced()
                await asyncio.sleep(0.5)

    def overtaken(self, gen: int) -> bool:
        """A fence landed since a reconcile pass read `fence_gen` as `gen`."""
        return self.fenced or self.fence_gen != gen

    def unverify(self) -> None:
        """A domain may have started after the fence: hold the watchdog's pets until the
        fence monitor confirms again that nothing runs."""
        self.fence_verified = False

    async def _active_domains(self) -> list[str]:
        """Managed domains libvirt reports active (running or paused) right now."""
        managed = await self.hv.list_managed()
        return [o.domain for o in managed.values() if o.state in reconcile.ACTIVE]

    async def _verify_fenced(self) -> bool:
        """Destroy what is still active; True (and pets resume) when nothing is."""
        try:
            await self.hv.destroy_all_managed()
            left = await self._active_domains()
        except HypervisorError as e:
            left = [f"(libvirt: {e})"]
        if left:
            log.error(
                "fence not confirmed (%s): the watchdog is not petted and resets the host",
                ", ".join(left),
            )
            return False
        self.fence_verified = self.fenced
        return True

    async def fence(self, why: str) -> None:
        """SPEC §4: destroy every managed domain; start none until a new lease is held."""
        if self.fenced:
            return
        self.fence_verified = False  # before `fenced`: the petter thread reads both
        self.fenced = True
        self.fence_gen += 1
        self.may_start = False
        old, self.lease_id = self.lease_id, None
        self.fence_count += 1
        self.metrics.fence_events.inc()
        self.metrics.fenced.set(1)
        self.metrics.lease_held.set(0)
        started = self._clock()
        log.error("FENCING host %s: %s; destroying every managed domain", self.cfg.host, why)
        try:
            destroyed = await self.hv.destroy_all_managed()
            self.metrics.fence_duration.observe(self._clock() - started)
        except HypervisorError as e:
            log.error("fence: listing domains failed (%s); the reconcile pass retries", e)
            destroyed = []
        log.error(
            "FENCED host %s: destroyed %d domain(s) in %.2fs: %s",
            self.cfg.host,
            len(destroyed),
            self._clock() - started,
            ", ".join(destroyed) or "none",
        )
        if self.watchdog is not None:
            await self._verify_fenced()
        if old is not None:
            self._spawn(self._revoke(old))
        self._trigger()

    async def _revoke(self, lease: int) -> None:
        """Best effort, so the coordinator learns at once when etcd is reachable."""
        with contextlib.suppress(StoreError):
            await self.store.revoke(lease)
