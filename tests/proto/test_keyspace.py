"""keyspace.classify takes apart every key the builders make, and never raises."""

from __future__ import annotations

import pytest
from hvplace.proto import keyspace
from hvplace.proto.keyspace import Key, Kind
from hypothesis import given
from hypothesis import strategies as st


@pytest.mark.parametrize(
    ("key", "parsed"),
    [
        (keyspace.CONFIG, Key(Kind.CONFIG, "")),
        (keyspace.host("hv1"), Key(Kind.HOSTS, "hv1", host="hv1", name="hv1")),
        (keyspace.host_status("hv1"), Key(Kind.HOST_STATUS, "hv1", host="hv1", name="hv1")),
        (keyspace.vm("acme", "web-1"), Key(Kind.VMS, "acme/web-1", scope="acme", name="web-1")),
        (
            keyspace.vm_status("acme", "web-1"),
            Key(Kind.VM_STATUS, "acme/web-1", scope="acme", name="web-1"),
        ),
        (
            keyspace.assignment("hv1", "acme", "web-1"),
            Key(Kind.ASSIGNMENTS, "acme/web-1", host="hv1", scope="acme", name="web-1"),
        ),
        (
            keyspace.domain("hv1", "acme", "web-1"),
            Key(Kind.DOMAINS, "acme/web-1", host="hv1", scope="acme", name="web-1"),
        ),
        (
            keyspace.rule("acme", "spread"),
            Key(Kind.RULES, "acme/spread", scope="acme", name="spread"),
        ),
        (keyspace.policy("acme"), Key(Kind.POLICIES, "acme", scope="acme")),
        (keyspace.request("r-1"), Key(Kind.REQUESTS, "r-1", name="r-1")),
        (keyspace.image("tiny"), Key(Kind.IMAGES, "tiny", name="tiny")),
        (keyspace.ELECTION + "694d", Key(Kind.ELECTION, "694d", name="694d")),
        ("/elsewhere/x", Key(Kind.OTHER, "/elsewhere/x")),
        (keyspace.ROOT + "future/x", Key(Kind.OTHER, keyspace.ROOT + "future/x")),
        # Malformed keys keep what they have.
        (keyspace.ASSIGNMENTS + "hv1", Key(Kind.ASSIGNMENTS, "", host="hv1")),
    ],
)
def test_classify(key: str, parsed: Key) -> None:
    assert keyspace.classify(key) == parsed


def test_kinds_do_not_shadow_each_other() -> None:
    """vmstatus/ is not under vms/, hoststatus/ not under hosts/."""
    assert keyspace.classify(keyspace.vm_status("a", "b")).kind is Kind.VM_STATUS
    assert keyspace.classify(keyspace.host_status("h")).kind is Kind.HOST_STATUS


@given(st.text())
def test_never_raises(key: str) -> None:
    assert isinstance(keyspace.classify(key).kind, Kind)
