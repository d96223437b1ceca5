"""The timing budget: lease TTL, fencing and failover delay, and the watchdog, such that a
host's guests are gone before the coordinator may re-place them (SPEC §4, §5.6)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from hvplace.proto.errors import InvalidInput

if TYPE_CHECKING:
    from hvplace.proto.records import ClusterConfig

FENCE_GRACE_S = 1.0
"""Time an agent is allowed to destroy its domains once it decides to fence."""


CLOCK_MARGIN_S = 0.5
"""How far the agents', etcd's and the coordinator's clocks may drift over a lease."""


def fence_after_for(lease_ttl_s: float, failover_delay_s: float = 0.5) -> float:
    """The default `fence_after_s` for a lease TTL: 60 % of it, and never so late that the
    budget (see check_budget) turns unsafe. 5 s -> 3 s, 2 s -> 1 s."""
    safe = lease_ttl_s + failover_delay_s - FENCE_GRACE_S - CLOCK_MARGIN_S
    return round(min(0.6 * lease_ttl_s, safe), 3)


def watchdog_timeout_for(
    lease_ttl_s: float, fence_after_s: float, failover_delay_s: float = 0.5
) -> float:
    """The longest safe `watchdog_timeout_s` for a budget (see check_budget), in
    whole seconds as kernel watchdogs count them when at least one. 5/3 s -> 2 s, 2/1 s -> 1 s."""
    safe = lease_ttl_s + failover_delay_s - fence_after_s - CLOCK_MARGIN_S
    return float(math.floor(safe + 1e-9)) if safe >= 1 else round(safe, 3)


def check_budget(cfg: ClusterConfig, clock_margin_s: float = CLOCK_MARGIN_S) -> None:
    """The fencing budget (SPEC §4, §5.6): a host's guests must be gone before the
    coordinator may re-place them, whether its agent is alive or not.

    The agent fences `fence_after_s` after its last acknowledged renewal; etcd expires the
    lease no earlier than `lease_ttl_s` after it; the coordinator re-places
    `failover_delay_s` after expiry. Destroying domains takes up to FENCE_GRACE_S, and
    clocks may drift by `clock_margin_s`. A dead or hung agent fences nothing: it pets the
    host's watchdog only while its last renewal is younger than `fence_after_s`, so the
    host resets at most `fence_after_s + watchdog_timeout_s` after that renewal.
    """
    if cfg.lease_ttl_s < 1 or cfg.lease_ttl_s > 600:
        raise InvalidInput(f"lease_ttl_s {cfg.lease_ttl_s} must be between 1 and 600 seconds")
    if cfg.fence_after_s <= 0:
        raise InvalidInput(f"fence_after_s {cfg.fence_after_s} must be positive")
    if cfg.failover_delay_s < 0:
        raise InvalidInput(f"failover_delay_s {cfg.failover_delay_s} must not be negative")
    slack = (
        cfg.lease_ttl_s
        + cfg.failover_delay_s
        - (cfg.fence_after_s + FENCE_GRACE_S + clock_margin_s)
    )
    if cfg.fence_after_s >= cfg.lease_ttl_s or slack < 0:
        raise InvalidInput(
            f"unsafe timing budget: fence_after_s {cfg.fence_after_s} + fence grace {FENCE_GRACE_S}"
            f" + clock margin {clock_margin_s} must not exceed lease_ttl_s {cfg.lease_ttl_s}"
            f" + failover_delay_s {cfg.failover_delay_s}, and fence_after_s must be below"
            " lease_ttl_s; lower fence_after_s or raise lease_ttl_s"
        )
    if not 0 <= cfg.watchdog_timeout_s <= 600:
        raise InvalidInput(
            f"watchdog_timeout_s {cfg.watchdog_timeout_s} must be between 0 (derived) and 600"
            " seconds"
        )
    reset_by = cfg.fence_after_s + cfg.watchdog_s + clock_margin_s
    if reset_by > cfg.lease_ttl_s + cfg.failover_delay_s + 1e-9:
        raise InvalidInput(
            f"unsafe timing budget: a dead agent's host resets up to fence_after_s"
            f" {cfg.fence_after_s} + watchdog_timeout_s {cfg.watchdog_s} + clock margin"
            f" {clock_margin_s} = {reset_by:g}s after its last renewal, later than the"
            f" {cfg.lease_ttl_s + cfg.failover_delay_s:g}s (lease_ttl_s + failover_delay_s)"
            " after which its VMs may be re-placed; lower watchdog_timeout_s to at most"
            f" {watchdog_timeout_for(cfg.lease_ttl_s, cfg.fence_after_s, cfg.failover_delay_s):g}"
            " or raise lease_ttl_s"
        )
