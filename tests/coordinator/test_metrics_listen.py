"""Metrics endpoints bind loopback unless told otherwise: ":port" is not every interface."""

from __future__ import annotations

from hvplace.coordinator.metrics import CoordinatorMetrics


def test_coordinator_port_only_is_loopback() -> None:
    metrics = CoordinatorMetrics()
    try:
        metrics.serve(":0")
        server = metrics._server
        assert server is not None
        assert server.server_address[0] == "127.0.0.1"  # type: ignore[attr-defined]
    finally:
        metrics.close()
