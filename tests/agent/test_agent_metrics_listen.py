"""Metrics endpoints bind loopback unless told otherwise: ":port" is not every interface."""

from __future__ import annotations

from hvplace.agent.metrics import AgentMetrics, MetricsServer


async def test_agent_port_only_is_loopback() -> None:
    server = MetricsServer(AgentMetrics(), lambda: (True, "ok"))
    await server.start(":0")
    try:
        assert server.address is not None and server.address[0] == "127.0.0.1"
    finally:
        await server.stop()
