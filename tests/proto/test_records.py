"""The records' JSON is their proto message's JSON, and bad names never become keys."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format
from hvplace.proto import codec, keyspace, records, timing, validation
from hvplace.proto.errors import InvalidInput
from hvplace.proto.generate import stale_files
from hvplace.proto.names import check_name
from hvplace.proto.records import (
    VM,
    Assignment,
    ClusterConfig,
    Enforcement,
    HostInfo,
    Image,
    Resources,
    Rule,
    RuleKind,
    ScopePolicy,
)
from hvplace.proto.selectors import (
    LabelExpression,
    LabelSelector,
    NodeAffinity,
    NodeSelectorTerm,
    Op,
    PreferredTerm,
)
from hvplace.proto.v1 import hvplace_pb2 as pb

VM_FULL = VM(
    scope="acme",
    name="db-1",
    uid="u1",
    labels={"role": "db"},
    resources=Resources(vcpus=2, memory_mib=4096, disk_gib=10),
    image=Image(
        kernel="/var/lib/hvplace/vmlinuz", initrd="/var/lib/hvplace/initrd", cmdline="console=ttyS0"
    ),
    node_affinity=NodeAffinity(
        required=(NodeSelectorTerm((LabelExpression("zone", Op.IN, ("east", "west")),)),),
        preferred=(PreferredTerm(10, NodeSelectorTerm((LabelExpression("ssd", Op.EXISTS),))),),
    ),
)

RECORDS = [
    (VM_FULL, pb.VM),
    (Assignment(vm=VM_FULL, host="h1", epoch=3), pb.Assignment),
    (
        Rule(
            scope="acme",
            name="db",
            kind=RuleKind.ANTI_AFFINITY,
            enforcement=Enforcement.PREFERRED,
            weight=50,
            selector=LabelSelector({"role": "db"}),
            topology_key="rack",
            max_per_domain=2,
        ),
        pb.Rule,
    ),
    (ScopePolicy(scope="acme", label_anti_affinity=True, spread=2), pb.ScopePolicy),
    (HostInfo(name="h1", labels={"zone": "east"}, capacity=Resources(8, 16384, 100)), pb.HostInfo),
    (ClusterConfig(), pb.ClusterConfig),
    (
        records.Migration(
            scope="acme",
            name="db-1",
            uid="u1",
            source="h1",
            target="h2",
            epoch=3,
            target_uri="qemu+tls://h2/system",
            target_address="10.0.0.2",
            target_console_dir="/var/lib/hvplace-agent/console",
            started_at=1.5,
            timeout_s=120.0,
            restart=True,
        ),
        pb.Migration,
    ),
    (
        records.DomainStatus(
            scope="acme", name="db-1", host="h1", uid="u1", epoch=3, migrated_to="h2"
        ),
        pb.DomainStatus,
    ),
    (Assignment(vm=VM_FULL, host="h2", epoch=4, adopt_epoch=3), pb.Assignment),
]


@pytest.mark.parametrize(("record", "message"), RECORDS, ids=lambda r: type(r).__name__)
def test_record_json_is_the_proto_json(record: object, message: type) -> None:
    raw = codec.dumps(record)
    parsed = json_format.Parse(raw, message())
    back = json_format.MessageToDict(parsed, preserving_proto_field_name=True)
    assert codec.from_dict(type(record), back) == record
    assert codec.loads(type(record), raw) == record


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(InvalidInput, match="unknown field"):
        codec.from_dict(VM, {"scope": "a", "name": "b", "colour": "red"})


def test_bad_enum_is_rejected_with_the_field() -> None:
    with pytest.raises(InvalidInput, match=r"VM\.power"):
        codec.loads(VM, json.dumps({"scope": "a", "name": "b", "power": "on"}))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "is empty"),
        ("a/b", "contains '/'"),
        ("a..b", "contains '..'"),
        ("..", "contains '..'"),
        ("a\nb", "control character"),
        ("a\x7fb", "control character"),
        ("x" * 64, "at most 63"),
        ("a b", "contains ' '"),
        ("-a", "must start"),
    ],
)
def test_bad_names_are_rejected(name: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        check_name(name, "VM name")
    with pytest.raises(InvalidInput, match=message):
        keyspace.vm("acme", name)


def test_good_names_pass() -> None:
    assert check_name("x" * 63, "VM name") == "x" * 63
    assert keyspace.assignment("h1", "acme", "db-1") == "/hvplace/v1/assignments/h1/acme/db-1"


@pytest.mark.parametrize(
    ("vm", "message"),
    [
        (VM(scope="a", name="b", resources=Resources(0, 64, 0)), "vcpus is 0"),
        (VM(scope="a", name="b", resources=Resources(1, -1, 0)), "memory_mib is -1"),
        (VM(scope="a", name="b", resources=Resources(1, 1 << 40, 0)), "memory_mib"),
        (VM(scope="a", name="b", labels={"bad key!": "x"}), "label key"),
        (VM(scope="a", name="b", image=Image(kernel="relative/vmlinuz")), "absolute"),
        (
            VM(
                scope="a",
                name="b",
                node_affinity=NodeAffinity(
                    required=(NodeSelectorTerm((LabelExpression("cpu", Op.GT, ("many",)),)),)
                ),
            ),
            "integer",
        ),
    ],
)
def test_bad_vms_are_rejected(vm: VM, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        validation.validate_vm(vm)


def test_rule_needs_two_members_or_a_selector() -> None:
    with pytest.raises(InvalidInput, match="at least two"):
        validation.validate_rule(
            Rule(scope="a", name="r", kind=RuleKind.ANTI_AFFINITY, members=("x",))
        )
    with pytest.raises(InvalidInput, match="at most 40"):
        validation.validate_rule(
            Rule(scope="a", name="r" * 41, kind=RuleKind.AFFINITY, members=("x", "y"))
        )


def test_unsafe_timing_budget_is_refused() -> None:
    validation.validate_cluster_config(ClusterConfig())
    with pytest.raises(InvalidInput, match="unsafe timing budget"):
        validation.validate_cluster_config(ClusterConfig(lease_ttl_s=5, fence_after_s=4.9))


@pytest.mark.parametrize(
    ("ttl", "fence", "watchdog", "safe"),
    [
        (5, 3, 2.0, True),  # the defaults: the host resets by 5.5 s, as re-placement may start
        (5, 3, 2.01, False),
        (2, 1, 1.0, True),
        (2, 1, 1.5, False),
        (10, 6, 4.0, True),
        (10, 6, 5.0, False),
        (5, 3, 0.0, True),  # 0: derived, 2 s
        (5, 3, -1.0, False),
    ],
)
def test_the_watchdog_timeout_is_part_of_the_budget(
    ttl: float, fence: float, watchdog: float, safe: bool
) -> None:
    """A dead agent's last pet comes up to fence_after after its last renewal; its host
    resets watchdog_timeout later, which must precede lease_ttl + failover_delay (0.5 s)
    less the clock margin (0.5 s)."""
    budget = ClusterConfig(lease_ttl_s=ttl, fence_after_s=fence, watchdog_timeout_s=watchdog)
    if safe:
        validation.validate_cluster_config(budget)
    else:
        with pytest.raises(InvalidInput, match="watchdog_timeout_s"):
            validation.validate_cluster_config(budget)


@pytest.mark.parametrize(("ttl", "expected"), [(2, 1.0), (3, 1.0), (5, 2.0), (10, 4.0), (30, 12.0)])
def test_derived_watchdog_timeout_is_the_largest_safe_whole_second(
    ttl: float, expected: float
) -> None:
    fence = timing.fence_after_for(ttl)
    assert timing.watchdog_timeout_for(ttl, fence) == expected
    validation.validate_cluster_config(
        ClusterConfig(lease_ttl_s=ttl, fence_after_s=fence, watchdog_timeout_s=expected)
    )


def test_generated_code_is_fresh() -> None:
    assert stale_files() == [], "run: python -m hvplace.proto.generate"


@pytest.mark.parametrize(
    "vm",
    [
        records.VM(scope="acme", name="db-1"),
        records.VM(
            scope="s",
            name="web_2",
            labels={"app": "web", "tier": "front end"},
            resources=records.Resources(vcpus=4, memory_mib=4096, disk_gib=20),
            description='quotes " and \\ and ünïcode',
        ),
    ],
)
def test_assignment_json_built_around_the_spec_is_the_same_bytes(vm: records.VM) -> None:
    spec = codec.dumps(vm)
    for host, epoch in (("hv1", 1), ("rack-2.host_7", 123456)):
        a = records.Assignment(vm=vm, host=host, epoch=epoch)
        raw = codec.dumps_assignment(a, spec)
        assert raw == codec.dumps(a)
        back = codec.loads_assignment(raw, vm, spec)
        assert back == a and back.vm is vm  # the spec object, not a second decode
    # Another VM's JSON in the assignment: decoded in full, never mixed up.
    other = codec.dumps(records.Assignment(vm=records.VM(scope="x", name="y"), host="h", epoch=2))
    decoded = codec.loads_assignment(other, vm, spec)
    assert decoded.vm.name == "y" and decoded.vm is not vm
    # Not the planner's shape (epoch as a string): the full decoder takes it.
    odd = codec.loads_assignment(b'{"epoch":"1","host":"h","vm":' + spec + b"}", vm, spec)
    assert odd == records.Assignment(vm=vm, host="h", epoch=1)


# --------------------------------------------------------------------------- input limits

SOUND = VM(scope="a", name="b", image=Image(kernel="/boot/vmlinuz"))


def _expr(key: str, op: Op, *values: str) -> NodeAffinity:
    return NodeAffinity(required=(NodeSelectorTerm((LabelExpression(key, op, values),)),))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"description": "x\x00y"}, "description"),
        ({"description": "x\x01y"}, "control character"),
        ({"description": "d" * 1025}, "over 1024"),
        ({"image": Image(kernel="/k", cmdline="a\x00")}, "cmdline"),
        ({"image": Image(kernel="/k", cmdline="c" * 1025)}, "cmdline"),
        ({"image": Image(kernel="/var/../etc/shadow")}, "image kernel"),
        ({"image": Image(disk="base.qcow2")}, "image disk"),
        ({"image": Image(kernel="/k", initrd="/i\n")}, "image initrd"),
        ({"image": Image(initrd="/boot/initrd")}, "initrd but no kernel"),
        ({"labels": {"app\n": "db"}}, "label key"),
        ({"labels": {"app": "db\n"}}, "value"),
        ({"labels": {f"k{i}": "v" for i in range(65)}}, "at most 64"),
        ({"node_affinity": _expr("*Q", Op.IN, "a")}, "'*Q'"),
        ({"node_affinity": _expr("zone", Op.IN)}, "at least one value"),
        ({"node_affinity": _expr("zone", Op.IN, *map(str, range(65)))}, "at most 64"),
        ({"node_affinity": _expr("zone", Op.IN, "east\n")}, "value"),
        ({"node_affinity": _expr("zone", Op.EXISTS, "x")}, "takes no values"),
        ({"node_affinity": _expr("cpus", Op.GT, "1", "2")}, "exactly one value"),
        ({"node_affinity": _expr("cpus", Op.LT, "9" * 19)}, "integer"),
        (
            {
                "node_affinity": NodeAffinity(
                    required=(NodeSelectorTerm((LabelExpression("a", Op.EXISTS),)),) * 9
                )
            },
            "9 required terms",
        ),
        (
            {
                "node_affinity": NodeAffinity(
                    required=(NodeSelectorTerm((LabelExpression("a", Op.EXISTS),) * 17),)
                )
            },
            "17 expressions",
        ),
        (
            {
                "node_affinity": NodeAffinity(
                    preferred=(PreferredTerm(0, NodeSelectorTerm()),),
                )
            },
            "weight",
        ),
        ({"uid": "u\n"}, "uid"),
        ({"request_id": "r" * 64}, "request id"),
    ],
)
def test_vm_limits(changes: dict[str, object], message: str) -> None:
    import dataclasses

    with pytest.raises(InvalidInput, match=message) as info:
        validation.validate_vm(dataclasses.replace(SOUND, **changes))  # type: ignore[arg-type]
    assert len(info.value.message) < 500


def test_vm_record_size_is_bounded() -> None:
    labels = {f"hvplace.io/{'k' * 50}{i:02d}": "v" * 63 for i in range(64)}
    fat = VM(scope="a", name="b", labels=labels, image=Image(kernel="/boot/vmlinuz"))
    validation.validate_vm(fat)  # each field within its own limit
    with pytest.raises(InvalidInput, match="bytes as stored; at most 8192"):
        validation.check_vm_size(fat)
    validation.check_vm_size(VM_FULL)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            Rule("a", "r", RuleKind.ANTI_AFFINITY, members=("x", "y"), topology_key="rack\n"),
            "topology",
        ),
        (Rule("a", "r", RuleKind.ANTI_AFFINITY, members=("x", "y"), topology_key="*Q"), "topology"),
        (
            Rule(
                "a",
                "r",
                RuleKind.ANTI_AFFINITY,
                selector=LabelSelector(match_expressions=(LabelExpression("*Q", Op.EXISTS),)),
            ),
            "selector",
        ),
        (
            Rule(
                "a",
                "r",
                RuleKind.ANTI_AFFINITY,
                selector=LabelSelector(
                    match_expressions=(LabelExpression("app", Op.IN, tuple(map(str, range(100)))),)
                ),
            ),
            "at most 64",
        ),
        (
            Rule("a", "r", RuleKind.ANTI_AFFINITY, selector=LabelSelector({"app": "db\n"})),
            "value",
        ),
        (
            Rule("a", "r", RuleKind.ANTI_AFFINITY, members=("x", "y"), description="\x00"),
            "description",
        ),
        (
            Rule("a", "r", RuleKind.ANTI_AFFINITY, members=tuple(f"m{i}" for i in range(10_001))),
            "10001 members",
        ),
    ],
)
def test_rule_limits(rule: Rule, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        validation.validate_rule(rule)


@pytest.mark.parametrize(
    ("keys", "message"),
    [(("app\n",), "label key"), (("*Q",), "label key"), (tuple(f"k{i}" for i in range(65)), "65")],
)
def test_policy_label_keys(keys: tuple[str, ...], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        validation.validate_policy(ScopePolicy("a", label_anti_affinity=True, label_keys=keys))
    validation.validate_policy(
        ScopePolicy("a", label_anti_affinity=True, label_keys=("app", "x.io/y"))
    )


def test_cluster_default_image_round_trips_and_is_validated() -> None:
    cfg = ClusterConfig(default_image=Image(kernel="/boot/vmlinuz", cmdline="quiet"))
    raw = codec.dumps(validation.validate_cluster_config(cfg))
    assert codec.loads(ClusterConfig, raw) == cfg
    message = json_format.Parse(raw, pb.ClusterConfig())
    assert message.default_image.kernel == "/boot/vmlinuz"
    for bad, words in (
        (Image(kernel="vmlinuz"), "absolute"),
        (Image(cmdline="quiet"), "neither a kernel nor a disk"),
        (Image(kernel="/k", cmdline="\x00"), "cmdline"),
    ):
        with pytest.raises(InvalidInput, match=words):
            validation.validate_cluster_config(ClusterConfig(default_image=bad))
    outside = ClusterConfig(default_image=Image(kernel="/boot/k"), image_roots=("/srv/images",))
    with pytest.raises(InvalidInput, match="outside the cluster's image roots"):
        validation.validate_cluster_config(outside)
    with pytest.raises(InvalidInput, match="image root"):
        validation.validate_cluster_config(ClusterConfig(image_roots=("srv",)))
    inside = ClusterConfig(
        default_image=Image(kernel="/srv/images/k"), image_roots=("/srv/images",)
    )
    assert (
        codec.loads(ClusterConfig, codec.dumps(validation.validate_cluster_config(inside)))
        == inside
    )
    with pytest.raises(InvalidInput, match="admission_topology"):
        validation.validate_cluster_config(ClusterConfig(admission_topology="rack\n"))


def test_decode_errors_quote_input_briefly() -> None:
    raw = json.dumps({"key": "k", "operator": "Near" * 5000})
    with pytest.raises(InvalidInput) as info:
        codec.loads(LabelExpression, raw)
    assert "Near" in info.value.message and len(info.value.message) < 400
    with pytest.raises(InvalidInput) as info:
        codec.loads(LabelExpression, json.dumps({"k" * 5000: 1}))
    assert len(info.value.message) < 400
