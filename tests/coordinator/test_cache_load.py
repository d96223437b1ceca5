"""A cold start's listing (Cache.load and the relist over a real etcd) reaches the state the
watch path (`_apply`, one event per key) reaches from the same records: damaged records
are skipped with a warning, the others kept; an assignment is built on its listed spec
only when it embeds that spec to the byte."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest
from coord_support import host, running
from hvplace.coordinator.cache import _CACHED, OTHER, YIELD_EVERY, Cache, classify
from hvplace.proto import codec, keyspace
from hvplace.proto.records import (
    VM,
    Assignment,
    ClusterConfig,
    DomainStatus,
    Explanation,
    HostStatus,
    Phase,
    ReasonCount,
    Resources,
    Rule,
    RuleKind,
    ScopePolicy,
    VMStatus,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from support.etcd import EtcdServer

FOLDERS = ("config", "vms", "vmstatus", "assignments", "domains", "migrations", "hosts")
FOLDERS += ("hoststatus", "rules", "policies", "election", "requests", "images", "nope", "")
segment = st.text(alphabet="ab/-", max_size=6)


def _reference(key: str) -> tuple[str, str]:
    """The cache's (kind, name) as keyspace.classify gives it."""
    k = keyspace.classify(key)
    return (k.kind.value, k.id) if k.kind.value in _CACHED else (OTHER, key)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.tuples(st.sampled_from(FOLDERS), st.sampled_from(("", "/")), segment).map(
            lambda t: keyspace.ROOT + "".join(t)
        ),
        st.text(max_size=20),
        st.sampled_from([keyspace.CONFIG, keyspace.CONFIG + "/x", keyspace.ROOT, "/hvplace/v1"]),
    )
)
def test_classify_names_keys_as_keyspace_does(key: str) -> None:
    assert classify(key) == _reference(key)


HOSTS = ("h1", "h2")
NAMES = ("a/x", "a/y", "b/x", "b/z")


def _spec(key: str, cpu: int) -> VM:
    scope, name = key.split("/")
    return VM(scope=scope, name=name, labels={"app": scope}, resources=Resources(cpu, 256, 1))


# How one VM's records are written: its spec, its assignment, its status, each sound or not.
vm_records = st.fixed_dictionaries(
    {
        "cpu": st.integers(1, 3),
        "spec": st.sampled_from(("sound", "none", "damaged")),
        "assignment": st.sampled_from(
            ("none", "same", "other spec", "adopt", "epoch text", "damaged", "no spec")
        ),
        "host": st.sampled_from(HOSTS),
        "status": st.sampled_from(("none", "scheduled", "pending", "damaged")),
    }
)


def _listing(layout: dict[str, dict[str, Any]]) -> dict[str, tuple[bytes, int]]:
    """key -> (value, mod revision) for these VMs, two hosts and a few other records."""
    kvs: dict[str, bytes] = {}
    for key, how in layout.items():
        scope, name = key.split("/")
        spec = _spec(key, how["cpu"])
        spec_json = codec.dumps(spec)
        if how["spec"] == "sound":
            kvs[keyspace.vm(scope, name)] = spec_json
        elif how["spec"] == "damaged":
            kvs[keyspace.vm(scope, name)] = spec_json[:-1] + b',"colour":1}'
        akey = keyspace.assignment(how["host"], scope, name)
        a = Assignment(vm=spec, host=how["host"], epoch=2)
        kind = how["assignment"]
        if kind == "same":
            kvs[akey] = codec.dumps_assignment(a, spec_json)
        elif kind == "other spec":
            kvs[akey] = codec.dumps(Assignment(vm=_spec(key, 9), host=how["host"], epoch=2))
        elif kind == "adopt":
            kvs[akey] = codec.dumps(Assignment(vm=spec, host=how["host"], epoch=3, adopt_epoch=2))
        elif kind == "epoch text":
            kvs[akey] = b'{"epoch":"2","host":"%s","vm":%s}' % (how["host"].encode(), spec_json)
        elif kind == "damaged":
            kvs[akey] = b'{"epoch":2,"host":"%s","vm":%s' % (how["host"].encode(), spec_json)
        elif kind == "no spec":
            kvs[akey] = b'{"epoch":2,"host":"%s"}' % how["host"].encode()
        skey = keyspace.vm_status(scope, name)
        if how["status"] == "damaged":
            kvs[skey] = b'{"scope":"%s","name":"%s","phase":"lost"}' % (
                scope.encode(),
                name.encode(),
            )
        elif how["status"] != "none":
            phase = Phase(how["status"])
            why = Explanation(
                vm=key, total_hosts=2, feasible_hosts=0, reasons=(ReasonCount("cpu", "", 2),)
            )
            status = VMStatus(
                scope, name, phase, explanation=why if phase is Phase.PENDING else None
            )
            kvs[skey] = codec.dumps(status)
    for name in HOSTS:
        kvs[keyspace.host(name)] = codec.dumps(host(name))
    kvs[keyspace.host_status("h2")] = codec.dumps(HostStatus("h2", reason="cordoned by test"))
    kvs[keyspace.ELECTION + "1"] = b"c1"  # not decoded
    return {key: (value, rev) for rev, (key, value) in enumerate(sorted(kvs.items()), start=2)}


async def _pages(
    items: list[tuple[str, bytes, int]], cuts: list[int]
) -> AsyncIterator[Iterable[Any]]:
    at = 0
    for cut in [*sorted(c % (len(items) + 1) for c in cuts), len(items)]:
        yield items[at:cut]
        at = cut


def _relist_order(kvs: dict[str, tuple[bytes, int]]) -> list[tuple[str, bytes, int]]:
    """As a relist lists: the specs, their assignments, then the rest (each in key order)."""

    def rank(key: str) -> int:
        return (
            0 if key.startswith(keyspace.VMS) else 1 if key.startswith(keyspace.ASSIGNMENTS) else 2
        )

    return [(k, v, r) for k, (v, r) in sorted(kvs.items(), key=lambda kv: (rank(kv[0]), kv[0]))]


def _state(cache: Cache) -> dict[str, Any]:
    tables = {name: (dict(t.records), dict(t.revs)) for name, t in cache._tables().items()}
    return {
        "tables": tables,
        "config": (cache.config, cache.config_rev),
        "assigned_hosts": cache.assigned_hosts,
        "unassigned": cache.unassigned,
        "phases": {p: n for p, n in cache.phases.items() if n},
        "pending_reasons": cache.pending_reasons,
        "usage": {n: getattr(cache.usage, n) for n in ("used", "by_host", "by_scope", "restart")},
        "vms": dict(cache.usage.vms),
        "placements": dict(cache.usage.placements),
    }


@settings(max_examples=120, deadline=None)
@given(
    st.dictionaries(st.sampled_from(NAMES), vm_records, min_size=1),
    st.lists(st.integers(0, 60), max_size=4),
    st.booleans(),
)
def test_a_listing_reaches_what_the_watch_path_reaches(
    layout: dict[str, dict[str, Any]], cuts: list[int], key_order: bool
) -> None:
    kvs = _listing(layout)
    items = _relist_order(kvs)
    watched = Cache(None, clock=lambda: 1.0)  # type: ignore[arg-type]  # _apply needs no store
    for key, value, rev in items:
        watched._apply("put", key, value, rev)
    listed = Cache(None, clock=lambda: 1.0)  # type: ignore[arg-type]
    # In a relist's order, or in plain key order (assignments before their specs).
    order = sorted(items) if key_order else items
    asyncio.run(listed.load(_pages(order, cuts)))
    assert _state(listed) == _state(watched)
    for key, how in layout.items():
        a = listed.assignments.records.get(key)
        if a is not None and how["spec"] == "sound" and how["assignment"] == "same":
            assert a.vm is listed.vms.records[key]  # built on the spec, not decoded again


def test_damaged_records_are_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    layout = {
        "a/x": {"cpu": 1, "spec": "damaged", "assignment": "same", "host": "h1", "status": "none"},
        "a/y": {
            "cpu": 2,
            "spec": "sound",
            "assignment": "damaged",
            "host": "h1",
            "status": "damaged",
        },
        "b/x": {"cpu": 1, "spec": "sound", "assignment": "same", "host": "h2", "status": "pending"},
    }
    cache = Cache(None, clock=lambda: 1.0)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="hvplace.coordinator.cache"):
        asyncio.run(cache.load(_pages(_relist_order(_listing(layout)), [])))
    skipped = sorted(r.getMessage().split()[2].rstrip(":") for r in caplog.records)
    assert skipped == [
        keyspace.assignment("h1", "a", "y"),
        keyspace.vm("a", "x"),
        keyspace.vm_status("a", "y"),
    ]
    assert set(cache.vms.records) == {"a/y", "b/x"} and set(cache.vm_status.records) == {"b/x"}
    # The damaged spec's assignment (itself sound) is kept: its host holds the VM.
    assert set(cache.assignments.records) == {"a/x", "b/x"}
    assert cache.unassigned == {"a/y"} and cache.pending_reasons == {"cpu": 1}


async def test_a_relist_reads_every_decoded_prefix_and_skips_the_rest(etcd: EtcdServer) -> None:
    """Over a real etcd: each kind the cache keeps is listed (at one revision), election,
    request and image keys are not decoded, and a damaged spec does not stop the start."""
    async with running(etcd) as (store, _cache):
        spec = VM(scope="acme", name="web", resources=Resources(1, 64, 0))
        puts = {
            keyspace.CONFIG: codec.dumps(ClusterConfig()),
            keyspace.host("hv1"): codec.dumps(host("hv1")),
            keyspace.host_status("hv1"): codec.dumps(HostStatus("hv1")),
            keyspace.vm("acme", "web"): codec.dumps(spec),
            keyspace.vm("acme", "bad"): b"{not json",
            keyspace.vm_status("acme", "web"): codec.dumps(VMStatus("acme", "web")),
            keyspace.assignment("hv1", "acme", "web"): codec.dumps(Assignment(spec, "hv1", 1)),
            keyspace.domain("hv1", "acme", "web"): codec.dumps(
                DomainStatus(scope="acme", name="web", host="hv1")
            ),
            keyspace.rule("acme", "r"): codec.dumps(
                Rule(scope="acme", name="r", kind=RuleKind.ANTI_AFFINITY, members=("a", "b"))
            ),
            keyspace.policy("acme"): codec.dumps(ScopePolicy(scope="acme")),
            keyspace.ELECTION + "7": b"someone",
            keyspace.request("r1"): b"{}",
            keyspace.image("i1"): b"{}",
        }
        await store.commit([], puts, fence=None)
    async with running(etcd) as (store, cache):
        assert cache.config == ClusterConfig()
        tables = {name: set(t.records) for name, t in cache._tables().items()}
        assert tables == {
            "hosts": {"hv1"},
            "host_status": {"hv1"},
            "vms": {"acme/web"},
            "vm_status": {"acme/web"},
            "assignments": {"acme/web"},
            "domains": {"acme/web"},
            "rules": {"acme/r"},
            "policies": {"acme"},
            "migrations": set(),
        }
        assert cache.assignments.records["acme/web"].vm is cache.vms.records["acme/web"]
        assert cache.revision >= max(cache.vms.revs.values())


async def test_a_load_gives_the_event_loop_turns() -> None:
    """gRPC moves the next page only while the event loop runs, and other tasks wait for
    it: a long listing hands the loop a turn every YIELD_EVERY keys."""
    spec = codec.dumps(_spec("a/x", 1))
    items = [(keyspace.vm("a", f"x{i:05d}"), spec, i + 2) for i in range(4 * YIELD_EVERY)]
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count_turns())
    await asyncio.sleep(0)
    before = turns
    cache = Cache(None, clock=lambda: 1.0)  # type: ignore[arg-type]
    await cache.load(_pages(items, []))
    during = turns - before
    counter.cancel()
    assert len(cache.vms.records) == len(items)
    assert during >= 3
