"""The host table's candidate tiers (the search's scan order) against the records' own
node-affinity semantics: the admitted hosts, in tiers of preferred score, best first."""

from __future__ import annotations

from collections import defaultdict

from hvplace.coordinator.placement.index import HostTable
from hvplace.proto.records import Host, Resources
from hvplace.proto.selectors import (
    LabelExpression,
    NodeAffinity,
    NodeSelectorTerm,
    Op,
    PreferredTerm,
)
from hypothesis import given, settings
from hypothesis import strategies as st

ZONES = ("z0", "z1", "z2", "z3")


@st.composite
def expressions(draw: st.DrawFn) -> LabelExpression:
    key = draw(st.sampled_from(["zone", "disk"]))
    op = draw(st.sampled_from([Op.IN, Op.IN, Op.IN, Op.NOT_IN, Op.EXISTS]))
    values: tuple[str, ...] = ()
    if op is not Op.EXISTS:
        pool = ZONES if key == "zone" else ("ssd", "hdd")
        values = tuple(draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3)))
    return LabelExpression(key, op, values)


def terms() -> st.SearchStrategy[NodeSelectorTerm]:
    return st.builds(NodeSelectorTerm, st.lists(expressions(), min_size=1, max_size=2).map(tuple))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from((None, *ZONES)), st.sampled_from((None, "ssd", "hdd"))),
        min_size=0,
        max_size=12,
    ),
    st.lists(terms(), max_size=2),
    st.lists(st.builds(PreferredTerm, st.integers(-5, 50), terms()), max_size=2),
)
def test_tiers_are_the_admitted_hosts_by_preferred_score(
    labels: list[tuple[str | None, str | None]],
    required: list[NodeSelectorTerm],
    preferred: list[PreferredTerm],
) -> None:
    hosts = []
    for i, (zone, disk) in enumerate(labels):
        tags = {k: v for k, v in (("zone", zone), ("disk", disk)) if v is not None}
        hosts.append(Host(name=f"h{i:02d}", labels=tags, capacity=Resources(4, 4096, 10)))
    affinity = NodeAffinity(tuple(required), tuple(preferred))
    table = HostTable(hosts)
    by_score: dict[int, list[int]] = defaultdict(list)
    for pos, host in enumerate(table.hosts):
        if affinity.admits(host):
            by_score[affinity.score(host)].append(pos)
    expected = [by_score[s] for s in sorted(by_score, reverse=True)]
    assert [tier for tier in table.tiers(affinity) if tier] == expected
    tiers, terms = table.search_lists(affinity)
    assert [tier for tier in tiers if tier] == expected
    assert terms == [(p.weight, table.term_hosts(p.term)) for p in preferred]
    admitted = table.admitted(affinity)
    assert (admitted is None) == (not required)
    if admitted is not None:
        assert sorted(admitted) == sorted(p for tier in expected for p in tier)
