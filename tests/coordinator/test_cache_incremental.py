"""The cache's counters are moved per watch event (issue 14): after every event of a random
sequence they equal what a from-scratch computation over the records gives, and a relist
(a rebuild from the same records) reaches the same state."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from typing import Any

from hvplace.coordinator.cache import Cache
from hvplace.coordinator.placement.headroom import Headroom, headroom
from hvplace.coordinator.placement.index import BaseFree, base_free, host_table
from hvplace.coordinator.snapshot import Snapshot, Usage
from hvplace.proto import codec, keyspace
from hvplace.proto.records import (
    VM,
    Assignment,
    Explanation,
    HAPriority,
    HostInfo,
    HostState,
    HostStatus,
    Phase,
    ReasonCount,
    Resources,
    VMStatus,
)
from hvplace.proto.selectors import LabelExpression, NodeAffinity, NodeSelectorTerm, Op
from hypothesis import given, settings
from hypothesis import strategies as st

HOSTS = ("h1", "h2", "h3")
VMS = ("a/x", "a/y", "b/x", "b/z")

host_name = st.sampled_from(HOSTS)
vm_key = st.sampled_from(VMS)


def _vm(key: str, cpu: int, ha: HAPriority, pinned: bool) -> VM:
    scope, name = key.split("/")
    affinity = NodeAffinity()
    if pinned:
        expr = LabelExpression(key="zone", operator=Op.IN, values=("z1",))
        affinity = NodeAffinity(required=(NodeSelectorTerm(match_expressions=(expr,)),))
    return VM(
        scope=scope,
        name=name,
        resources=Resources(vcpus=cpu, memory_mib=256 * cpu, disk_gib=cpu),
        ha_priority=ha,
        node_affinity=affinity,
    )


events = st.one_of(
    st.tuples(
        st.just("host"), host_name, st.booleans(), st.integers(1, 3), st.sampled_from(("z1", "z2"))
    ),
    st.tuples(st.just("status"), host_name, st.booleans(), st.sampled_from(list(HostState))),
    st.tuples(
        st.just("vm"),
        vm_key,
        st.booleans(),
        st.integers(1, 3),
        st.sampled_from(list(HAPriority)),
        st.booleans(),
    ),
    st.tuples(st.just("assign"), vm_key, st.booleans(), host_name),
    st.tuples(
        st.just("vmstatus"),
        vm_key,
        st.booleans(),
        st.sampled_from(list(Phase)),
        st.sampled_from(("", "spread", "insufficient_cpu")),
    ),
)


def _key_value(event: tuple[Any, ...]) -> tuple[str, bytes | None]:
    """The etcd key and value (None: a delete) an event writes."""
    kind, name, put = event[0], event[1], event[2]
    if kind == "host":
        info = HostInfo(
            name=name,
            labels={"zone": event[4]},
            capacity=Resources(vcpus=8 * event[3], memory_mib=4096, disk_gib=100),
        )
        return keyspace.host(name), codec.dumps(info) if put else None
    if kind == "status":
        return keyspace.host_status(name), codec.dumps(HostStatus(name, event[3])) if put else None
    scope, vm_name = name.split("/")
    if kind == "vm":
        return keyspace.vm(scope, vm_name), (
            codec.dumps(_vm(name, event[3], event[4], event[5])) if put else None
        )
    if kind == "vmstatus":
        why = None
        if event[4]:
            why = Explanation(
                vm=name, total_hosts=3, feasible_hosts=0, reasons=(ReasonCount(event[4], "", 3),)
            )
        status = VMStatus(scope=scope, name=vm_name, phase=event[3], explanation=why)
        return keyspace.vm_status(scope, vm_name), codec.dumps(status) if put else None
    # An assignment embeds the spec (or a stand-in when the VM has none).
    return keyspace.assignment(event[3], scope, vm_name), b""


def _check(cache: Cache) -> None:
    """Every counter against its definition over the records."""
    cache.usage.check()
    assert dict(cache.usage.vms) == dict(cache.vms.records)
    assert dict(cache.usage.placements) == {k: a.host for k, a in cache.assignments.records.items()}
    old = Snapshot.from_records(
        revision=cache.revision,
        infos=cache.host_infos(),
        statuses=cache.host_status.records,
        vms=cache.vms.records,
        assignments=cache.assignments.records.values(),
        rules=(),
        policies=(),
        alive=cache.hosts.records,
    )
    snap = cache.snapshot()
    assert dict(snap.hosts) == old.hosts
    assert dict(snap.vms) == old.vms and dict(snap.placements) == old.placements
    assert snap.usage() is not None
    assert cache.unassigned == {k for k in cache.vms.records if k not in cache.assignments.records}
    phases = Counter(
        (st.phase.value if (st := cache.vm_status.records.get(k)) else Phase.PENDING.value)
        for k in cache.vms.records
    )
    assert {p: n for p, n in cache.phases.items() if n} == dict(phases)
    reasons = Counter(
        (s.explanation.reasons[0].code if s.explanation and s.explanation.reasons else "unknown")
        for s in cache.vm_status.records.values()
        if s.phase is Phase.PENDING
    )
    assert cache.pending_reasons == dict(reasons)
    # The failover headroom kept for the engine's host table, against one built afresh.
    table = host_table(snap)
    kept = headroom(table, cache.usage)
    free = BaseFree(table, cache.usage)
    assert base_free(table, cache.usage).cpu == free.cpu
    fresh = Headroom(table, cache.usage, free)
    assert kept.entry == fresh.entry and kept.pinned == fresh.pinned
    assert kept.totals == fresh.totals and kept.slot == fresh.slot
    assert kept.needs == fresh.needs


async def _listing(kvs: dict[str, tuple[bytes, int]]) -> AsyncIterator[Iterable[Any]]:
    yield [(k, v, r) for k, (v, r) in sorted(kvs.items())]


@settings(max_examples=150, deadline=None)
@given(st.lists(events, min_size=1, max_size=40))
def test_counters_equal_a_rebuild_after_every_event(seq: list[tuple[Any, ...]]) -> None:
    cache = Cache(None, clock=lambda: 1.0)  # type: ignore[arg-type]  # _apply needs no store
    kvs: dict[str, tuple[bytes, int]] = {}
    for revision, event in enumerate(seq, start=1):
        key, value = _key_value(event)
        if event[0] == "assign":
            # Delete the VM's assignment wherever it is, then (put) write it on `host`.
            scope, name = event[1].split("/")
            for h in HOSTS:
                old = keyspace.assignment(h, scope, name)
                if old in kvs:
                    del kvs[old]
                    cache._apply("delete", old, b"", revision)
            if event[2]:
                spec = cache.vms.records.get(event[1]) or VM(scope=scope, name=name)
                value = codec.dumps(Assignment(vm=spec, host=event[3], epoch=revision))
            else:
                value = None
        if value is None:
            if key in kvs:
                del kvs[key]
                cache._apply("delete", key, b"", revision)
        else:
            kvs[key] = (value, revision)
            cache._apply("put", key, value, revision)
        cache.revision = revision
        _check(cache)
    # A relist from the same records reaches the same counters.
    fresh = Cache(None, clock=lambda: 1.0)  # type: ignore[arg-type]
    asyncio.run(fresh.load(_listing(kvs)))
    for name in ("used", "by_host", "by_scope", "restart"):
        assert getattr(fresh.usage, name) == getattr(cache.usage, name), name
    assert fresh.unassigned == cache.unassigned
    assert fresh.phases == cache.phases and fresh.pending_reasons == cache.pending_reasons
    assert dict(fresh.assignments.records) == dict(cache.assignments.records)
    # The listing's assignments reuse the spec objects when they embed them unchanged.
    for key, a in fresh.assignments.records.items():
        spec = fresh.vms.records.get(key)
        if spec is not None and spec == a.vm:
            assert a.vm is spec


def test_usage_check_catches_drift() -> None:
    usage = Usage()
    usage.set_vm("a/x", _vm("a/x", 2, HAPriority.HIGH, False))
    usage.set_placement("a/x", "h1")
    usage.check()
    usage.used["h1"][0] += 1
    try:
        usage.check()
    except AssertionError as e:
        assert "used" in str(e)
    else:
        raise AssertionError("a drifted counter went unnoticed")


def test_headroom_moves_with_each_placement_on_a_kept_host_table() -> None:
    """Placements on registered hosts keep the host table: the headroom is moved per
    host, and equals one built afresh after each."""
    cache = Cache(None, clock=lambda: 1.0)  # type: ignore[arg-type]
    revision = 0

    def put(key: str, value: bytes) -> None:
        nonlocal revision
        revision += 1
        cache._apply("put", key, value, revision)
        cache.revision = revision
        _check(cache)

    for h in HOSTS:
        put(*_put(("host", h, True, 2, "z1")))
    table = host_table(cache.snapshot())
    for i, key in enumerate(VMS):
        vm = _vm(key, 1 + i % 2, HAPriority.HIGH, False)
        put(keyspace.vm(vm.scope, vm.name), codec.dumps(vm))
        put(
            keyspace.assignment("h1", vm.scope, vm.name),
            codec.dumps(Assignment(vm=vm, host="h1", epoch=1)),
        )
    assert host_table(cache.snapshot()) is table  # the same table all along
    assert headroom(table, cache.usage).entry  # h1 holds VMs a failure restarts


def _put(event: tuple[Any, ...]) -> tuple[str, bytes]:
    key, value = _key_value(event)
    assert value is not None
    return key, value
