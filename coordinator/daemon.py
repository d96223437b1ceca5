"""The coordinator daemon: store, cache, election, planner, controller, metrics and the gRPC API
wired together with a clean lifecycle (`run()`, idempotent `shutdown()`, `async with`)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from hvplace.coordinator.autorebalance import AutoRebalancer
from hvplace.coordinator.backend import CoreBackend
from hvplace.coordinator.cache import Cache
from hvplace.coordinator.config import CoordinatorConfig, budget_text
from hvplace.coordinator.controller import Controller
from hvplace.coordinator.election import Election
from hvplace.coordinator.metrics import CoordinatorMetrics
from hvplace.coordinator.migration import Migrations
from hvplace.coordinator.moves import ColdMover, LiveMover
from hvplace.coordinator.operations import Operations
from hvplace.coordinator.planner import Outcome, Planner
from hvplace.coordinator.rebalance import Mover
from hvplace.coordinator.store import Fence, Store
from hvplace.runtime.systemd import notify, watchdog_interval_s

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ApiCore:
    """What serves the API over a store and its cache: the planner that commits, the
    backend Operations call, and the Operations the gRPC servicers translate for."""

    planner: Planner
    backend: CoreBackend
    operations: Operations


def api_core(
    store: Store,
    cache: Cache,
    *,
    fence: Callable[[], Fence | None] = lambda: None,
    election: Election | None = None,
    admission_on_create: bool = True,
    mover: Callable[[Planner], Mover] | None = None,
) -> ApiCore:
    """The one assembly of the API's core, for the daemon and for tests. `fence` gives
    the token every commit compares (the election's, or None: standalone, each commit
    compares the revisions it read)."""
    planner = Planner(store, cache, fence)
    backend = CoreBackend(store, cache, planner, election)
    moves = mover(planner) if mover is not None else None
    operations = Operations(backend, admission_on_create=admission_on_create, mover=moves)
    return ApiCore(planner, backend, operations)


COLLECTOR_GEN0 = 10_000
"""The cyclic collector's first threshold in the coordinator's process (Python's is 700)."""


def tune_collector() -> None:
    """The coordinator allocates records by the hundred thousand and they are acyclic:
    at Python's default the collector runs a young pass per 700 allocations and full
    passes over every record created since the last relist. Fewer, larger passes: at
    20,000 creates the collector's time fell from 346 to 122 ms, and the coordinator's
    CPU per placement by a tenth (bench/commit.py, 3 alternating pairs)."""
    gc.set_threshold(COLLECTOR_GEN0, 10, 10)


class Coordinator:
    """One coordinator process. `run()` until `shutdown()`; as a context manager it runs in
    the background and shuts down on exit (the Temporal worker's shape)."""

    def __init__(
        self, cfg: CoordinatorConfig, *, serve_api: bool = True, admission_on_create: bool = True
    ) -> None:
        self.cfg = cfg
        self.admission_on_create = admission_on_create
        self.serve_api = serve_api and bool(cfg.listen)
        self.metrics = CoordinatorMetrics()
        self.store: Store | None = None
        self.cache: Cache | None = None
        self.election: Election | None = None
        self.planner: Planner | None = None
        self.controller: Controller | None = None
        self.mover: LiveMover | None = None
        self.backend: CoreBackend | None = None
        self.operations: Operations | None = None
        self.api: Any = None
        self.api_port = 0
        self.metrics_port = 0
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Coordinator:
        self._task = asyncio.create_task(self.run(), name="hvplace-coordinator")
        ready = asyncio.create_task(self.ready.wait())
        await asyncio.wait({self._task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            ready.cancel()
            self._task.result()  # raises the start-up error
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()
        if self._task is not None:
            await self._task

    async def shutdown(self) -> None:
        """Idempotent: ask `run()` to stop; it resigns leadership and closes everything."""
        self._stop.set()

    async def run(self) -> None:
        cfg = self.cfg
        cluster = cfg.cluster()
        log.info("hvplace-coordinator %s starting; %s", cfg.node_name, budget_text(cluster))
        store = self.store = await Store.connect(
            cfg.etcd_endpoints, timeout=cfg.etcd_timeout_s, tls=cfg.etcd_tls, auth=cfg.etcd_auth
        )
        tasks: list[asyncio.Task[Any]] = []
        try:
            cache = self.cache = Cache(store)
            await cache.start()
            stored = cache.config
            if stored is not None and stored != cluster:
                log.info("etcd holds the cluster config in force: %s", budget_text(stored))
            store.on_conflict = self.metrics.txn_conflicts.inc
            controller_box: list[Controller] = []

            auto_box: list[AutoRebalancer] = []

            async def lead(fence: Fence) -> None:
                # The rebalancer's loop lives and dies with the controller's leadership.
                auto = (
                    asyncio.create_task(auto_box[0].run(), name="hvplace-rebalancer")
                    if auto_box
                    else None
                )
                try:
                    await controller_box[0].run(fence)
                finally:
                    if auto is not None:
                        auto.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await auto

            election = self.election = Election(
                store,
                cfg.node_name,
                cfg.session_ttl_s,
                lead,
                self_checks=cfg.leader_self_checks,
            )
            on_fence_lost = store.on_fence_lost

            def fence_lost(f: Fence) -> None:
                self.metrics.fence_rejections.inc()
                if on_fence_lost is not None:
                    on_fence_lost(f)

            store.on_fence_lost = fence_lost
            election.on_change = lambda _leading: self.metrics.set_leader(election.fence)
            core = api_core(
                store,
                cache,
                fence=election.require_fence,
                election=election,
                admission_on_create=self.admission_on_create,
                mover=lambda planner: LiveMover(
                    Migrations(store, cache, planner), cache, ColdMover(store, cache, planner)
                ),
            )
            self.mover = cast(LiveMover, core.operations.rebalancing.mover)
            planner = self.planner = core.planner
            planner.on_committed = self._observe_commit
            controller = self.controller = Controller(
                store,
                cache,
                planner,
                cluster_default=cluster,
                resync_s=cfg.resync_s,
                batch_size=cfg.batch_size,
                metrics=self.metrics,
            )
            controller_box.append(controller)
            self.backend, self.operations = core.backend, core.operations
            if cfg.rebalance_interval_s > 0 and cfg.rebalance_max_moves > 0:
                assert self.mover is not None
                auto_box.append(
                    AutoRebalancer(
                        cache,
                        self.mover,
                        interval_s=cfg.rebalance_interval_s,
                        max_moves=cfg.rebalance_max_moves,
                        repair_interrupted=self.mover.repair_interrupted,
                    )
                )
            if cfg.metrics_listen:
                self.metrics_port = self.metrics.serve(cfg.metrics_listen)
            if self.serve_api:
                await self._start_api()
            tasks.append(asyncio.create_task(election.run(), name="hvplace-election"))
            tasks.append(asyncio.create_task(self._rules_metrics(), name="hvplace-rule-metrics"))
            interval = watchdog_interval_s()
            if interval is not None:
                tasks.append(asyncio.create_task(self._watchdog(interval), name="hvplace-wd"))
            notify("READY=1")
            self.ready.set()
            log.info("coordinator %s ready", cfg.node_name)
            stop = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait({stop, *tasks}, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stop and not t.cancelled() and t.exception() is not None:
                    log.error("%s failed: %r", t.get_name(), t.exception())
            stop.cancel()
        finally:
            notify("STOPPING=1")
            log.info("coordinator %s stopping", cfg.node_name)
            if self.election is not None:
                self.election.stop()
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            if self.api is not None:
                with contextlib.suppress(Exception):
                    await self.api.stop(1.0)
            if self.cache is not None:
                await self.cache.close()
            self.metrics.close()
            await store.close()
            log.info("coordinator %s stopped", cfg.node_name)

    async def _start_api(self) -> None:
        try:
            from hvplace.coordinator.api import api_security, start_api_server
        except ImportError as e:  # the API module is optional for a placement-only node
            log.warning("no gRPC API: %s", e)
            return
        assert self.operations is not None
        self.api = await start_api_server(
            self.operations, self.cfg.listen, rpc_metrics=self.metrics.rpc, **api_security(self.cfg)
        )
        self.api_port = int(self.api.port)
        log.info("gRPC API on %s (port %d)", self.cfg.listen, self.api_port)

    def _observe_commit(self, outcome: Outcome, seconds: float) -> None:
        self.metrics.placement_latency.observe(seconds)

    async def _rules_metrics(self) -> None:
        """Compliance and HA headroom, computed by the leader only (they cost a simulation)."""
        while True:
            await asyncio.sleep(min(self.cfg.resync_s, 15.0))
            if self.election is not None and self.election.is_leader and self.cache is not None:
                try:
                    self.metrics.refresh_rules(self.cache, self.cache.cluster_config())
                except Exception:
                    log.exception("rule metrics failed")

    async def _watchdog(self, interval: float) -> None:
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)
