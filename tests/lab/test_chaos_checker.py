"""The fault campaign's checker can fail: samples with a VM on two hosts, a required rule
broken, or a VM neither running nor explained are flagged. Records are made with the
product's own codec, so the checker's separate decoding is held to the real format."""

from __future__ import annotations

import pytest
from hvplace.agent.domain_xml import domain_name as agents_domain_name
from hvplace.lab.checker import (
    Findings,
    Records,
    Sample,
    domain_name,
    duplicates,
    parse_records,
    rule_violations,
    vm_ok,
)
from hvplace.proto import codec, keyspace
from hvplace.proto.records import (
    VM,
    ClusterConfig,
    Enforcement,
    HostInfo,
    OnFailure,
    Phase,
    Rule,
    RuleKind,
    ScopePolicy,
    VMStatus,
)
from hvplace.proto.selectors import LabelExpression, LabelSelector, Op

LABELS = {
    "h1": {"rack": "r1", "zone": "west"},
    "h2": {"rack": "r1", "zone": "east"},
    "h3": {"rack": "r2", "zone": "west"},
}


def records(*extra: tuple[str, object]) -> Records:
    """Records as etcd holds them: three hosts, VMs db-1..3 (tier=db) and web-1..2 in
    `acme`, and whatever `extra` adds (key, record)."""
    kvs: dict[str, bytes] = {}
    for host, labels in LABELS.items():
        kvs[keyspace.host(host)] = codec.dumps(HostInfo(name=host, labels=labels))
    for name in ("db-1", "db-2", "db-3"):
        kvs[keyspace.vm("acme", name)] = codec.dumps(VM("acme", name, labels={"tier": "db"}))
    for name in ("web-1", "web-2"):
        kvs[keyspace.vm("acme", name)] = codec.dumps(VM("acme", name, labels={"app": "web"}))
    kvs[keyspace.CONFIG] = codec.dumps(ClusterConfig(lease_ttl_s=7.0, failover_delay_s=0.25))
    for key, record in extra:
        kvs[key] = codec.dumps(record)
    return parse_records(kvs, at=0.0)


def rule(**kw: object) -> tuple[str, Rule]:
    kw.setdefault("kind", RuleKind.ANTI_AFFINITY)
    r = Rule(scope="acme", name=str(kw.pop("name", "apart")), **kw)  # type: ignore[arg-type]
    return keyspace.rule(r.scope, r.name), r


def test_the_domain_name_is_the_agents() -> None:
    for scope, name in (("acme", "db-1"), ("a.b", "c"), ("a", "b.c")):
        assert domain_name(scope, name) == agents_domain_name(scope, name)


def test_records_are_decoded_from_the_real_format() -> None:
    got = records(
        rule(members=("db-1", "db-2")),
        rule(name="pref", enforcement=Enforcement.PREFERRED, weight=5, members=("db-1", "db-3")),
        rule(name="soft", on_failure=OnFailure.DEGRADE, members=("db-1", "db-3")),
        rule(name="together", kind=RuleKind.AFFINITY, members=("db-1", "db-3")),
        (
            keyspace.vm_status("acme", "db-1"),
            VMStatus("acme", "db-1", Phase.PENDING, reason="0/3 hosts"),
        ),
    )
    assert sorted(got.vms) == ["acme/db-1", "acme/db-2", "acme/db-3", "acme/web-1", "acme/web-2"]
    # Only required anti-affinity rules that block are never broken.
    assert [r.key for r in got.rules] == ["acme/apart"]
    assert got.rules[0].topology_key == "host" and got.rules[0].max_per_domain == 1
    assert got.status["acme/db-1"].phase == "pending"
    assert got.host_labels["h3"] == {"rack": "r2", "zone": "west"}
    assert (got.lease_ttl_s, got.failover_delay_s) == (7.0, 0.25)


def test_a_vm_on_two_hosts_is_flagged() -> None:
    assert duplicates({"acme/db-1": ["h1", "h2"], "acme/db-2": ["h3"]}) == [
        ("acme/db-1", "acme/db-1 active on h1, h2")
    ]
    assert duplicates({"acme/db-1": ["h1"], "acme/db-2": ["h1"]}) == []


@pytest.mark.parametrize(
    ("rule_kw", "where", "broken"),
    [
        # Explicit members, host topology: two on h1.
        ({"members": ("db-1", "db-2")}, {"acme/db-1": ["h1"], "acme/db-2": ["h1"]}, True),
        ({"members": ("db-1", "db-2")}, {"acme/db-1": ["h1"], "acme/db-2": ["h2"]}, False),
        # A VM running twice counts in both domains.
        (
            {"members": ("db-1", "db-2")},
            {"acme/db-1": ["h1", "h2"], "acme/db-2": ["h2"]},
            True,
        ),
        # Selector by label, rack topology: h1 and h2 share rack r1.
        (
            {"selector": LabelSelector(match_labels={"tier": "db"}), "topology_key": "rack"},
            {"acme/db-1": ["h1"], "acme/db-2": ["h2"], "acme/db-3": ["h3"]},
            True,
        ),
        (
            {"selector": LabelSelector(match_labels={"tier": "db"}), "topology_key": "zone"},
            {"acme/db-1": ["h1"], "acme/db-2": ["h2"]},
            False,
        ),
        # max_per_domain 2 allows two, not three.
        (
            {
                "selector": LabelSelector(
                    match_expressions=(LabelExpression("tier", Op.IN, ("db",)),)
                ),
                "max_per_domain": 2,
            },
            {"acme/db-1": ["h1"], "acme/db-2": ["h1"]},
            False,
        ),
        (
            {
                "selector": LabelSelector(match_expressions=(LabelExpression("tier", Op.EXISTS),)),
                "max_per_domain": 2,
            },
            {"acme/db-1": ["h1"], "acme/db-2": ["h1"], "acme/db-3": ["h1"]},
            True,
        ),
        # Not members: web VMs together break nothing.
        ({"members": ("db-1", "db-2")}, {"acme/web-1": ["h1"], "acme/web-2": ["h1"]}, False),
    ],
)
def test_a_broken_required_rule_is_flagged(
    rule_kw: dict[str, object], where: dict[str, list[str]], broken: bool
) -> None:
    recs = records(rule(**rule_kw))
    found = rule_violations(where, recs, recs.host_labels)
    assert bool(found) is broken, found


def test_rules_that_may_break_are_not_flagged() -> None:
    recs = records(
        rule(name="soft", on_failure=OnFailure.DEGRADE, members=("db-1", "db-2")),
        rule(name="pref", enforcement=Enforcement.PREFERRED, weight=3, members=("db-1", "db-2")),
    )
    assert rule_violations({"acme/db-1": ["h1"], "acme/db-2": ["h1"]}, recs, LABELS) == []


def test_label_anti_affinity_of_a_scope_is_flagged() -> None:
    strict = records((keyspace.policy("acme"), ScopePolicy("acme", label_anti_affinity=True)))
    together = {"acme/web-1": ["h2"], "acme/web-2": ["h2"]}
    assert [s for s, _ in rule_violations(together, strict, LABELS)] == ["policy acme"]
    spread = records(
        (keyspace.policy("acme"), ScopePolicy("acme", label_anti_affinity=True, spread=2))
    )
    assert rule_violations(together, spread, LABELS) == []


def test_a_vm_is_ok_running_once_or_explained() -> None:
    recs = records(
        (keyspace.vm_status("acme", "db-1"), VMStatus("acme", "db-1", Phase.PENDING, "no room")),
        (keyspace.vm_status("acme", "db-2"), VMStatus("acme", "db-2", Phase.SCHEDULED, "", "h1")),
        (keyspace.vm_status("acme", "db-3"), VMStatus("acme", "db-3", Phase.FAILED, "")),
    )
    assert vm_ok("acme/db-2", {"acme/db-2": ["h1"]}, recs)
    assert not vm_ok("acme/db-2", {"acme/db-2": ["h1", "h2"]}, recs)
    assert vm_ok("acme/db-1", {}, recs)  # pending with a reason
    assert not vm_ok("acme/db-2", {}, recs)  # scheduled and not running: not yet ok
    assert not vm_ok("acme/db-3", {}, recs)  # failed without a reason
    assert not vm_ok("acme/web-1", {}, recs)  # no status at all
    assert vm_ok("acme/db-2", {"acme/db-2": ["h1"]}, None)  # etcd down: running once


def test_findings_group_consecutive_samples_into_episodes() -> None:
    recs = records(rule(members=("db-1", "db-2")))
    findings = Findings()
    twice = {"h1": frozenset({"acme/db-1", "acme/db-2"}), "h2": frozenset({"acme/db-1"})}
    apart = {"h1": frozenset({"acme/db-1"}), "h2": frozenset({"acme/db-2"})}
    for at, running in enumerate([apart, twice, twice, apart, twice]):
        findings.check(Sample(float(at), running, frozenset(), recs), LABELS)
    assert findings.count("duplicate") == 2
    assert findings.count("violation") == 2
    first = findings.episodes[0]
    assert (first.kind, first.subject, first.first_at, first.last_at, first.samples) == (
        "duplicate",
        "acme/db-1",
        1.0,
        2.0,
        2,
    )
    # etcd unreadable: duplicates are still seen, rules need the records.
    blind = Findings()
    blind.check(Sample(0.0, twice, frozenset(), None), LABELS)
    assert [e.kind for e in blind.episodes] == ["duplicate"]


def test_recovery_is_the_last_return_to_ok_and_late_is_never() -> None:
    """A held host fault recovers when its VMs run once away from the failed host; a VM
    still on it, or not ok at the end of the window, is never recovered (None: late)."""
    from hvplace.lab.chaos import Fault, recovery_s

    recs = records(
        (keyspace.vm_status("acme", "db-2"), VMStatus("acme", "db-2", Phase.PENDING, "0/3 hosts"))
    )

    def sample(at: float, running: dict[str, set[str]]) -> Sample:
        return Sample(at, {h: frozenset(v) for h, v in running.items()}, frozenset(), recs)

    fault = Fault(1, "host_kill", "h1", started_at=10.0, budget_s=6.0, affected={"acme/db-1"})
    moved = [
        sample(10.1, {"h1": {"acme/db-1"}}),  # still there: the kill not yet seen
        sample(10.2, {}),
        sample(13.0, {"h2": {"acme/db-1"}}),
        sample(13.1, {"h2": {"acme/db-1"}}),
    ]
    assert recovery_s(fault, moved, held=True) == pytest.approx(3.0)
    # Held: running on the failed host again is not a recovery.
    stayed = [sample(10.1, {"h1": {"acme/db-1"}}), sample(11.0, {"h1": {"acme/db-1"}})]
    assert recovery_s(fault, stayed, held=True) is None
    assert recovery_s(fault, stayed, held=False) == 0.0  # early repair: it never stopped
    # Twice at the end: not ok.
    twice = [*moved, sample(14.0, {"h1": {"acme/db-1"}, "h2": {"acme/db-1"}})]
    assert recovery_s(fault, twice, held=True) is None
    # Pending with a reason is an answer.
    pending = Fault(2, "host_kill", "h1", 10.0, 6.0, affected={"acme/db-2"})
    assert recovery_s(pending, [sample(10.5, {}), sample(11.0, {})], held=True) == 0.0
