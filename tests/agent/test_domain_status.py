"""The reported domain status, derived (agent/status.py): a table of assignment, libvirt
state, error and fence, and `since` carried over only while the state holds."""

from __future__ import annotations

import pytest
from hvplace.agent.reconcile import Observed
from hvplace.agent.status import domain_status
from hvplace.proto.records import VM, Assignment, DomainState

A = Assignment(vm=VM(scope="s", name="v", uid="u1"), host="hv1", epoch=4)
S = DomainState


def seen(state: DomainState) -> Observed:
    return Observed(scope="s", name="v", domain="hv-s-v", uid="u0", epoch=3, state=state)


@pytest.mark.parametrize(
    ("a", "obs", "error", "fenced", "state"),
    [
        (A, seen(S.RUNNING), "", False, S.RUNNING),
        (A, seen(S.STOPPED), "", False, S.STOPPED),
        (A, None, "", False, S.DEFINED),
        (A, None, "define: refused", False, S.FAILED),
        # An error on a domain that still runs leaves it running (the error is shown).
        (A, seen(S.RUNNING), "stop: timed out", False, S.RUNNING),
        (A, seen(S.STOPPED), "start: refused", False, S.FAILED),
        # Fenced: whatever is not active any more is reported fenced.
        (A, seen(S.STOPPED), "", True, S.FENCED),
        (A, None, "", True, S.FENCED),
        (A, seen(S.RUNNING), "", True, S.RUNNING),
    ],
)
def test_state(
    a: Assignment, obs: Observed | None, error: str, fenced: bool, state: DomainState
) -> None:
    status = domain_status("hv1", "s/v", a, obs, error, fenced=fenced, previous=None, now=7.0)
    assert (status.scope, status.name, status.host) == ("s", "v", "hv1")
    assert status.state is state and status.last_error == error
    # The assignment names uid and epoch; without one, the domain's own tags do.
    assert (status.uid, status.epoch) == ("u1", 4)


def test_a_leftover_domain_reports_its_own_tags() -> None:
    status = domain_status(
        "hv1", "s/v", None, seen(S.RUNNING), "", fenced=False, previous=None, now=1.0
    )
    assert (status.uid, status.epoch) == ("u0", 3)


def test_since_carries_over_only_while_the_state_holds() -> None:
    kept = domain_status(
        "hv1", "s/v", A, seen(S.RUNNING), "", fenced=False, previous=(S.RUNNING, 5.0), now=9.0
    )
    changed = domain_status(
        "hv1", "s/v", A, seen(S.STOPPED), "", fenced=False, previous=(S.RUNNING, 5.0), now=9.0
    )
    assert kept.since == 5.0 and changed.since == 9.0
