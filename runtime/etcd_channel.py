"""gRPC channel options both daemons use for their etcd connection.

gRPC's default reconnect backoff starts at 1 s and grows by 1.6x up to 120 s. After an
etcd restart that can keep a channel failing for seconds after etcd is back — longer
than an agent's fence window (`fence_after_s`, 3 s by default), so a short etcd outage
would make every agent destroy its domains. Reconnect attempts every 100-500 ms cost
nothing on loopback or a LAN and keep a brief outage brief.
"""

from __future__ import annotations

RECONNECT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)
