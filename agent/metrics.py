"""The agent's Prometheus metrics (own registry) and its HTTP endpoint: /metrics and /healthz."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from hvplace.proto.records import DomainState
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.domains = Gauge(
            "hvplace_agent_domains", "Managed domains by state.", ["state"], registry=r
        )
        self.lease_renew = Histogram(
            "hvplace_agent_lease_renew_seconds",
            "Latency of acknowledged lease renewals.",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
            registry=r,
        )
        self.lease_renew_failures = Counter(
            "hvplace_agent_lease_renew_failures_total", "Lease renewals that failed.", registry=r
        )
        self.reconcile = Histogram(
            "hvplace_agent_reconcile_seconds", "Duration of a full reconcile pass.", registry=r
        )
        self.reconcile_errors = Counter(
            "hvplace_agent_reconcile_errors_total", "Actions that failed.", registry=r
        )
        self.fence_events = Counter(
            "hvplace_agent_fence_events_total",
            "Times the agent fenced itself (destroyed its domains after losing its lease).",
            registry=r,
        )
        self.fence_duration = Histogram(
            "hvplace_agent_fence_duration_seconds",
            "From the decision to fence to every managed domain destroyed.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.fenced = Gauge("hvplace_agent_fenced", "1 while fenced.", registry=r)
        self.lease_held = Gauge("hvplace_agent_lease_held", "1 while a lease is held.", registry=r)
        self.hypervisor_up = Gauge(
            "hvplace_agent_hypervisor_up",
            "1 while libvirt answers; 0 while it is unusable (the host is degraded).",
            registry=r,
        )
        self.hypervisor_up.set(1)

    def set_domains(self, counts: dict[DomainState, int]) -> None:
        for state in DomainState:
            self.domains.labels(state=state.value).set(counts.get(state, 0))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """A minimal HTTP/1.0 server on the event loop; `health()` returns (ok, reason)."""

    def __init__(self, metrics: AgentMetrics, health: Callable[[], tuple[bool, str]]) -> None:
        self._metrics = metrics
        self._health = health
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> tuple[str, int] | None:
        if self._server is None or not self._server.sockets:
            return None
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        # ":port" means loopback: every interface must be asked for (0.0.0.0:port).
        self._server = await asyncio.start_server(self._handle, host or "127.0.0.1", int(port))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            # Drain the headers; the request line is all we need.
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else "/"
            if path.startswith("/metrics"):
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, self._metrics.exposition()
            elif path.startswith("/healthz"):
                ok, reason = self._health()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "text/plain; charset=utf-8", (reason + "\n").encode()
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            head = (
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
