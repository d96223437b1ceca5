"""What both daemons' settings loaders share: reading the TOML file, and turning a TOML
value or an environment/flag string into a setting's declared type.

Each daemon keeps its own dataclass, precedence rules and messages (agent/config.py,
coordinator/config.py); the error texts name the file or variable and the key. The etcd
settings both carry share `EtcdSettings`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hvplace.proto.errors import InvalidInput
from hvplace.runtime.etcd import EtcdAuth, EtcdTLS, parse_endpoints

_TRUTH = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def read_toml(file: Path, what: str) -> dict[str, Any]:
    """The parsed file; InvalidInput naming `what` and the file when it is unreadable."""
    try:
        with open(file, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise InvalidInput(f"cannot read {what} {file}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidInput(f"{what} {file} is not valid TOML: {e}") from None


def coerce(name: str, kind: str, value: Any) -> Any:
    """`value` as the type named by `kind` (a dataclass field's annotation string).

    Raises TypeError (its text says what was expected) or ValueError; the caller words
    the message. `etcd_endpoints` is a list of [http(s)://]host:port (a comma-separated
    string from the environment); `image_dirs` a list of directories (comma-separated
    likewise); `labels` a table of key = value (or "k=v,k2=v2")."""
    if name == "etcd_endpoints":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple) or not value:
            raise TypeError("a non-empty list of host:port")
        # Kept as written (scheme included): hvplace.runtime.etcd parses and validates them.
        return tuple(str(v).strip() for v in value)
    if name == "image_dirs":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise TypeError("a list of directories")
        return tuple(Path(str(v)) for v in value)
    if name == "labels":
        if isinstance(value, str):
            pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
            value = {k.strip(): v.strip() for k, v in pairs}
        if not isinstance(value, Mapping):
            raise TypeError("a table of key = value")
        return {str(k): str(v) for k, v in value.items()}
    if "Path" in kind:
        return Path(value) if value not in (None, "") else None
    if kind.startswith("float"):
        if isinstance(value, bool):
            raise TypeError("a number")
        if kind != "float" and value in (None, ""):
            return None  # float | None
        return float(value)
    if kind == "int":
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError("an integer")
        return int(value)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUTH:
            return _TRUTH[value.strip().lower()]
        raise TypeError("true or false")
    if kind == "str":
        if not isinstance(value, str):
            raise TypeError("a string")
        return value
    raise AssertionError(f"no coercion for {name}: {kind}")


class EtcdSettings:
    """How a daemon reaches etcd, as both daemons' settings dataclasses declare it (the
    fields are theirs, so each keeps its order and defaults): the TLS files and the user
    those settings name, and their check."""

    __slots__ = ()

    etcd_endpoints: tuple[str, ...]
    etcd_ca: Path | None
    etcd_cert: Path | None
    etcd_key: Path | None
    etcd_user: str
    etcd_password_file: Path | None

    @property
    def etcd_tls(self) -> EtcdTLS:
        return EtcdTLS(ca=self.etcd_ca, cert=self.etcd_cert, key=self.etcd_key)

    @property
    def etcd_auth(self) -> EtcdAuth:
        return EtcdAuth(user=self.etcd_user, password_file=self.etcd_password_file)

    def check_etcd(self) -> None:
        """The endpoints parse, TLS files go with https:// endpoints, the user has a password."""
        self.etcd_tls.check(parse_endpoints(self.etcd_endpoints))
        self.etcd_auth.check()
