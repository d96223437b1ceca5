"""Reason codes for every host a filter rejects; explain, API errors and metrics share them."""

from __future__ import annotations

from typing import Final

HOST_CORDONED: Final = "host_cordoned"
HOST_DRAINING: Final = "host_draining"
HOST_LOST: Final = "host_lost"
HOST_DEGRADED: Final = "host_degraded"
NODE_AFFINITY: Final = "node_affinity"
TOPOLOGY_LABEL_MISSING: Final = "topology_label_missing"
ANTI_AFFINITY: Final = "anti_affinity"
AFFINITY: Final = "affinity"
SPREAD: Final = "spread"
LABEL_ANTI_AFFINITY: Final = "label_anti_affinity"
INSUFFICIENT_CPU: Final = "insufficient_cpu"
INSUFFICIENT_MEMORY: Final = "insufficient_memory"
INSUFFICIENT_DISK: Final = "insufficient_disk"
NO_HOSTS: Final = "no_hosts"
ATOMIC_BATCH: Final = "atomic_batch"
HA_OFF: Final = "ha_off"

ALL_CODES: Final = (
    # Explain lists the reasons by host count; on a tie, the more actionable reason first.
    ANTI_AFFINITY,
    LABEL_ANTI_AFFINITY,
    SPREAD,
    AFFINITY,
    TOPOLOGY_LABEL_MISSING,
    INSUFFICIENT_MEMORY,
    INSUFFICIENT_CPU,
    INSUFFICIENT_DISK,
    NODE_AFFINITY,
    HOST_CORDONED,
    HOST_DRAINING,
    HOST_LOST,
    HOST_DEGRADED,
    NO_HOSTS,
    ATOMIC_BATCH,
    HA_OFF,
)
