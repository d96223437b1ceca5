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


def _filled(descriptor: object, depth: int = 0) -> dict[str, object]:
    """Every field of a message type set to something not zero (sub-messages to depth 3)."""
    out: dict[str, object] = {}
    for field in descriptor.fields:  # type: ignore[attr-defined]
        message = field.message_type
        if message is not None and message.GetOptions().map_entry:
            value = message.fields_by_name["value"]
            if value.message_type is None:
                out[field.name] = {"k": _scalar(value)}
            elif depth < 3:
                out[field.name] = {"k": _filled(value.message_type, depth + 1)}
        elif message is not None:
            if depth < 3:
                sub = _filled(message, depth + 1)
                out[field.name] = [sub, sub] if field.is_repeated else sub
        else:
            out[field.name] = [_scalar(field)] * 2 if field.is_repeated else _scalar(field)
    return out


def _scalar(field: object) -> object:
    from google.protobuf.descriptor import FieldDescriptor as F

    kind = field.cpp_type  # type: ignore[attr-defined]
    if kind == F.CPPTYPE_STRING:
        return "x"
    if kind == F.CPPTYPE_BOOL:
        return True
    if kind in (F.CPPTYPE_FLOAT, F.CPPTYPE_DOUBLE):
        return 1.5
    if kind == F.CPPTYPE_ENUM:
        return field.enum_type.values[-1].number  # type: ignore[attr-defined]
    return 7


def test_message_dict_of_every_api_message_filled_or_empty() -> None:
    """The field-by-field readers agree with protobuf's MessageToDict on every message
    type of the API, each field set (and left empty): no field missed or misread."""
    kinds = [getattr(pb, n) for n in dir(pb) if isinstance(getattr(pb, n), type)]
    messages = [k for k in kinds if hasattr(k, "DESCRIPTOR") and hasattr(k, "ListFields")]
    assert len(messages) > 30
    for cls in messages:
        for msg in (cls(**_filled(cls.DESCRIPTOR)), cls()):
            slow = json_format.MessageToDict(
                msg, preserving_proto_field_name=True, use_integers_for_enums=True
            )
            fast = convert.message_dict(msg)
            assert json_format.ParseDict(fast, cls()) == msg, cls.__name__
            assert json_format.ParseDict(slow, cls()) == msg, cls.__name__
            assert _shape(fast) == _shape(slow), cls.__name__


def _shape(value: object) -> object:
    """Keys and nesting, with leaves as their text (MessageToDict writes int64 as text)."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return str(value)
