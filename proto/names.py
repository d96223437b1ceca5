"""Validation of every name before it becomes an etcd key or a libvirt domain name."""

from __future__ import annotations

import re

from hvplace.proto.errors import InvalidInput

MAX_NAME = 63
_NAME_CHARS = re.compile(r"^[A-Za-z0-9._-]+$")
# Every valid name, in one match (the common case on hot paths); the checks below only
# run to say what is wrong with an invalid one.
_VALID_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,62}")
# Label keys may carry a DNS-style prefix ("topology.hvplace.io/zone"), as in Kubernetes.
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9._ -]{0,61}[A-Za-z0-9])?)?$")


def check_name(value: str, what: str) -> str:
    """Return `value` if it is safe as an etcd key segment and a libvirt name, else raise.

    `what` names the field in the message, e.g. "VM name".
    """
    if type(value) is str and _VALID_NAME.fullmatch(value) and ".." not in value:
        return value
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {type(value).__name__}")
    if value == "":
        raise InvalidInput(f"{what} is empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidInput(f"{what} {value!r} contains a control character")
    if "/" in value:
        raise InvalidInput(f"{what} {value!r} contains '/'")
    if ".." in value:
        raise InvalidInput(f"{what} {value!r} contains '..'")
    if len(value) > MAX_NAME:
        raise InvalidInput(
            f"{what} {value[:20]!r}... is {len(value)} characters; at most {MAX_NAME}"
        )
    if not _NAME_CHARS.match(value):
        bad = sorted({c for c in value if not re.match(r"[A-Za-z0-9._-]", c)})
        raise InvalidInput(
            f"{what} {value!r} contains {''.join(bad)!r}; use letters, digits, '.', '_' and '-'"
        )
    if value[0] in ".-":
        raise InvalidInput(f"{what} {value!r} must start with a letter, digit or '_'")
    return value


def check_label(key: str, value: str, what: str = "label") -> None:
    if not isinstance(key, str) or not _LABEL_KEY.match(key):
        raise InvalidInput(
            f"{what} key {key!r} is not valid: letters, digits, '.', '_', '-', an optional"
            " 'prefix/', at most 63 characters in the name"
        )
    if not isinstance(value, str) or not _LABEL_VALUE.match(value):
        raise InvalidInput(
            f"{what} value {value!r} for key {key!r} is not valid: at most 63 characters,"
            " letters, digits, '.', '_', '-', ' ', starting and ending with a letter or digit"
        )


def check_int(value: int, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{what} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise InvalidInput(f"{what} is {value}; it must be between {low} and {high}")
    return value
