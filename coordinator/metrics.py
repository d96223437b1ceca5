"""The coordinator's Prometheus metrics, on their own registry: placement, pending reasons,
hosts, VMs by phase, leadership and fencing token, etcd conflicts, HA headroom, rule
compliance and time in violation, failover durations and the API's per-RPC metrics."""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from collections.abc import Mapping

from hvplace.coordinator.cache import Cache
from hvplace.coordinator.placement import check_admission, rule_compliance
from hvplace.coordinator.rpc_metrics import RpcMetricsInterceptor
from hvplace.coordinator.store import Fence
from hvplace.proto.records import ClusterConfig, HostState
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_FAILOVER_BUCKETS = (0.5, 1, 2, 3, 5, 8, 13, 21, 34, 60, 120)
HEADROOM_MAX_HOSTS = 2_000
"""Above this many hosts the per-failure headroom simulation is skipped (it is O(hosts²))."""


class CoordinatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.placement_latency = Histogram(
            "hvplace_placement_latency_seconds",
            "Time from snapshot to committed plan, per placement transaction.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.placements = Counter(
            "hvplace_placements_total",
            "VMs placed or left pending by committed plans.",
            ["result"],
            registry=r,
        )
        self.pending = Gauge(
            "hvplace_pending_vms", "VMs pending, by reason code.", ["reason"], registry=r
        )
        self.hosts = Gauge("hvplace_hosts", "Hosts by state.", ["state"], registry=r)
        self.leader = Gauge("hvplace_leader", "1 while this coordinator is the leader.", registry=r)
        self.fencing_token = Gauge(
            "hvplace_leader_fencing_token",
            "The create revision of this coordinator's election key while it leads (else 0).",
            registry=r,
        )
        self.vms = Gauge(
            "hvplace_vms", "VMs by phase, as the API reports them.", ["phase"], registry=r
        )
        self.txn_conflicts = Counter(
            "hvplace_etcd_txn_conflicts_total",
            "etcd transactions whose compares failed (someone wrote first).",
            registry=r,
        )
        self.fence_rejections = Counter(
            "hvplace_fence_rejections_total",
            "Writes rejected because this coordinator's fencing token was stale.",
            registry=r,
        )
        self.ha_headroom = Gauge(
            "hvplace_ha_headroom",
            "1 when the failure of this host can be absorbed under every required rule.",
            ["host"],
            registry=r,
        )
        self.ha_ok = Gauge(
            "hvplace_ha_headroom_ok",
            "1 when every single-host failure can be absorbed (the admission check).",
            registry=r,
        )
        self.rule_satisfied = Gauge(
            "hvplace_rule_satisfied", "1 when the rule holds now.", ["rule"], registry=r
        )
        self.rule_degraded = Gauge(
            "hvplace_rule_degraded_vms",
            "VMs knowingly breaking the rule (on_failure=degrade).",
            ["rule"],
            registry=r,
        )
        self.rule_violation = Counter(
            "hvplace_rule_violation_seconds",
            "Seconds each required rule has been broken or degraded, counted between the"
            " leader's compliance samples from the first sample that saw it so.",
            ["rule"],
            registry=r,
        )
        self.failover = Histogram(
            "hvplace_failover_duration_seconds",
            "From a host's loss being noticed to its VMs' re-placement being committed.",
            buckets=_FAILOVER_BUCKETS,
            registry=r,
        )
        self.cache_revision = Gauge(
            "hvplace_cache_revision", "etcd revision the coordinator's cache holds.", registry=r
        )
        self.rpc = RpcMetricsInterceptor(r)
        self._server: object | None = None
        self._sampled_at: float | None = None
        self._required: frozenset[str] = frozenset()
        self._violating: frozenset[str] = frozenset()

    def serve(self, listen: str) -> int:
        """Expose /metrics on host:port; returns the bound port."""
        host, _, port = listen.rpartition(":")
        # ":port" means loopback: every interface must be asked for (0.0.0.0:port).
        host = host or "127.0.0.1"
        server, _thread = start_http_server(int(port), addr=host, registry=self.registry)
        self._server = server
        bound = int(server.server_port)
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        server = self._server
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]
            self._server = None

    def set_leader(self, fence: Fence | None) -> None:
        """Leadership changed: `fence` is the one held now (None: not leading)."""
        self.leader.set(0 if fence is None else 1)
        self.fencing_token.set(0 if fence is None else fence.revision)
        # Rules are sampled by the leader only: time spent as a standby is no one's to count.
        self._sampled_at, self._violating = None, frozenset()

    def refresh_state(self, cache: Cache) -> None:
        """Gauges derived from the cache: hosts by state, VMs by phase, pending by reason;
        from the counts the cache keeps per event (no pass over the VMs)."""
        self.cache_revision.set(cache.revision)
        for phase, n in vms_by_phase(cache).items():
            self.vms.labels(phase=phase).set(n)
        states = Tally(h.state.value for h in cache.engine_hosts.values())
        for state in HostState:
            self.hosts.labels(state=state.value).set(states.get(state.value, 0))
        self.pending.clear()
        for code, n in cache.pending_reasons.items():
            self.pending.labels(reason=code).set(n)

    def refresh_rules(self, cache: Cache, cluster: ClusterConfig, now: float | None = None) -> None:
        """Compliance per rule, time in violation, and the HA headroom per single-host
        failure. `now` is a monotonic clock (tests pass their own)."""
        now = time.monotonic() if now is None else now
        snap = cache.snapshot()
        compliance = rule_compliance(snap)
        self.rule_satisfied.clear()
        self.rule_degraded.clear()
        required: set[str] = set()
        violating: set[str] = set()
        for key, c in compliance.items():
            self.rule_satisfied.labels(rule=key).set(1 if c.satisfied else 0)
            self.rule_degraded.labels(rule=key).set(len(c.degraded))
            if c.required:
                required.add(key)
                self.rule_violation.labels(rule=key)  # the series exists from the start
                if not c.satisfied or c.degraded:
                    violating.add(key)
        # The time since the last sample goes to the rules that sample saw broken: a
        # violation is counted from when it is first seen until a sample sees it repaired.
        if self._sampled_at is not None:
            elapsed = max(0.0, now - self._sampled_at)
            for key in self._violating & required:
                self.rule_violation.labels(rule=key).inc(elapsed)
        for gone in self._required - required:  # deleted rules
            self.rule_violation.remove(gone)
        self._sampled_at = now
        self._required, self._violating = frozenset(required), frozenset(violating)
        if len(snap.hosts) > HEADROOM_MAX_HOSTS:
            return
        result = check_admission(snap, failures=1, topology_key="host")
        self.ha_ok.set(1 if result.ok else 0)
        stranded: Mapping[str, int] = {
            name: 1 for impact in result.impacts for name in impact.failed
        }
        self.ha_headroom.clear()
        for name, host in snap.hosts.items():
            if host.state is not HostState.LOST:
                self.ha_headroom.labels(host=name).set(0 if name in stranded else 1)


def vms_by_phase(cache: Cache) -> Mapping[str, int]:
    """Every phase with its count; a VM without a status yet is pending (as the API says)."""
    return dict(cache.phases)
