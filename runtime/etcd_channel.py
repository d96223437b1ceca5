"""gRPC channel options both daemons use for their etcd connection.

gRPC's default reconnect backoff starts at 1 s and grows by 1.6x up to 120 s. After an
etcd restart that can keep a channel failing for seconds after etcd is back — longer
than an agent's fence window (`fence_after_s`, 3 s by default), so a short etcd outage
would make every agent destroy its domains. Reconnect attempts every 100-500 ms cost
nothing on loopback or a LAN and keep a brief outage brief.

`grpc.min_reconnect_backoff_ms` is not a backoff: it is the least time gRPC gives one
connection attempt (TCP, TLS handshake, HTTP/2 SETTINGS) before abandoning it and
starting over, each attempt getting max(backoff, it). At 100 ms a TLS connection slower
than the 0.5 s backoff cap (a busy etcd, a long link) was abandoned every time and never
made. 5 s lets a slow handshake finish; a connection attempt into a partition is still
renewed every 5 s (and the kernel resends its SYN after 1 s and 3 s).
"""

from __future__ import annotations

RECONNECT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 5_000),  # the connection attempt's timeout, see above
)
