"""A managed domain's reported status, derived from its assignment, what libvirt shows
and the last error (pure, beside reconcile.py): the agent writes it under its own keys."""

from __future__ import annotations

from hvplace.agent import reconcile
from hvplace.proto.records import Assignment, DomainState, DomainStatus


def domain_status(
    host: str,
    key: str,
    a: Assignment | None,
    obs: reconcile.Observed | None,
    error: str,
    *,
    fenced: bool,
    previous: tuple[DomainState, float] | None,
    now: float,
) -> DomainStatus:
    """`previous` is the (state, since) last derived for this key: `since` carries over
    while the state stays the same, else it is `now`."""
    scope, name = key.split("/", 1)
    if obs is not None:
        state = obs.state
        if fenced and state not in reconcile.ACTIVE:
            state = DomainState.FENCED
    elif fenced:
        state = DomainState.FENCED
    else:
        state = DomainState.FAILED if error else DomainState.DEFINED
    if error and (obs is None or obs.state not in reconcile.ACTIVE):
        state = DomainState.FAILED
    since = previous[1] if previous is not None and previous[0] is state else now
    return DomainStatus(
        scope=scope,
        name=name,
        host=host,
        uid=a.vm.uid if a is not None else (obs.uid if obs else ""),
        epoch=a.epoch if a is not None else (obs.epoch if obs else 0),
        state=state,
        since=since,
        last_error=error,
    )
