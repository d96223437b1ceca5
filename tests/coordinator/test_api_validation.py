"""Hostile input through the real gRPC API (real etcd): each bad request is `incorrect`
with a short reason and writes nothing; what is accepted becomes a domain libvirt defines."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc
import pytest
from api_support import Api, running_api
from hvplace.coordinator.errors_grpc import error_info
from hvplace.proto import keyspace, models
from hvplace.proto.models import ClusterConfig, Image
from hvplace.proto.v1 import hvplace_pb2 as pb
from support.etcd import EtcdServer

KERNEL = "/var/cache/hvplace/guest/vmlinuz"
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
    ("huge path", vm(image=pb.Image(kernel="/" + "a" * 5000)), ("kernel",)),
    ("initrd without kernel", vm(image=pb.Image(initrd="/boot/initrd")), ("initrd",)),
    ("no image", vm(image=pb.Image()), ("image",)),
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
        keyspace.CONFIG.encode(), models.dumps(ClusterConfig(default_image=default))
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
