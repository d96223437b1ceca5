"""The one codec between records (frozen dataclasses) and their messages' JSON mapping.

`to_dict`/`dumps` write what etcd stores: compact, fields at their default omitted (read
back by `from_dict`/`loads`, which restore them). `full_dict` writes every field, for an
API reader that takes proto3 defaults (0, false, "") for what is left out. Each record
class gets one plan, built once from its type hints: the API's and the cache's hot path.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import orjson
from hvplace.proto import decoders
from hvplace.proto.errors import InvalidInput
from hvplace.proto.names import clip, quote
from hvplace.proto.records import VM, Assignment

T = TypeVar("T")
_Encoder = Callable[[Any], Any]
_Decoder = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    compact: _Encoder
    """Nested records as `to_dict` writes them (etcd)."""
    full: _Encoder
    """Nested records with every field (the API)."""
    decode: _Decoder
    default: Any
    """The field's default, or dataclasses.MISSING for a required field."""
    record: bool = False
    """A nested record (a sub-message: set even when empty, as its presence is seen)."""


_plans: dict[type, tuple[_Field, ...]] = {}


def _identity(value: Any) -> Any:
    return value


def _encode_any(value: Any, nested: _Encoder) -> Any:
    """Any value, by its runtime type (the slow path, for a field not typed precisely)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return nested(value)
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, tuple | list):
        return [_encode_any(v, nested) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _encode_any(v, nested) for k, v in value.items()}
    return value


def _encoder(tp: Any, nested: _Encoder) -> _Encoder:
    """An encoder chosen once from a field's declared type; `nested` encodes records."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) != 1:
            return lambda v: _encode_any(v, nested)
        enc = _encoder(inner[0], nested)
        return lambda v: None if v is None else enc(v)
    if origin is tuple:
        args = typing.get_args(tp)
        if not args:
            return lambda v: [_encode_any(x, nested) for x in v]
        item = _encoder(args[0], nested)
        if item is _identity:
            return list
        return lambda v: [item(x) for x in v]
    if origin in (Mapping, dict) or tp is dict:
        args = typing.get_args(tp)
        if len(args) != 2:
            return lambda v: {str(k): _encode_any(x, nested) for k, x in v.items()}
        value = _encoder(args[1], nested)
        if value is _identity:
            return dict
        return lambda v: {str(k): value(x) for k, x in v.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return nested
    if isinstance(tp, type) and issubclass(tp, StrEnum):
        return lambda v: v.value
    if tp in (str, int, float, bool):
        return _identity
    return lambda v: _encode_any(v, nested)


def _decoder(tp: Any) -> _Decoder:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        dec = _decoder(inner)
        return lambda v: None if v is None else dec(v)
    if origin is tuple:
        dec = _decoder(typing.get_args(tp)[0])
        return lambda v: tuple(dec(x) for x in v)
    if origin in (Mapping, dict):
        return lambda v: {str(k): str(x) for k, x in v.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        cls: type[Any] = tp
        return lambda v: from_dict(cls, v)
    if isinstance(tp, type) and issubclass(tp, StrEnum):
        enum_cls: type[StrEnum] = tp
        return lambda v: enum_cls(v)
    if tp is float:
        return lambda v: float(v)
    if tp is int:
        return lambda v: int(v)
    if tp in (str, bool):
        return _identity
    raise TypeError(f"no JSON codec for {tp!r}")


def _no_decoder(tp: Any) -> _Decoder:
    def refuse(_v: Any) -> Any:
        raise TypeError(f"no JSON codec for {tp!r}")

    return refuse


def _is_record(tp: Any) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_is_record(a) for a in typing.get_args(tp) if a is not type(None))
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _plan(cls: type) -> tuple[_Field, ...]:
    plan = _plans.get(cls)
    if plan is None:
        try:
            hints = typing.get_type_hints(cls)
        except (NameError, TypeError):
            hints = {}  # a result type naming what it does not import: encoded by value
        rows = []
        for f in dataclasses.fields(cls):
            tp = hints.get(f.name, Any)
            try:
                decode = _decoder(tp)
            except (TypeError, ValueError):
                decode = _no_decoder(tp)
            if f.default is not dataclasses.MISSING:
                default: Any = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = dataclasses.MISSING
            rows.append(
                _Field(
                    f.name,
                    _encoder(tp, to_dict),
                    _encoder(tp, full_dict),
                    decode,
                    default,
                    _is_record(tp),
                )
            )
        plan = _plans[cls] = tuple(rows)
    return plan


def _compile(cls: type, compact: bool) -> Callable[[Any], dict[str, Any]]:
    """An encoder for `cls` written out field by field from its plan, once per class:
    no loop over the plan and no call for a plain value, per record (the commit path
    encodes three records per placed VM and the API's reply one more)."""
    env: dict[str, Any] = {}
    lines = ["def encode(obj):", "    out = {}"]
    for i, f in enumerate(_plan(cls)):
        enc = f.compact if compact else f.full
        env[f"e{i}"], env[f"d{i}"] = enc, f.default
        value = "v" if enc is _identity else f"e{i}(v)"
        lines.append(f"    v = obj.{f.name}")
        if not compact:
            # A message reader sees an unset scalar or list as its zero value: only what
            # differs from it is set (a third less for the message constructor).
            test = "v is not None" if f.record else "v"
            lines += [f"    if {test}:", f"        out[{f.name!r}] = {value}"]
        elif f.default is dataclasses.MISSING:
            lines.append(f"    out[{f.name!r}] = {value}")
        else:
            lines += [f"    if not (v == d{i}):", f"        out[{f.name!r}] = {value}"]
    lines.append("    return out")
    exec("\n".join(lines), env)  # code built here from the fields' names alone
    encode: Callable[[Any], dict[str, Any]] = env["encode"]
    return encode


_compact: dict[type, Callable[[Any], dict[str, Any]]] = {}
_full: dict[type, Callable[[Any], dict[str, Any]]] = {}


def to_dict(obj: Any) -> dict[str, Any]:
    """The record as its proto message's JSON mapping, fields at their default omitted."""
    encode = _compact.get(type(obj))
    if encode is None:
        encode = _compact[type(obj)] = _compile(type(obj), compact=True)
    return encode(obj)


def full_dict(obj: Any) -> dict[str, Any]:
    """The record for its proto message: every field whose value is not proto3's zero
    (0, false, "", empty) and every nested record. Unlike etcd's compact JSON (read back
    by `from_dict`, which restores the records' defaults), a message reader gets proto3
    zeros for what is left out, and a record's default is not always zero (a VM's size)."""
    encode = _full.get(type(obj))
    if encode is None:
        encode = _full[type(obj)] = _compile(type(obj), compact=False)
    return encode(obj)


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build a record from JSON; a missing field takes its default, an unknown one is an error.
    The class's generated decoder first (decoders.py); what it declines, `plan_from_dict`."""
    strict = _strict.get(cls, _UNSEEN)
    if strict is _UNSEEN:
        strict = _strict[cls] = decoders.strict_decoder(cls)
    if strict is not None:
        try:
            return strict(data)  # type: ignore[no-any-return]
        except Exception:
            pass
    return plan_from_dict(cls, data)


_UNSEEN: Any = object()
_strict: dict[type, Any] = {}


def plan_from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """`from_dict` by the class's plan, field by field: the reference decoder, and the one
    that names what is wrong in malformed input."""
    if not isinstance(data, Mapping):
        raise InvalidInput(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    kwargs: dict[str, Any] = {}
    plan = _plan(cls)
    known = {f.name for f in plan}
    unknown = set(data) - known
    if unknown:
        named = quote(", ".join(sorted(map(str, unknown))))
        raise InvalidInput(f"{cls.__name__}: unknown field(s) {named}")
    for f in plan:
        if f.name in data:
            try:
                kwargs[f.name] = f.decode(data[f.name])
            except (ValueError, TypeError, AttributeError) as e:
                raise InvalidInput(f"{cls.__name__}.{f.name}: {clip(str(e))}") from None
        elif f.default is dataclasses.MISSING:
            raise InvalidInput(f"{cls.__name__}: field {f.name!r} is required")
    return cls(**kwargs)


def dumps(obj: Any) -> bytes:
    """The bytes stored in etcd: compact JSON (UTF-8), keys sorted so equal records are
    equal bytes. orjson: a tenth of the standard library's time to encode a VM (0.36 vs
    4.0 µs), a fifth to decode (0.8 vs 4.2 µs): the commit path writes three records per
    placed VM, and a cold start reads 300,000 at 100,000 VMs."""
    try:
        return orjson.dumps(to_dict(obj), option=orjson.OPT_SORT_KEYS)
    except TypeError as e:  # an int past 64 bits, a value JSON has no type for
        raise InvalidInput(f"{type(obj).__name__}: cannot encode: {clip(str(e))}") from None


def loads(cls: type[T], raw: bytes | str) -> T:
    try:
        data = orjson.loads(raw)
    except ValueError as e:
        raise InvalidInput(f"{cls.__name__}: not JSON: {clip(str(e))}") from None
    return from_dict(cls, data)


def decoder(cls: type[T]) -> Callable[[bytes | str], T]:
    """`loads` for one class, its generated decoder bound once (a listing decodes 100,000s
    of records of a few classes)."""
    strict = decoders.strict_decoder(cls)
    if strict is None:
        return lambda raw: loads(cls, raw)
    parse = orjson.loads

    def decode(raw: bytes | str) -> T:
        try:
            return strict(parse(raw))  # type: ignore[no-any-return]
        except Exception:
            return loads(cls, raw)

    return decode


def dumps_assignment(a: Assignment, vm_json: bytes) -> bytes:
    """`dumps(a)` built around `vm_json` (= `dumps(a.vm)`), which the planner has already
    encoded for the spec it writes in the same transaction. Same bytes, half the work."""
    return b'{"epoch":%d,"host":%s,"vm":%s}' % (a.epoch, orjson.dumps(a.host), vm_json)


def loads_assignment(raw: bytes, vm: VM | None = None, vm_json: bytes = b"") -> Assignment:
    """`loads(Assignment, raw)`, reusing `vm` when `raw` carries exactly `vm_json`
    (its spec, seen in the same watch batch): only the epoch and host are decoded."""
    tail = b',"vm":' + vm_json + b"}"
    if vm is not None and vm_json and raw.endswith(tail):
        try:
            head = orjson.loads(raw[: len(raw) - len(tail)] + b"}")
        except ValueError:
            head = None
        if (
            isinstance(head, dict)
            and head.keys() == {"epoch", "host"}
            and isinstance(head["host"], str)
            and type(head["epoch"]) is int
        ):
            return Assignment(vm=vm, host=head["host"], epoch=head["epoch"])
    return loads(Assignment, raw)
