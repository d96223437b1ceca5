"""The agent daemon: the reconcile worker, libvirt health and status reporting, over the
lease keeper (lease.py: lease, fencing, the host's watchdog).

`Agent.run()` until `shutdown()`; every task is level-triggered off one `dirty` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import psutil
from hvplace.agent import capacity, reconcile, watchdog
from hvplace.agent.config import AgentConfig, cluster_config, watchdog_timeout
from hvplace.agent.hypervisor import (
    Hypervisor,
    HypervisorError,
    HypervisorUnavailable,
    LibvirtHypervisor,
    MigrationTarget,
)
from hvplace.agent.lease import LeaseKeeper
from hvplace.agent.metrics import AgentMetrics, MetricsServer
from hvplace.agent.reconcile import ActionKind
from hvplace.agent.status import domain_status
from hvplace.agent.store import EtcdStore, StoreError
from hvplace.proto.errors import InvalidInput
from hvplace.proto.records import (
    Assignment,
    ClusterConfig,
    DomainState,
    DomainStatus,
    HostInfo,
    Migration,
)
from hvplace.runtime import systemd

PARALLEL_STARTS = 2
"""Domains started at once; QEMU under TCG takes 0.5-2.5 s to come up on a busy host."""
RETRY_FAILED_S = (10.0, 300.0)
"""A VM whose define/start failed is retried (same assignment) after 10 s, doubling to 5 min:
libvirt refusing a spec is rarely transient, and the coordinator moves it elsewhere."""
HYPERVISOR_PING_S = 1.0
"""How often the agent checks that libvirtd answers (a dead one closes the socket at once)."""
HYPERVISOR_PING_TIMEOUT_S = 3.0
HYPERVISOR_RETRY_S = (0.5, 5.0)
"""Reconnect backoff while libvirtd is down: bounded, so recovery is seen within 5 s."""


MIGRATION_TIMEOUT_S = 120.0
"""A live migration whose record names no timeout is aborted by libvirt after this."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Outgoing:
    """This host's part in a live migration of one VM: running, done or failed."""

    uid: str
    epoch: int
    target: str
    started_at: float  # the record's: a new request for the same move is a new migration
    done: bool = False
    error: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class _Failure:
    """The last failure of one assignment (uid, epoch) on this host, and when to try again."""

    uid: str
    epoch: int
    message: str
    attempts: int
    retry_at: float


log = logging.getLogger(__name__)
AGENT_VERSION = "0.1.0"


class Agent:
    def __init__(
        self,
        cfg: AgentConfig,
        *,
        hypervisor: Hypervisor | None = None,
        store: EtcdStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.hv: Hypervisor = hypervisor or LibvirtHypervisor(
            cfg.libvirt_uri,
            domain_type=cfg.domain_type,
            images_dir=cfg.images,
            console_dir=cfg.consoles,
            state_dir=cfg.state_dir,
            guest_cache_dir=cfg.guest_cache_dir,
            probe_timeout_s=cfg.kvm_probe_timeout_s,
            image_dirs=cfg.catalogue_dirs,
        )
        self.store = store or EtcdStore(
            cfg.etcd_endpoints,
            cfg.host,
            cfg.etcd_timeout_s,
            tls=cfg.etcd_tls,
            auth=cfg.etcd_auth,
        )
        self.metrics = AgentMetrics()
        self._clock = clock
        self._stopping = asyncio.Event()
        self._dirty = asyncio.Event()
        self.info: HostInfo | None = None
        self._written: dict[str, DomainStatus] = {}
        self._stale_status: set[str] = set()
        self._since: dict[str, tuple[DomainState, float]] = {}
        # VMs whose define/start libvirt refused, held back until their retry time.
        self._failures: dict[str, _Failure] = {}
        # Live migrations this agent runs as their source, by VM key (see _migrations).
        self._outgoing: dict[str, _Outgoing] = {}
        self._migration_tasks: dict[str, asyncio.Task[None]] = {}
        # Why libvirt is unusable ("" while it answers); reported in HostInfo.
        self.hypervisor_error = ""
        self._hypervisor_since = 0.0
        self._hv_open = False
        self._tasks: list[asyncio.Task[None]] = []
        self._server: MetricsServer | None = None
        self.lease = LeaseKeeper(
            cfg,
            store=self.store,
            hv=self.hv,
            metrics=self.metrics,
            clock=clock,
            stopping=self._stopping,
            trigger=self._trigger,
            spawn=self._spawn,
            host_info=lambda: self.info,
            on_lease=self._on_lease,
        )
        self.registered = self.lease.registered
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown_done = False

    # The lease's state, as callers and tests read it.
    @property
    def cluster(self) -> ClusterConfig:
        return self.lease.cluster

    @property
    def lease_id(self) -> int | None:
        return self.lease.lease_id

    @property
    def fenced(self) -> bool:
        return self.lease.fenced

    @property
    def fence_count(self) -> int:
        return self.lease.fence_count

    # -- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        """Open libvirt, read the timing budget (refusing an unsafe one), then run until shutdown."""
        self._loop = asyncio.get_running_loop()
        try:
            self.hv.on_event(self._on_domain_event)
            try:
                await self.hv.open()
                self._hv_open = True
            except HypervisorUnavailable as e:
                # libvirtd is down as this agent starts: keep the host registered, as
                # degraded, from the last record, so that its running guests are not
                # re-placed (they run on without libvirtd); open again in the monitor.
                saved = self.lease.saved_host_info()
                if saved is None:
                    raise
                log.error("libvirt unusable at start (%s); registering degraded", e.message)
                self.hypervisor_error = e.message
                self._hypervisor_since = time.time()
                self.metrics.hypervisor_up.set(0)
            await self._load_cluster_config()
            if self._hv_open:
                self.info = await self._host_info()
            else:
                assert saved is not None
                # Only the measured capacity is the saved one; the rest is this config's.
                self.info = dataclasses.replace(
                    saved,
                    labels=self.cfg.labels,
                    ratios=self.cfg.ratios,
                    reserved_memory_mib=self.cfg.reserved_memory_mib,
                    address=self.cfg.address,
                    libvirt_uri=self.cfg.libvirt_uri,
                    agent_version=AGENT_VERSION,
                    started_at=time.time(),
                    hypervisor_error=self.hypervisor_error,
                    hypervisor_error_since=self._hypervisor_since,
                )
            log.info(
                "agent %s on %s (domain type %s): lease_ttl %.1fs, fence_after %.1fs, capacity %s",
                self.cfg.host,
                self.cfg.libvirt_uri,
                self.hv.domain_type,
                self.cluster.lease_ttl_s,
                self.cluster.fence_after_s,
                self.info.capacity,
            )
            if self.cfg.watchdog_device:
                planned = watchdog.device_timeout(
                    self.cfg.watchdog_device, watchdog_timeout(self.cfg, self.cluster)
                )
                if planned > self.cluster.watchdog_s:
                    raise InvalidInput(
                        f"unsafe timing budget: watchdog {self.cfg.watchdog_device} counts whole"
                        f" seconds: {planned:g}s exceeds the cluster's watchdog timeout"
                        f" {self.cluster.watchdog_s}s"
                    )
            elif self.cfg.libvirt_uri.startswith("qemu"):
                log.warning(
                    "no watchdog_device: if this agent dies, its guests run on while the"
                    " coordinator re-places them (SPEC §4; see the README on fencing)"
                )
            if self.cfg.metrics_listen:
                self._server = MetricsServer(self.metrics, self.health)
                try:
                    await self._server.start(self.cfg.metrics_listen)
                except OSError as e:
                    log.error("metrics on %s unavailable: %s", self.cfg.metrics_listen, e)
                    self._server = None
            self.lease.start()
            self._spawn(self.lease.lease_loop())
            self._spawn(self.lease.arm_watchdog())
            self._spawn(self.lease.fence_monitor())
            self._spawn(self._reconcile_worker())
            self._spawn(self._watch_loop())
            self._spawn(self._watch_loop(migrations=True))
            self._spawn(self._resync_ticker())
            self._spawn(self._systemd_watchdog())
            self._spawn(self._hypervisor_monitor())
            self._trigger()
            stop = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait([stop, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            for t in self._tasks:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            await self._cleanup()

    async def shutdown(self) -> None:
        """Idempotent; domains are left running (a restarted agent adopts them) under the
        armed watchdog, which resets the host unless an agent is back within its window."""
        self._stopping.set()

    async def _cleanup(self) -> None:
        if self._shutdown_done:
            return
        self._shutdown_done = True
        self._stopping.set()
        for t in [*self._tasks, *self._migration_tasks.values()]:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._migration_tasks.values(), return_exceptions=True)
        if self._server is not None:
            await self._server.stop()
        await self.lease.release_watchdog()
        await self.store.close()
        await self.hv.close()
        log.info("agent %s stopped", self.cfg.host)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.ensure_future(coro))

    def _trigger(self) -> None:
        self._dirty.set()

    def _on_domain_event(self, _domain: str) -> None:
        """From libvirt's event thread: any lifecycle change means resync now."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._trigger)

    def health(self) -> tuple[bool, str]:
        if self.fenced:
            return False, "fenced: lease lost"
        if self.lease_id is None:
            return False, "no lease"
        if self.hypervisor_error:
            return False, f"degraded: {self.hypervisor_error}"
        return True, "ok"

    # -- registration and lease ------------------------------------------------------

    async def _load_cluster_config(self) -> None:
        """Retries until etcd answers; an unsafe budget raises InvalidInput (refuse to start)."""
        delay = 0.2
        while True:
            try:
                record = await self.store.cluster_config()
                break
            except StoreError as e:
                log.warning("reading the cluster config: %s; retrying", e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self.lease.cluster = cluster_config(record, self.cfg)

    async def _host_info(self) -> HostInfo:
        facts = await self.hv.node_facts()
        disk = await asyncio.to_thread(psutil.disk_usage, str(self.cfg.images))
        info = capacity.host_info(
            name=self.cfg.host,
            facts=facts,
            images_disk_bytes=disk.total,
            labels=self.cfg.labels,
            ratios=self.cfg.ratios,
            reserved_memory_mib=self.cfg.reserved_memory_mib,
            address=self.cfg.address,
            libvirt_uri=self.cfg.libvirt_uri,
            domain_type=self.hv.domain_type,
            agent_version=AGENT_VERSION,
            started_at=time.time(),
        )
        return dataclasses.replace(
            info, migration_uri=self.cfg.migration_uri, console_dir=str(self.cfg.consoles)
        )

    async def _on_lease(self) -> None:
        """A new lease: statuses are written afresh on it; any left under this host's
        keys from before are dropped unless still current."""
        self._stale_status = set(await self.store.domain_keys())
        self._written.clear()

    # -- libvirt health ---------------------------------------------------------------

    async def _hypervisor_monitor(self) -> None:
        """Ping libvirtd; while it is unusable say so in the host record (the coordinator
        marks the host degraded) and retry with a bounded backoff. Nothing is fenced or
        destroyed for it: QEMU guests run on without libvirtd."""
        first, cap = HYPERVISOR_RETRY_S
        delay = first
        while not self._stopping.is_set():
            try:
                if self._hv_open:
                    await self.hv.ping(HYPERVISOR_PING_TIMEOUT_S)
                else:
                    await self._open_late()
            except HypervisorError as e:
                await self._hypervisor_down(e.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, cap)
                continue
            delay = first
            if self.hypervisor_error:
                await self._hypervisor_up()
            await asyncio.sleep(HYPERVISOR_PING_S)

    async def _open_late(self) -> None:
        """Open libvirt that was down at start, then measure the host afresh."""
        try:
            await asyncio.wait_for(self.hv.open(), HYPERVISOR_PING_TIMEOUT_S * 10)
        except TimeoutError:
            raise HypervisorUnavailable("libvirt did not answer while opening") from None
        self._hv_open = True
        fresh = await self._host_info()
        if self.info is not None:
            fresh = dataclasses.replace(fresh, started_at=self.info.started_at)
        self.info = fresh
        log.warning("libvirt opened on %s (domain type %s)", self.cfg.host, self.hv.domain_type)

    async def _hypervisor_down(self, why: str) -> None:
        if not self.hypervisor_error:
            log.error("libvirt unusable on %s: %s; the host is degraded", self.cfg.host, why)
            self._hypervisor_since = time.time()
        if self.hypervisor_error != why:
            self.hypervisor_error = why
            self.metrics.hypervisor_up.set(0)
            await self._put_host_info()

    async def _hypervisor_up(self) -> None:
        log.warning(
            "libvirt on %s answers again after %.1fs",
            self.cfg.host,
            time.time() - self._hypervisor_since,
        )
        self.hypervisor_error = ""
        self._hypervisor_since = 0.0
        self.metrics.hypervisor_up.set(1)
        await self._put_host_info()
        self._trigger()

    async def _put_host_info(self) -> None:
        """Re-register with the hypervisor's health (on the lease held now, if any)."""
        if self.info is None:
            return
        self.info = dataclasses.replace(
            self.info,
            hypervisor_error=self.hypervisor_error,
            hypervisor_error_since=self._hypervisor_since,
        )
        lease = self.lease.lease_id
        if lease is None:
            return  # the lease keeper writes self.info with the next lease
        try:
            await self.store.put_host(self.info, lease)
        except StoreError as e:
            log.warning("reporting libvirt's health: %s", e)

    # -- reconcile --------------------------------------------------------------------

    async def _resync_ticker(self) -> None:
        while not self._stopping.is_set():
            await asyncio.sleep(self.cfg.resync_interval_s)
            self._trigger()

    async def _watch_loop(self, migrations: bool = False) -> None:
        delay = 0.2
        while not self._stopping.is_set():
            watch = self.store.watch_migrations() if migrations else self.store.watch_assignments()
            try:
                async for _ in watch:
                    delay = 0.2
                    self._trigger()
            except StoreError as e:
                log.debug("assignment watch: %s", e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            self._trigger()  # whatever the broken watch missed

    async def _systemd_watchdog(self) -> None:
        interval = systemd.watchdog_interval_s()
        if interval is None:
            await self._stopping.wait()  # every task lives until shutdown
            return
        while not self._stopping.is_set():
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _reconcile_worker(self) -> None:
        delay = 0.2
        while not self._stopping.is_set():
            await self._dirty.wait()
            self._dirty.clear()
            started = time.perf_counter()
            try:
                failed = await self.sync()
            except HypervisorUnavailable as e:
                await self._hypervisor_down(e.message)
                failed = True
            except (StoreError, HypervisorError) as e:
                log.warning("reconcile: %s; retrying in %.1fs", e, delay)
                failed = True
            except Exception:
                # A bug must not end the loop that keeps every other VM on this host.
                log.exception("reconcile pass failed; retrying in %.1fs", delay)
                failed = True
            self.metrics.reconcile.observe(time.perf_counter() - started)
            if failed:
                # Errors re-queue with backoff; the periodic resync also covers them.
                asyncio.get_running_loop().call_later(delay, self._trigger)
                delay = min(delay * 2, 5.0)
            else:
                delay = 0.2

    async def sync(self) -> bool:
        """One level-triggered pass over this host; True when an action failed."""
        if not self._hv_open:
            # Down since the agent started: nothing to compare against yet.
            raise HypervisorUnavailable(self.hypervisor_error or "libvirt not opened yet")
        gen, fenced = self.lease.fence_gen, self.lease.fenced
        may_start = self.lease.may_start and not fenced
        desired: dict[str, Assignment] = {}
        unreadable: dict[str, str] = {}
        migrations: dict[str, Migration] = {}
        # libvirt first, then etcd: an incoming guest listed here was created after its
        # migration record was written, so the read below shows the record (else a pass
        # that read etcd just before the record would destroy the guest arriving). And
        # migrations before assignments: the commit that ends a migration deletes its
        # record and moves the assignment in one revision, so assignments read after a
        # record is gone never still show the migrated-away VM here.
        actual = await self.hv.list_managed()
        if not fenced:
            migrations = await self.store.migrations()
            got = await self.store.assignments()
            desired, unreadable = got.valid, got.invalid
        the_plan = reconcile.plan(
            self.cfg.host,
            desired,
            actual,
            may_start=may_start,
            fenced=fenced,
            keep=frozenset(unreadable),
            migrations=migrations,
        )
        self._migrate_out(migrations, desired, actual, may_start)
        errors: dict[str, str] = {**unreadable, **the_plan.rejected}
        for key, message in the_plan.rejected.items():
            log.error("rejected assignment %s: %s", key, message)
        held = self._held(desired)
        errors.update(held)
        starts = [a for a in the_plan.actions if a.kind is ActionKind.START]
        for action in the_plan.actions:
            if action.kind is not ActionKind.START:
                await self._run_action(action, gen, errors)
        # Starts run two at a time: a failover that lands several VMs here must not boot
        # them one after another, and the libvirt thread pool (4) keeps threads free for
        # a fence's destroys.
        slots = asyncio.Semaphore(PARALLEL_STARTS)

        async def start(action: reconcile.Action) -> None:
            async with slots:
                await self._run_action(action, gen, errors)

        results = await asyncio.gather(*(start(a) for a in starts), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result  # HypervisorUnavailable: the host's fault, not the VM's
        if the_plan.actions:
            actual = await self.hv.list_managed()
        self._forget_successes(errors)
        await self._report(desired, actual, errors)
        return bool(errors.keys() - unreadable.keys() - the_plan.rejected.keys() - held.keys())

    def _held(self, desired: dict[str, Assignment]) -> dict[str, str]:
        """VMs whose assignment failed here and waits for its retry time: key -> message.
        A new assignment (uid or epoch) or a gone one forgets the failure."""
        now = self._clock()
        held: dict[str, str] = {}
        for key, failure in list(self._failures.items()):
            a = desired.get(key)
            if a is None or (a.vm.uid, a.epoch) != (failure.uid, failure.epoch):
                del self._failures[key]
            elif failure.retry_at > now:
                held[key] = failure.message
        return held

    def _note_failure(self, key: str, a: Assignment | None, message: str) -> None:
        """Hold this assignment back after a failure, at once: a pass that is cut short
        later (libvirt gone) must not leave it to be retried on every trigger."""
        if a is None:
            return  # a leftover domain's cleanup: retried each pass, nothing to place
        prev = self._failures.get(key)
        same = prev is not None and (prev.uid, prev.epoch) == (a.vm.uid, a.epoch)
        attempts = prev.attempts + 1 if prev is not None and same else 1
        first, cap = RETRY_FAILED_S
        wait = min(cap, first * 2 ** (attempts - 1))
        self._failures[key] = _Failure(a.vm.uid, a.epoch, message, attempts, self._clock() + wait)
        log.warning("VM %s failed here (%d time(s)); next try in %.0fs", key, attempts, wait)

    def _forget_successes(self, errors: dict[str, str]) -> None:
        """After a whole pass: what did not fail this time is no longer held."""
        for key in [k for k in self._failures if k not in errors]:
            del self._failures[key]

    async def _run_action(self, action: reconcile.Action, gen: int, errors: dict[str, str]) -> None:
        """Apply one action unless its VM already failed or a fence overtook this pass."""
        if action.key in errors:
            return
        overtaken = self.lease.overtaken(gen)
        if action.kind in (ActionKind.DEFINE, ActionKind.START) and overtaken:
            return
        try:
            await self._apply(action)
        except HypervisorUnavailable:
            raise  # the whole pass stops: nothing here is this VM's fault
        except (HypervisorError, InvalidInput) as e:
            self.metrics.reconcile_errors.inc()
            errors[action.key] = e.message
            log.error("%s %s failed: %s", action.kind.value, action.key, e.message)
            self._note_failure(action.key, action.assignment, e.message)
            return
        except Exception as e:
            # Whatever else one VM's action raises fails that VM, never the agent.
            self.metrics.reconcile_errors.inc()
            errors[action.key] = f"{action.kind.value}: {type(e).__name__}: {e}"
            log.exception("%s %s failed", action.kind.value, action.key)
            self._note_failure(action.key, action.assignment, errors[action.key])
            return
        log.info("%s %s (%s)", action.kind.value, action.key, action.reason)
        if action.kind is ActionKind.START and self.lease.overtaken(gen):
            # A fence landed while this start was in flight: undo it (and hold the
            # watchdog's pets until the fence monitor confirms nothing runs).
            self.lease.unverify()
            await self.hv.destroy(self._domain_of(action))

    @staticmethod
    def _domain_of(action: reconcile.Action) -> str:
        if action.domain:
            return action.domain
        from hvplace.agent.domain_xml import domain_name

        assert action.assignment is not None
        return domain_name(action.assignment.vm.scope, action.assignment.vm.name)

    async def _apply(self, action: reconcile.Action) -> None:
        kind = action.kind
        if kind is ActionKind.DEFINE:
            assert action.assignment is not None
            await self.hv.define(action.assignment)
        elif kind is ActionKind.START:
            await self.hv.start(self._domain_of(action))
        elif kind is ActionKind.STOP:
            await self.hv.stop(self._domain_of(action), self.cfg.stop_timeout_s)
        elif kind is ActionKind.DESTROY:
            await self.hv.destroy(self._domain_of(action))
        elif kind is ActionKind.UNDEFINE:
            await self.hv.undefine(self._domain_of(action))
        elif kind is ActionKind.RETAG:
            assert action.assignment is not None
            await self.hv.retag(self._domain_of(action), action.assignment)

    # -- live migration (source side) -------------------------------------------------

    def _migrate_out(
        self,
        migrations: dict[str, Migration],
        desired: dict[str, Assignment],
        actual: dict[str, reconcile.Observed],
        may_start: bool,
    ) -> None:
        """Start the libvirt job of each recorded migration from this host whose guest
        runs here at the recorded uid and epoch; forget outcomes whose record is gone."""
        for key in [k for k in self._outgoing if k not in migrations]:
            if key not in self._migration_tasks:
                del self._outgoing[key]
        for key, m in migrations.items():
            if m.source != self.cfg.host or key in self._migration_tasks:
                continue
            a, obs = desired.get(key), actual.get(key)
            if a is None or (a.vm.uid, a.epoch) != (m.uid, m.epoch):
                continue
            if obs is None or obs.state not in reconcile.ACTIVE:
                continue  # gone (moved already) or not running: nothing to send
            known = self._outgoing.get(key)
            if known is not None and (
                known.uid,
                known.epoch,
                known.target,
                known.started_at,
            ) == (m.uid, m.epoch, m.target, m.started_at):
                continue  # this very migration already ran: the coordinator settles it
            if not may_start:
                continue  # no lease (or fenced): act on nothing
            self._outgoing[key] = _Outgoing(m.uid, m.epoch, m.target, m.started_at)
            task = asyncio.ensure_future(self._run_migration(key, obs.domain, m))
            self._migration_tasks[key] = task

    async def _run_migration(self, key: str, domain: str, m: Migration) -> None:
        target = MigrationTarget(
            uri=m.target_uri,
            address=m.target_address,
            console_log=str(Path(m.target_console_dir) / f"{domain}.log"),
            timeout_s=m.timeout_s or MIGRATION_TIMEOUT_S,
        )
        log.info("live-migrating %s to %s (%s)", key, m.target, m.target_uri)
        self._trigger()  # report `migrating_to`
        started = time.perf_counter()
        try:
            await self.hv.migrate(domain, target)
        except HypervisorError as e:
            log.error("live migration of %s to %s failed: %s", key, m.target, e.message)
            self._outgoing[key] = _Outgoing(m.uid, m.epoch, m.target, m.started_at, error=e.message)
        except Exception as e:
            # One VM's migration must never take the agent down.
            log.exception("live migration of %s to %s failed", key, m.target)
            self._outgoing[key] = _Outgoing(
                m.uid, m.epoch, m.target, m.started_at, error=f"{type(e).__name__}: {e}"
            )
        else:
            log.info(
                "live-migrated %s to %s in %.2fs", key, m.target, time.perf_counter() - started
            )
            self._outgoing[key] = _Outgoing(m.uid, m.epoch, m.target, m.started_at, done=True)
        finally:
            self._migration_tasks.pop(key, None)
            self._trigger()

    # -- status -----------------------------------------------------------------------

    def _status(
        self,
        key: str,
        a: Assignment | None,
        obs: reconcile.Observed | None,
        error: str,
    ) -> DomainStatus:
        status = domain_status(
            self.cfg.host,
            key,
            a,
            obs,
            error,
            fenced=self.fenced,
            previous=self._since.get(key),
            now=time.time(),
        )
        self._since[key] = (status.state, status.since)
        out = self._outgoing.get(key)
        if out is None or (out.uid, out.epoch) != (status.uid, status.epoch):
            return status
        return dataclasses.replace(
            status,
            migrating_to=out.target if not out.done and not out.error else "",
            migrated_to=out.target if out.done else "",
            migration_error=out.error,
            migration_started_at=out.started_at,
        )

    async def _report(
        self,
        desired: dict[str, Assignment],
        actual: dict[str, reconcile.Observed],
        errors: dict[str, str],
    ) -> None:
        """Write changed statuses under this host's own keys, on the lease; drop the rest."""
        counts: dict[DomainState, int] = {}
        for obs in actual.values():
            counts[obs.state] = counts.get(obs.state, 0) + 1
        self.metrics.set_domains(counts)
        lease = self.lease.lease_id
        if lease is None:
            return  # nothing may be written without a lease (it would outlive us)
        keys = set(desired) | set(actual) | set(errors)
        for key in sorted(keys):
            status = self._status(key, desired.get(key), actual.get(key), errors.get(key, ""))
            if self._written.get(key) != status:
                await self.store.put_domain(status, lease)
                self._written[key] = status
        for key in sorted((set(self._written) | self._stale_status) - keys):
            scope, name = key.split("/", 1)
            await self.store.delete_domain(scope, name)
            self._written.pop(key, None)
            self._stale_status.discard(key)
            self._since.pop(key, None)
