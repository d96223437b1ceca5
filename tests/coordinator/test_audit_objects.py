"""The audit line names what a request touches: the first 20 objects, then a count."""

from __future__ import annotations

from hvplace.coordinator.auth import objects_of
from hvplace.proto.v1 import hvplace_pb2 as pb


def _create(n: int) -> pb.CreateVMsRequest:
    return pb.CreateVMsRequest(vms=[pb.VM(scope="acme", name=f"vm{i:03d}") for i in range(n)])


def test_a_few_objects_are_all_named() -> None:
    assert objects_of(_create(3)) == ["acme/vm000", "acme/vm001", "acme/vm002"]
    assert objects_of(pb.VMRef(scope="acme", name="db")) == ["acme/db"]


def test_many_objects_are_named_up_to_the_limit_then_counted() -> None:
    found = objects_of(_create(500))
    assert found[:20] == [f"acme/vm{i:03d}" for i in range(20)]
    assert found[20:] == ["... 480 more"]
    assert objects_of(_create(21)) == [*(f"acme/vm{i:03d}" for i in range(20)), "... 1 more"]
    assert objects_of(_create(20)) == [f"acme/vm{i:03d}" for i in range(20)]
