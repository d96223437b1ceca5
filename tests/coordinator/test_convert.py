"""Proto <-> record conversion on the API's hot path agrees with protobuf's own JSON mapping."""

from __future__ import annotations

from google.protobuf import json_format
from hvplace.coordinator import convert
from hvplace.proto import codec, records
from hvplace.proto.v1 import hvplace_pb2 as pb


def test_message_dict_reads_as_message_to_dict_does() -> None:
    vm = pb.VM(
        scope="acme",
        name="db-1",
        labels={"app": "db", "tier": "back"},
        resources=pb.Resources(vcpus=2, memory_mib=2048, disk_gib=10),
        description="primary",
    )
    term = vm.node_affinity.required.add()
    term.match_expressions.add(key="rack", operator="In", values=["r1"])
    vm.node_affinity.preferred.add(weight=5).term.match_expressions.add(
        key="zone", operator="Exists"
    )
    rule = pb.Rule(
        scope="acme",
        name="apart",
        kind="anti_affinity",
        members=["db-1", "db-2"],
        selector=pb.LabelSelector(match_labels={"app": "db"}),
        topology_key="rack",
        max_per_domain=1,
        on_failure="degrade",
    )
    for msg, cls in ((vm, records.VM), (rule, records.Rule), (pb.VM(), None)):
        fast = convert.message_dict(msg)
        slow = json_format.MessageToDict(msg, preserving_proto_field_name=True)
        if cls is not None:
            assert codec.from_dict(cls, fast) == codec.from_dict(cls, slow)
        assert set(fast) == set(slow)


def test_records_round_trip_through_their_messages() -> None:
    vm = records.VM(
        scope="acme",
        name="web-1",
        labels={"app": "web"},
        resources=records.Resources(vcpus=4, memory_mib=512, disk_gib=1),
        ha_priority=records.HAPriority.HIGH,
    )
    assert convert.from_proto(records.VM, convert.to_proto(vm, pb.VM)) == vm
    status = records.VMStatus(scope="acme", name="web-1", phase=records.Phase.SCHEDULED, host="h1")
    assert convert.from_proto(records.VMStatus, convert.to_proto(status, pb.VMStatus)) == status
