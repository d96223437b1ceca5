"""Hostile input through the real gRPC API (real etcd): each bad request is `incorrect`
with a short reason and writes nothing; what is accepted becomes a domain libvirt defines."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
import libvirt
import pytest
from hvplace.agent import domain_xml
from hvplace.coordinator.errors_grpc import error_info
from hvplace.proto import codec, keyspace, records
from hvplace.proto.records import ClusterConfig, Image
from hvplace.proto.v1 import hvplace_pb2 as pb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.api import Api, running_api
from support.etcd import EtcdServer

KERNEL = "/var/cache/hvplace/guest/vmlinuz"
T = TypeVar("T")
# The longest reason a refusal may carry: the message quotes at most ~100 characters
# of any input, so it always fits gRPC's metadata (8 KiB soft limit).
MAX_DETAILS = 2048


@pytest.fixture
async def api(etcd: EtcdServer) -> AsyncIterator[Api]:
    async with running_api(etcd) as a:
        await a.add_host("hv1")
        yield a


def revision(etcd: EtcdServer) -> int:
    out = json.loads(etcd.etcdctl("get", "/", "-w", "json"))
    return int(out["header"]["revision"])


def vm(name: str = "v", **kw: object) -> pb.VM:
    base: dict[str, object] = {
        "scope": "acme",
        "name": name,
        "resources": pb.Resources(vcpus=1, memory_mib=64),
        "image": pb.Image(kernel=KERNEL),
    }
    base.update(kw)
    return pb.VM(**base)  # type: ignore[arg-type]


def expr(key: str, op: str, *values: str) -> pb.LabelExpression:
    return pb.LabelExpression(key=key, operator=op, values=list(values))


def affinity(*exprs: pb.LabelExpression) -> pb.NodeAffinity:
    return pb.NodeAffinity(required=[pb.NodeSelectorTerm(match_expressions=list(exprs))])


async def refused(api: Api, call: object, *needles: str) -> str:
    """The call fails as INVALID_ARGUMENT / `incorrect` with a bounded message naming
    `needles`, and etcd's revision has not moved."""
    before = revision(api.etcd)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    err = info.value
    details = err.details() or ""
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), details[:300])
    assert details.startswith("incorrect: "), details[:300]
    assert len(details) <= MAX_DETAILS, len(details)
    detail = error_info(err)
    assert detail is not None and detail.reason == "incorrect"
    for needle in needles:
        assert needle in details, (needle, details)
    assert revision(api.etcd) == before
    return details


BAD_VMS = [
    # (what the issue reported, the VM, words the reason must contain)
    ("NUL in cmdline", vm(image=pb.Image(kernel=KERNEL, cmdline="a\x00b")), ("cmdline",)),
    ("NUL in description", vm(description="x\x00y"), ("description",)),
    ("control char in description", vm(description="x\x01y"), ("description",)),
    ("newline in cmdline", vm(image=pb.Image(kernel=KERNEL, cmdline="a\nb")), ("cmdline",)),
    ("huge cmdline", vm(image=pb.Image(kernel=KERNEL, cmdline="a" * 5000)), ("cmdline",)),
    ("NUL in kernel path", vm(image=pb.Image(kernel="/boot/vm\x00linuz")), ("kernel",)),
    ("'..' in kernel path", vm(image=pb.Image(kernel="/var/../etc/shadow")), ("kernel",)),
    ("relative disk path", vm(image=pb.Image(disk="images/base.qcow2")), ("disk",)),
    ("host disk as base image", vm(image=pb.Image(disk="/dev/sda")), ("disk", "/dev")),
    ("/etc/shadow as kernel", vm(image=pb.Image(kernel="/etc/shadow")), ("kernel", "/etc")),
    ("huge path", vm(image=pb.Image(kernel="/" + "a" * 5000)), ("kernel",)),
    ("initrd without kernel", vm(image=pb.Image(initrd="/boot/initrd")), ("initrd",)),
    ("no image", vm(image=pb.Image()), ("image",)),
    (
        "9 KB of labels",
        vm(labels={f"hvplace.io/{'k' * 50}{i:02d}": "v" * 63 for i in range(64)}),
        ("bytes as stored",),
    ),
    ("label key with newline", vm(labels={"app\n": "db"}), ("label key",)),
    ("label value with newline", vm(labels={"app": "db\n"}), ("label", "value")),
    ("20 KB label value", vm(labels={"app": "x" * 20_000}), ("label", "value", "...")),
    (
        "node affinity key '*Q'",
        vm(node_affinity=affinity(expr("*Q", "In", "a"))),
        ("node affinity", "*Q"),
    ),
    (
        "100,000 In values",
        vm(node_affinity=affinity(expr("zone", "In", *(f"z{i}" for i in range(100_000))))),
        ("values",),
    ),
    (
        "bad node affinity value",
        vm(node_affinity=affinity(expr("zone", "In", "east\n"))),
        ("value",),
    ),
    ("bad operator", vm(node_affinity=affinity(expr("zone", "Near" * 5000, "a"))), ("Near",)),
    (
        "huge Gt bound",
        vm(node_affinity=affinity(expr("cpus", "Gt", "9" * 400))),
        ("integer",),
    ),
]


@pytest.mark.parametrize("bad", [b[1] for b in BAD_VMS], ids=[b[0] for b in BAD_VMS])
async def test_bad_vm_is_incorrect_and_writes_nothing(api: Api, bad: pb.VM) -> None:
    needles = next(b[2] for b in BAD_VMS if b[1] is bad)
    await refused(api, api.vm.CreateVMs(pb.CreateVMsRequest(vms=[vm("fine"), bad])), *needles)
    assert (await api.vm.ListVMs(pb.ListVMsRequest())).vms == []


def rule(**kw: object) -> pb.Rule:
    base: dict[str, object] = {
        "scope": "acme",
        "name": "r",
        "kind": "anti_affinity",
        "members": ["a", "b"],
    }
    base.update(kw)
    return pb.Rule(**base)  # type: ignore[arg-type]


BAD_RULES = [
    ("topology key with newline", rule(topology_key="rack\n"), ("topology",)),
    (
        "selector key '*Q'",
        rule(members=[], selector=pb.LabelSelector(match_expressions=[expr("*Q", "Exists")])),
        ("selector", "*Q"),
    ),
    (
        "selector label value with newline",
        rule(members=[], selector=pb.LabelSelector(match_labels={"app": "db\n"})),
        ("label", "value"),
    ),
    (
        "100,000 selector values",
        rule(
            members=[],
            selector=pb.LabelSelector(
                match_expressions=[expr("app", "In", *(f"a{i}" for i in range(100_000)))]
            ),
        ),
        ("values",),
    ),
    ("description with NUL", rule(description="a\x00"), ("description",)),
    ("20 KB member name", rule(members=["a", "b" * 20_000]), ("member", "...")),
]


@pytest.mark.parametrize("bad", [b[1] for b in BAD_RULES], ids=[b[0] for b in BAD_RULES])
async def test_bad_rule_is_incorrect_and_writes_nothing(api: Api, bad: pb.Rule) -> None:
    needles = next(b[2] for b in BAD_RULES if b[1] is bad)
    await refused(api, api.rule.CreateRule(pb.CreateRuleRequest(rule=bad)), *needles)


@pytest.mark.parametrize(
    "keys", [["app\n"], ["*Q"], ["x" * 20_000], [f"k{i}" for i in range(1000)]]
)
async def test_bad_policy_label_keys_are_incorrect(api: Api, keys: list[str]) -> None:
    policy = pb.ScopePolicy(scope="acme", label_anti_affinity=True, label_keys=keys)
    await refused(api, api.rule.SetScopePolicy(policy), "label")


async def test_huge_names_are_quoted_short(api: Api) -> None:
    details = await refused(api, api.vm.GetVM(pb.VMRef(scope="acme", name="n\n" * 10_000)))
    assert len(details) < 400


async def test_vm_without_image_gets_the_cluster_default(api: Api) -> None:
    default = Image(kernel=KERNEL, initrd="/var/cache/hvplace/guest/initrd.img", cmdline="quiet")
    await api.client.put(
        keyspace.CONFIG.encode(), codec.dumps(ClusterConfig(default_image=default))
    )
    await api.backend.fresh_view()
    resp = await api.vm.CreateVMs(
        pb.CreateVMsRequest(vms=[vm("plain", image=pb.Image()), vm("own")])
    )
    assert resp.vms[0].spec.image == pb.Image(
        kernel=default.kernel, initrd=default.initrd, cmdline=default.cmdline
    )
    assert resp.vms[1].spec.image == pb.Image(kernel=KERNEL)
    stored = json.loads(api.etcd.etcdctl("get", "--print-value-only", keyspace.vm("acme", "plain")))
    assert stored["image"]["kernel"] == KERNEL and stored["image"]["cmdline"] == "quiet"


async def test_image_roots_confine_image_paths(api: Api) -> None:
    roots = ("/var/lib/hvplace/images", "/var/cache/hvplace/guest")
    config = ClusterConfig(default_image=Image(kernel=KERNEL), image_roots=roots)
    await api.client.put(keyspace.CONFIG.encode(), codec.dumps(config))
    await api.backend.fresh_view()
    for image in (pb.Image(kernel="/boot/vmlinuz"), pb.Image(disk="/var/lib/hvplace/imagesX/b")):
        await refused(
            api, api.vm.CreateVMs(pb.CreateVMsRequest(vms=[vm("out", image=image)])), "roots"
        )
    inside = pb.Image(disk="/var/lib/hvplace/images/base.qcow2")
    resp = await api.vm.CreateVMs(
        pb.CreateVMsRequest(vms=[vm("in", image=inside), vm("plain", image=pb.Image())])
    )
    assert [v.spec.image for v in resp.vms] == [inside, pb.Image(kernel=KERNEL)]


# --------------------------------------------------------------------------- property

HOSTILE_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(max_codepoint=0x9F), max_size=80),
    st.sampled_from(
        ["", "a\x00b", "a\x01", "..", "/../x", "x\n", "\ufffe", "\t", "<&>", "x" * 70, "é"]
    ),
    st.text(st.sampled_from("ab.-_/ \n\x00"), min_size=60, max_size=3000),
)
NAMES = st.one_of(st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True), HOSTILE_TEXT)
PATHS = st.one_of(
    st.sampled_from(["", KERNEL, "/boot/vmlinuz-6.1", "/a/.b/c+d@e=f~g", "/x/y.qcow2"]),
    st.from_regex(r"(/[a-z.]{1,8}){1,4}", fullmatch=True),
    HOSTILE_TEXT,
)
SIZES = st.one_of(
    st.integers(min_value=-2, max_value=4096),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
LABEL_KEYS = st.one_of(st.sampled_from(["app", "zone", "hvplace.io/rack", "host"]), HOSTILE_TEXT)
LABEL_VALUES = st.one_of(st.sampled_from(["db", "east", "a b", "7", ""]), HOSTILE_TEXT)
EXPRESSIONS = st.builds(
    pb.LabelExpression,
    key=LABEL_KEYS,
    operator=st.one_of(
        st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]), NAMES
    ),
    values=st.one_of(
        st.lists(LABEL_VALUES, max_size=3),
        st.lists(st.sampled_from(["1", "-5", "99999999999999999999"]), max_size=2),
        st.integers(min_value=60, max_value=70).map(lambda n: [f"v{i}" for i in range(n)]),
    ),
)
TERMS = st.builds(pb.NodeSelectorTerm, match_expressions=st.lists(EXPRESSIONS, max_size=3))
AFFINITY = st.builds(
    pb.NodeAffinity,
    required=st.lists(TERMS, max_size=2),
    preferred=st.lists(
        st.builds(pb.PreferredTerm, weight=st.integers(min_value=-1, max_value=101), term=TERMS),
        max_size=2,
    ),
)
VALID_EXPRESSIONS = st.one_of(
    st.builds(
        pb.LabelExpression,
        key=st.sampled_from(["zone", "rack", "host"]),
        operator=st.sampled_from(["In", "NotIn"]),
        values=st.lists(st.sampled_from(["east", "r1", "hv1", "a b"]), min_size=1, max_size=3),
    ),
    st.builds(pb.LabelExpression, key=st.just("gpu"), operator=st.just("DoesNotExist")),
    st.builds(
        pb.LabelExpression, key=st.just("cpus"), operator=st.just("Lt"), values=st.just(["99"])
    ),
)
VALID = {
    "scope": st.just("acme"),
    "name": st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True),
    "labels": st.dictionaries(
        st.sampled_from(["app", "hvplace.io/tier"]), st.sampled_from(["db", "a b"])
    ),
    "resources": st.builds(
        pb.Resources,
        vcpus=st.integers(1, 64),
        memory_mib=st.integers(1, 4096),
        disk_gib=st.integers(0, 100),
    ),
    "image": st.builds(
        pb.Image,
        kernel=st.sampled_from([KERNEL, "/boot/vmlinuz-6.1", "/a/.b/c+d@e=f~g"]),
        initrd=st.sampled_from(["", "/boot/initrd.img"]),
        cmdline=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200),
    ),
    "node_affinity": st.builds(
        pb.NodeAffinity,
        preferred=st.lists(
            st.builds(
                pb.PreferredTerm,
                weight=st.integers(1, 100),
                term=st.builds(
                    pb.NodeSelectorTerm, match_expressions=st.lists(VALID_EXPRESSIONS, max_size=2)
                ),
            ),
            max_size=2,
        ),
    ),
    "ha_priority": st.sampled_from(["", "high", "off"]),
    "description": st.text(max_size=300),
}
HOSTILE = {
    "scope": NAMES,
    "name": NAMES,
    "labels": st.dictionaries(LABEL_KEYS, LABEL_VALUES, max_size=4),
    "resources": st.builds(pb.Resources, vcpus=SIZES, memory_mib=SIZES, disk_gib=SIZES),
    "image": st.builds(pb.Image, kernel=PATHS, initrd=PATHS, cmdline=HOSTILE_TEXT, disk=PATHS),
    "node_affinity": AFFINITY,
    "ha_priority": NAMES,
    "description": st.one_of(HOSTILE_TEXT, st.text(max_size=1100)),
}


@st.composite
def random_vms(draw: st.DrawFn) -> pb.VM:
    """A sound VM with up to three fields replaced by random (mostly hostile) values."""
    fields = {k: draw(v) for k, v in VALID.items()}
    for k in draw(st.sets(st.sampled_from(sorted(HOSTILE)), max_size=3)):
        fields[k] = draw(HOSTILE[k])
    return pb.VM(**fields)


async def _refused_or_defines(api: Api, conn: libvirt.virConnect, spec: pb.VM) -> str:
    """One random create: `incorrect` with nothing written, or a VM whose stored record
    renders to a domain libvirt's test driver defines. Returns which."""
    before = revision(api.etcd)
    try:
        resp = await api.vm.CreateVMs(pb.CreateVMsRequest(vms=[spec]))
    except grpc.aio.AioRpcError as err:
        details = err.details() or ""
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), details[:300])
        assert details.startswith("incorrect: ") and len(details.encode()) <= 1500, details
        assert revision(api.etcd) == before
        return "refused"
    created = resp.vms[0]
    scope, name = created.spec.scope, created.spec.name
    try:
        stored = codec.loads(
            records.VM, api.etcd.etcdctl("get", "--print-value-only", keyspace.vm(scope, name))
        )
        assignment = records.Assignment(vm=stored, host="hv1", epoch=1)
        if created.status.host:
            raw = api.etcd.etcdctl(
                "get", "--print-value-only", keyspace.assignment(created.status.host, scope, name)
            )
            assignment = codec.loads(records.Assignment, raw)
        xml = domain_xml.render(assignment, domain_type="test", serial_log="/tmp/hvplace-prop.log")
        conn.defineXML(xml).undefine()
    finally:
        await api.vm.DeleteVM(pb.DeleteVMRequest(scope=scope, name=name))
    return "defined"


def run_property(
    etcd: EtcdServer,
    strategy: st.SearchStrategy[T],
    check: Callable[[Api, T], Awaitable[str]],
    examples: int,
) -> Counter[str]:
    """`check` on each example, on one event loop and one API (hypothesis runs sync)."""
    loop = asyncio.new_event_loop()
    context = running_api(etcd)
    api = loop.run_until_complete(context.__aenter__())
    outcomes: Counter[str] = Counter()
    try:
        loop.run_until_complete(api.add_host("hv1"))

        @settings(
            max_examples=examples,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(example=strategy)
        def one(example: T) -> None:
            outcomes[loop.run_until_complete(check(api, example))] += 1

        one()
    finally:
        loop.run_until_complete(context.__aexit__(None, None, None))
        loop.close()
    return outcomes


def test_random_requests_are_refused_or_define_in_libvirt(etcd: EtcdServer) -> None:
    """Random strings and sizes through the real API: each request is refused as
    `incorrect` with etcd's revision unchanged, or its VM's domain XML defines."""
    conn = libvirt.open("test:///default")
    try:
        outcomes = run_property(
            etcd, random_vms(), lambda api, spec: _refused_or_defines(api, conn, spec), 150
        )
    finally:
        conn.close()
    # The generator reaches both sides.
    assert outcomes["refused"] > 0 and outcomes["defined"] > 0, outcomes


VALID_SELECTORS = st.builds(
    pb.LabelSelector,
    match_labels=st.dictionaries(st.sampled_from(["app", "x.io/tier"]), st.sampled_from(["db"])),
    match_expressions=st.lists(VALID_EXPRESSIONS, max_size=2),
)
VALID_RULE = {
    "scope": st.just("acme"),
    "name": st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True),
    "kind": st.just("anti_affinity"),
    "members": st.lists(
        st.from_regex(r"m[0-9]{1,3}", fullmatch=True), min_size=2, max_size=5, unique=True
    ),
    "selector": VALID_SELECTORS,
    "topology_key": st.sampled_from(["", "host", "rack", "topology.hvplace.io/zone"]),
    "max_per_domain": st.integers(1, 5),
    "description": st.text(max_size=200),
}
HOSTILE_RULE = {
    "scope": NAMES,
    "name": NAMES,
    "kind": NAMES,
    "enforcement": NAMES,
    "weight": SIZES.map(lambda n: max(-(2**31), min(n, 2**31 - 1))),
    "members": st.lists(NAMES, max_size=4),
    "selector": st.builds(
        pb.LabelSelector,
        match_labels=st.dictionaries(LABEL_KEYS, LABEL_VALUES, max_size=3),
        match_expressions=st.lists(EXPRESSIONS, max_size=3),
    ),
    "topology_key": LABEL_KEYS,
    "max_per_domain": SIZES.map(lambda n: max(-(2**31), min(n, 2**31 - 1))),
    "on_failure": NAMES,
    "description": st.one_of(HOSTILE_TEXT, st.text(max_size=1100)),
}


@st.composite
def random_rules(draw: st.DrawFn) -> pb.Rule:
    fields = {k: draw(v) for k, v in VALID_RULE.items()}
    for k in draw(st.sets(st.sampled_from(sorted(HOSTILE_RULE)), max_size=3)):
        fields[k] = draw(HOSTILE_RULE[k])
    return pb.Rule(**fields)


async def _refused_or_stored(api: Api, rule: pb.Rule) -> str:
    """One random rule: `incorrect` with nothing written, or stored as given."""
    before = revision(api.etcd)
    try:
        resp = await api.rule.CreateRule(pb.CreateRuleRequest(rule=rule))
    except grpc.aio.AioRpcError as err:
        details = err.details() or ""
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), details[:300])
        assert details.startswith("incorrect: ") and len(details.encode()) <= 1500, details
        assert revision(api.etcd) == before
        return "refused"
    stored = resp.rule.rule
    try:
        assert (stored.name, list(stored.members)) == (rule.name, list(rule.members))
        assert stored.description == rule.description
    finally:
        await api.rule.DeleteRule(
            pb.DeleteRuleRequest(scope=stored.scope, name=stored.name, force=True)
        )
    return "stored"


def test_random_rules_are_refused_or_stored(etcd: EtcdServer) -> None:
    outcomes = run_property(etcd, random_rules(), _refused_or_stored, 100)
    assert outcomes["refused"] > 0 and outcomes["stored"] > 0, outcomes


def test_any_error_message_is_capped_for_the_wire() -> None:
    """The last bound, for messages no validator wrote (an unexpected error's text)."""
    from hvplace.coordinator.errors_grpc import MAX_MESSAGE_BYTES, unexpected, wire_message

    assert wire_message("short") == "short"
    for text in ("é" * 5000, "x" * 5000, "\U0001f680" * 5000):
        cut = wire_message(text)
        assert len(cut.encode()) <= MAX_MESSAGE_BYTES and cut.endswith("...")
        assert text.startswith(cut[:-3])
    assert len(wire_message(str(unexpected(ValueError("v" * 100_000)))).encode()) <= 1500


async def test_undecodable_request_is_incorrect(api: Api) -> None:
    """Bytes that are no valid message (bad UTF-8 in a string, a truncated field) are
    refused as `incorrect` like any other malformed input, not UNKNOWN."""
    good = pb.CreateVMsRequest(vms=[vm("ZZZZ")]).SerializeToString()
    create = api.channel.unary_unary(
        "/hvplace.v1.VMService/CreateVMs",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    for raw in (good.replace(b"ZZZZ", b"\xff\xfe\xfd\xfc"), good[:-3]):
        await refused(api, create(raw), "malformed")
    watch = api.channel.unary_stream(
        "/hvplace.v1.ClusterService/WatchEvents",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )

    async def events() -> None:
        async for _ in watch(b"\x0a\x02\xff\xfe"):  # `kinds`, two bytes of bad UTF-8
            pass

    await refused(api, events(), "malformed")
