"""The generated decoders (proto/decoders.py) give what the general decoder gives: the same
record, with the same types in every field, or the same error, on random records and on
random damage to them (missing, unknown and mistyped fields, values that are not JSON
objects)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import orjson
import pytest
from hvplace.proto import codec, decoders, records, selectors
from hvplace.proto.errors import InvalidInput
from hypothesis import given, settings
from hypothesis import strategies as st

RECORD_CLASSES = sorted(
    (
        cls
        for module in (records, selectors)
        for cls in vars(module).values()
        if isinstance(cls, type)
        and dataclasses.is_dataclass(cls)
        and cls.__module__ == module.__name__
    ),
    key=lambda cls: cls.__name__,
)
HOT = (records.VM, records.VMStatus, records.Assignment, records.HostInfo)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from(["ready", "pending", "running", "off", "live", "In", "1", "1.5"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)


def _shape(value: Any, any_mapping: bool = False) -> Any:
    """A value with every type spelled out (1 == 1.0 == True, but not for a record);
    `any_mapping`: a Mapping of any class as a dict (what hypothesis builds)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return (type(value), tuple(_shape(getattr(value, f.name), any_mapping) for f in fields))
    if isinstance(value, dict) or (any_mapping and isinstance(value, Mapping)):
        items = tuple((_shape(k, any_mapping), _shape(v, any_mapping)) for k, v in value.items())
        return (dict if any_mapping else type(value), items)
    if isinstance(value, tuple | list):
        return (type(value), tuple(_shape(v, any_mapping) for v in value))
    if isinstance(value, float) and math.isnan(value):
        return (float, "nan")
    return (type(value), value)


def _outcome(decode: Any, cls: type, data: Any) -> Any:
    try:
        return ("record", _shape(decode(cls, data)))
    except InvalidInput as e:
        return ("error", e.message)


def _nested_dicts(data: dict[str, Any]) -> list[dict[str, Any]]:
    """`data` and every JSON object inside it (where damage may go)."""
    found = [data]
    for value in data.values():
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, dict):
                found.extend(_nested_dicts(item))
    return found


@st.composite
def damaged(draw: st.DrawFn, cls: type) -> Any:
    """A random record's JSON mapping (as etcd or the API holds it), perhaps damaged."""
    record = draw(st.from_type(cls))
    data: Any = json.loads(json.dumps(codec.to_dict(record)))  # integers of any size
    how = draw(st.sampled_from(("none", "drop", "add", "retype", "replace")))
    if how == "replace":
        return draw(json_values)
    target = draw(st.sampled_from(_nested_dicts(data)))
    if how == "drop" and target:
        del target[draw(st.sampled_from(sorted(target)))]
    elif how == "add":
        target[draw(st.text(max_size=6))] = draw(json_values)
    elif how == "retype" and target:
        target[draw(st.sampled_from(sorted(target)))] = draw(json_values)
    return data


@pytest.mark.parametrize("cls", RECORD_CLASSES, ids=lambda cls: cls.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_generated_decoder_agrees_with_the_general_one(cls: type, data: st.DataObject) -> None:
    value = data.draw(damaged(cls))
    assert _outcome(codec.from_dict, cls, value) == _outcome(codec.plan_from_dict, cls, value)


@pytest.mark.parametrize("cls", HOT, ids=lambda cls: cls.__name__)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_the_hot_records_take_the_fast_path(cls: type, data: st.DataObject) -> None:
    """A sound record's JSON is decoded by the generated decoder itself, not the fallback
    (which would hide a generated decoder that declines everything)."""
    strict = decoders.strict_decoder(cls)
    assert strict is not None
    record = data.draw(st.from_type(cls))
    mapping = json.loads(json.dumps(codec.to_dict(record)))
    decoded = strict(mapping)
    assert _shape(decoded) == _shape(codec.plan_from_dict(cls, mapping))
    assert _shape(decoded, any_mapping=True) == _shape(record, any_mapping=True)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40) | json_values.map(orjson.dumps))
def test_loads_of_malformed_bytes_is_the_general_error(raw: bytes) -> None:
    for cls in HOT:
        try:
            got: Any = ("record", _shape(codec.loads(cls, raw)))
        except InvalidInput as e:
            got = ("error", e.message)
        try:
            want: Any = ("record", _shape(codec.plan_from_dict(cls, orjson.loads(raw))))
        except orjson.JSONDecodeError:
            assert got[0] == "error" and "not JSON" in got[1]
            continue
        except InvalidInput as e:
            want = ("error", e.message)
        assert got == want


def test_errors_name_the_field_as_before() -> None:
    """The messages users see come from the general decoder, unchanged."""
    with pytest.raises(InvalidInput, match=r": VM: unknown field\(s\) 'colour'$"):
        codec.from_dict(records.VM, {"scope": "a", "name": "b", "colour": "red"})
    with pytest.raises(InvalidInput, match=r": Resources\.vcpus: invalid literal"):
        codec.from_dict(records.VM, {"scope": "a", "name": "b", "resources": {"vcpus": "x"}})
    with pytest.raises(InvalidInput, match=r": VMStatus: field 'name' is required$"):
        codec.from_dict(records.VMStatus, {"scope": "a"})
    with pytest.raises(InvalidInput, match=r": HostInfo: expected an object, got list$"):
        codec.from_dict(records.HostInfo, [])
