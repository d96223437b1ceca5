"""Proto messages ↔ domain records, through the JSON mapping both sides share.

Records mirror their messages field by field, so a conversion is `MessageToDict` +
`models.from_dict` one way and `models.to_dict` + `ParseDict` the other.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message
from hvplace.proto import models
from hvplace.proto.v1 import hvplace_pb2 as pb

T = TypeVar("T")
M = TypeVar("M", bound=Message)


def from_proto(cls: type[T], msg: Message) -> T:
    """A record from its message; malformed content raises InvalidInput (`incorrect`)."""
    return models.from_dict(cls, message_dict(msg))


_SCALAR, _REPEATED, _MESSAGE, _MESSAGES, _MAP, _MESSAGE_MAP = range(6)
_KINDS: dict[Any, int] = {}


def _kind(field: Any) -> int:
    kind = _KINDS.get(field)
    if kind is None:
        message = field.message_type
        if message is not None and message.GetOptions().map_entry:
            value = message.fields_by_name["value"]
            kind = _MESSAGE_MAP if value.message_type is not None else _MAP
        elif message is not None:
            kind = _MESSAGES if field.is_repeated else _MESSAGE
        else:
            kind = _REPEATED if field.is_repeated else _SCALAR
        _KINDS[field] = kind
    return kind


def message_dict(msg: Message) -> dict[str, Any]:
    """The set fields of a message as plain values, like `MessageToDict` with proto field
    names (and what `models.from_dict` reads), several times faster: the API's hot path.
    Integers stay integers where MessageToDict writes 64-bit ones as strings."""
    out: dict[str, Any] = {}
    for field, value in msg.ListFields():
        kind = _kind(field)
        if kind == _SCALAR:
            out[field.name] = value
        elif kind == _MESSAGE:
            out[field.name] = message_dict(value)
        elif kind == _MAP:
            out[field.name] = dict(value)
        elif kind == _REPEATED:
            out[field.name] = list(value)
        elif kind == _MESSAGES:
            out[field.name] = [message_dict(v) for v in value]
        else:
            out[field.name] = {k: message_dict(v) for k, v in value.items()}
    return out


def to_proto(record: Any, msg_cls: type[M]) -> M:
    """The message twin of a record (or of a result dataclass shaped like its message).

    Built by the message constructor, which takes nested dicts for sub-messages and maps:
    several times faster than `ParseDict`, and on the API's hot path (every created VM)."""
    try:
        return msg_cls(**full_dict(record))
    except (TypeError, ValueError):
        # A field the message lacks or a value it rejects: ParseDict names it precisely.
        return json_format.ParseDict(full_dict(record), msg_cls())


_Encoder = Callable[[Any], Any]
_FULL_PLANS: dict[type, tuple[tuple[str, _Encoder], ...]] = {}


def _identity(value: Any) -> Any:
    return value


def _encode(value: Any) -> Any:
    """Any value, by its runtime type (the slow path, for results not typed precisely)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return full_dict(value)
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


def _encoder_for(tp: Any) -> _Encoder:
    """An encoder chosen once from the field's declared type: the API's hot path."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _encoder_for(inner[0]) if len(inner) == 1 else _encode
    if origin is tuple:
        args = typing.get_args(tp)
        item = _encoder_for(args[0]) if args else _encode
        if item is _identity:
            return list
        return lambda v: [item(x) for x in v]
    if origin in (Mapping, dict) or tp in (dict,):
        return lambda v: {str(k): _encode(x) for k, x in v.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return full_dict
    if isinstance(tp, type) and issubclass(tp, StrEnum):
        return lambda v: v.value
    if tp in (str, int, float, bool):
        return _identity
    return _encode


def _full_plan(cls: type) -> tuple[tuple[str, _Encoder], ...]:
    plan = _FULL_PLANS.get(cls)
    if plan is None:
        try:
            hints = typing.get_type_hints(cls)
        except (NameError, TypeError):
            hints = {}
        plan = _FULL_PLANS[cls] = tuple(
            (f.name, _encoder_for(hints[f.name]) if f.name in hints else _encode)
            for f in dataclasses.fields(cls)
        )
    return plan


def full_dict(record: Any) -> dict[str, Any]:
    """Every field, defaults included: unlike etcd's compact JSON (read back by
    `models.from_dict`, which restores defaults), an API reader gets proto3 defaults
    (0, false, "") for what is left out, and a VM's default size is not zero."""
    out: dict[str, Any] = {}
    for name, encode in _full_plan(type(record)):
        value = getattr(record, name)
        if value is not None:
            out[name] = encode(value)
    return out


def dict_to_proto(data: Mapping[str, Any], msg_cls: type[M]) -> M:
    return json_format.ParseDict(dict(data), msg_cls())


def proto_to_dict(msg: Message) -> dict[str, Any]:
    """The JSON mapping the CLI prints with --json (proto field names)."""
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def vm_view(
    spec: models.VM,
    status: models.VMStatus | None,
    domain: models.DomainStatus | None,
) -> pb.VMView:
    view = pb.VMView(spec=to_proto(spec, pb.VM))
    if status is not None:
        view.status.CopyFrom(to_proto(status, pb.VMStatus))
    if domain is not None:
        view.domain.CopyFrom(to_proto(domain, pb.DomainStatus))
    return view


def resources(r: models.Resources) -> pb.Resources:
    return pb.Resources(vcpus=r.vcpus, memory_mib=r.memory_mib, disk_gib=r.disk_gib)


def failure_impact(
    failed: Iterable[str], stranded: Iterable[str], reasons: Mapping[str, str]
) -> pb.FailureImpact:
    return pb.FailureImpact(
        failed=", ".join(failed), stranded=list(stranded), reasons=dict(reasons)
    )
