"""The settings coercion both daemons share: every kind, and what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
from hvplace.proto.errors import InvalidInput
from hvplace.runtime import settings


@pytest.mark.parametrize(
    ("name", "kind", "value", "expected"),
    [
        ("etcd_endpoints", "tuple[str, ...]", "http://a:1, b:2", ("http://a:1", "b:2")),
        ("etcd_endpoints", "tuple[str, ...]", ["c:3"], ("c:3",)),
        ("labels", "Mapping[str, str]", "rack=r1, zone=z", {"rack": "r1", "zone": "z"}),
        ("labels", "Mapping[str, str]", {"rack": 1}, {"rack": "1"}),
        ("state_dir", "Path", "/x", Path("/x")),
        ("images_dir", "Path | None", "", None),
        ("ttl", "float", "2.5", 2.5),
        ("ttl", "float | None", "", None),
        ("count", "int", 3.0, 3),
        ("flag", "bool", "No", False),
        ("flag", "bool", True, True),
        ("name", "str", "x", "x"),
    ],
)
def test_coerce(name: str, kind: str, value: object, expected: object) -> None:
    assert settings.coerce(name, kind, value) == expected


@pytest.mark.parametrize(
    ("name", "kind", "value"),
    [
        ("etcd_endpoints", "tuple[str, ...]", ""),
        ("labels", "Mapping[str, str]", 5),
        ("ttl", "float", True),
        ("ttl", "float", "soon"),
        ("count", "int", 2.5),
        ("count", "int", False),
        ("flag", "bool", "maybe"),
        ("name", "str", 5),
    ],
)
def test_coerce_refuses(name: str, kind: str, value: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        settings.coerce(name, kind, value)


def test_read_toml_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text("x = [\n")
    with pytest.raises(InvalidInput, match=f"agent config {bad} is not valid TOML"):
        settings.read_toml(bad, "agent config")
    with pytest.raises(InvalidInput, match="cannot read agent config"):
        settings.read_toml(tmp_path / "missing.toml", "agent config")
