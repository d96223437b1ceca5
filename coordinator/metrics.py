"""The coordinator's Prometheus metrics, on their own registry: placement, pending reasons,
hosts, leadership, etcd conflicts, HA headroom, rule compliance and failover durations."""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Mapping

from hvplace.coordinator.cache import Cache
from hvplace.coordinator.placement import check_admission, rule_compliance
from hvplace.proto.models import ClusterConfig, HostState, Phase
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
        self.failover = Histogram(
            "hvplace_failover_duration_seconds",
            "From a host's loss being noticed to its VMs' re-placement being committed.",
            buckets=_FAILOVER_BUCKETS,
            registry=r,
        )
        self.cache_revision = Gauge(
            "hvplace_cache_revision", "etcd revision the coordinator's cache holds.", registry=r
        )
        self._server: object | None = None

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

    def refresh_state(self, cache: Cache) -> None:
        """Gauges derived from the cache: hosts by state, pending VMs by reason."""
        self.cache_revision.set(cache.revision)
        snap = cache.snapshot()
        states = Tally(h.state.value for h in snap.hosts.values())
        for state in HostState:
            self.hosts.labels(state=state.value).set(states.get(state.value, 0))
        reasons: Tally[str] = Tally()
        for status in cache.vm_status.records.values():
            if status.phase is Phase.PENDING:
                why = status.explanation
                code = why.reasons[0].code if why is not None and why.reasons else "unknown"
                reasons[code] += 1
        self.pending.clear()
        for code, n in reasons.items():
            self.pending.labels(reason=code).set(n)

    def refresh_rules(self, cache: Cache, cluster: ClusterConfig) -> None:
        """Compliance per rule, and the HA headroom per single-host failure."""
        snap = cache.snapshot()
        compliance = rule_compliance(snap)
        self.rule_satisfied.clear()
        self.rule_degraded.clear()
        for key, c in compliance.items():
            self.rule_satisfied.labels(rule=key).set(1 if c.satisfied else 0)
            self.rule_degraded.labels(rule=key).set(len(c.degraded))
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
