"""Validation of every name, label, path and text before it becomes an etcd key, a record
or libvirt XML; each check raises InvalidInput quoting at most QUOTE_MAX characters."""

from __future__ import annotations

import re

from hvplace.proto.errors import InvalidInput

MAX_NAME = 63
MAX_LABEL_NAME = 63
MAX_LABEL_PREFIX = 253
MAX_LABEL_VALUE = 63
MAX_PATH = 1024
MAX_CMDLINE = 1024
"""Linux reads at most 2048 bytes of command line on x86; the agent appends the name."""
MAX_NUMBER_DIGITS = 18
"""Gt/Lt bounds fit a signed 64-bit integer."""
QUOTE_MAX = 100
"""Characters of an input an error message quotes: the reason must fit gRPC's metadata."""

_NAME_CHARS = re.compile(r"[A-Za-z0-9._-]+")
# Every valid name, in one match (the common case on hot paths); the checks below only
# run to say what is wrong with an invalid one.
_VALID_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,62}")
# Label keys may carry a DNS-style prefix ("topology.hvplace.io/zone"), as in Kubernetes.
_LABEL_PREFIX = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([A-Za-z0-9._ -]{0,61}[A-Za-z0-9])?)?")
# Absolute paths of plain segments: no '.', '..' or empty segment, nothing a shell, QEMU
# option parser or XML would read specially.
_PATH = re.compile(r"(/(?!\.\.?(?:/|$))[A-Za-z0-9._+@=~-]+)+")
# Trees no image may come from: devices (a host disk as an overlay's backing file would
# hand it to the guest), kernel interfaces, runtime state and configuration.
DENIED_PATH_ROOTS = ("/dev", "/proc", "/sys", "/run", "/var/run", "/etc")
_DENIED_UNDER = tuple(f"{root}/" for root in DENIED_PATH_ROOTS)
# The same plain segments, relative: a catalogue image's file inside a host's image dirs.
_SEGMENT = r"(?!\.\.?(?:/|$))[A-Za-z0-9._+@=~-]+"
_RELATIVE_PATH = re.compile(rf"{_SEGMENT}(/{_SEGMENT})*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NUMBER = re.compile(r"-?[0-9]{1,18}")
# XML 1.0 refuses C0 controls but tab, LF and CR, and U+FFFE/U+FFFF (libvirt: "PCDATA
# invalid Char value"); C1 controls and surrogates are refused too.
_TEXT_BAD = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")
_CMDLINE = re.compile(r"[\x20-\x7e]*")


def quote(value: object, limit: int = QUOTE_MAX) -> str:
    """`repr(value)` cut to about `limit` characters: messages never echo unbounded input."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit + 2 else f"{text[:limit]}..."


def clip(text: str, limit: int = 2 * QUOTE_MAX) -> str:
    """`text` (a message that may hold input) cut to `limit` characters."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


KNOWN_NAMES_MAX = 32_768
"""Names recently found valid, kept to skip the pattern: every etcd key the commit path
builds checks its scope, VM and host names again (three keys per VM placed)."""
_KNOWN_NAMES: set[str] = set()


def check_name(value: str, what: str) -> str:
    """Return `value` if it is safe as an etcd key segment and a libvirt name, else raise.

    `what` names the field in the message, e.g. "VM name".
    """
    if type(value) is str:
        if value in _KNOWN_NAMES:
            return value
        if _VALID_NAME.fullmatch(value) and ".." not in value:
            if len(_KNOWN_NAMES) >= KNOWN_NAMES_MAX:
                _KNOWN_NAMES.clear()
            _KNOWN_NAMES.add(value)
            return value
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {type(value).__name__}")
    if value == "":
        raise InvalidInput(f"{what} is empty")
    q = quote(value)
    if len(value) > MAX_NAME:
        raise InvalidInput(f"{what} {q} is {len(value)} characters; at most {MAX_NAME}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidInput(f"{what} {q} contains a control character")
    if "/" in value:
        raise InvalidInput(f"{what} {q} contains '/'")
    if ".." in value:
        raise InvalidInput(f"{what} {q} contains '..'")
    if not _NAME_CHARS.fullmatch(value):
        bad = sorted({c for c in value if not _NAME_CHARS.fullmatch(c)})
        raise InvalidInput(
            f"{what} {q} contains {quote(''.join(bad))}; use letters, digits, '.', '_' and '-'"
        )
    raise InvalidInput(f"{what} {q} must start with a letter, digit or '_'")


def check_label_key(key: str, what: str = "label") -> str:
    """A Kubernetes-style label key: `[prefix/]name`, name ≤ 63 (letters, digits, '.',
    '_', '-', alphanumeric at both ends), prefix a lower-case DNS name ≤ 253."""
    if isinstance(key, str) and len(key) <= MAX_LABEL_PREFIX + 1 + MAX_LABEL_NAME:
        prefix, slash, name = key.rpartition("/")
        if _LABEL_NAME.fullmatch(name) and (not slash or _LABEL_PREFIX.fullmatch(prefix)):
            return key
    raise InvalidInput(
        f"{what} key {quote(key)} is not valid: letters, digits, '.', '_', '-', starting and"
        f" ending with a letter or digit, at most {MAX_LABEL_NAME} characters, with an optional"
        f" lower-case DNS 'prefix/' of at most {MAX_LABEL_PREFIX}"
    )


def check_label_value(value: str, what: str = "label") -> str:
    if isinstance(value, str) and len(value) <= MAX_LABEL_VALUE and _LABEL_VALUE.fullmatch(value):
        return value
    raise InvalidInput(
        f"{what} value {quote(value)} is not valid: at most {MAX_LABEL_VALUE} characters,"
        " letters, digits, '.', '_', '-', ' ', starting and ending with a letter or digit"
    )


def check_label(key: str, value: str, what: str = "label") -> None:
    check_label_key(key, what)
    check_label_value(value, f"{what} {quote(key, 40)}")


def check_selector_value(value: str, what: str) -> str:
    """A value an In / NotIn expression compares with: a label value, or a name (the
    `host` key compares host names)."""
    if (
        isinstance(value, str)
        and (_LABEL_VALUE.fullmatch(value) or _VALID_NAME.fullmatch(value))
        and len(value) <= MAX_LABEL_VALUE
    ):
        return value
    raise InvalidInput(
        f"{what}: value {quote(value)} is not valid: at most {MAX_LABEL_VALUE} characters,"
        " letters, digits, '.', '_', '-', ' ', starting and ending with a letter or digit"
    )


def check_int(value: int, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{what} must be an integer, got {quote(value)}")
    if not low <= value <= high:
        raise InvalidInput(f"{what} is {value}; it must be between {low} and {high}")
    return value


def check_number(value: str, what: str) -> int:
    """A decimal integer of at most MAX_NUMBER_DIGITS digits (Gt/Lt bounds)."""
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        return int(value)
    raise InvalidInput(
        f"{what} needs an integer of at most {MAX_NUMBER_DIGITS} digits, got {quote(value)}"
    )


def check_text(value: str, what: str, limit: int) -> str:
    """Free text (a description): at most `limit` characters, no control characters but
    tab and newline, nothing XML 1.0 cannot carry."""
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise InvalidInput(f"{what} {quote(value)} is over {limit} characters")
    bad = _TEXT_BAD.search(value)
    if bad is not None or "\r" in value:
        char = bad.group() if bad is not None else "\r"
        raise InvalidInput(
            f"{what} {quote(value)} contains the control character {char!r} at"
            f" {value.index(char)}; only tab and newline are allowed"
        )
    return value


def check_cmdline(value: str, what: str) -> str:
    """A kernel command line: printable ASCII (space to '~'), at most MAX_CMDLINE."""
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > MAX_CMDLINE:
        raise InvalidInput(f"{what} {quote(value)} is over {MAX_CMDLINE} characters")
    if not _CMDLINE.fullmatch(value):
        char = next(c for c in value if not _CMDLINE.fullmatch(c))
        raise InvalidInput(
            f"{what} {quote(value)} contains {char!r} at {value.index(char)}; only printable"
            " ASCII (space to '~') is allowed"
        )
    return value


def is_under(path: str, root: str) -> bool:
    """`path` is `root` or inside it (both plain absolute paths)."""
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/")


def check_path(value: str, what: str) -> str:
    """An absolute file path of plain segments (letters, digits, '.', '_', '-', '+', '@',
    '=', '~'; no '.', '..' or empty segment), at most MAX_PATH characters."""
    if isinstance(value, str) and len(value) <= MAX_PATH and _PATH.fullmatch(value):
        if value.startswith(_DENIED_UNDER) or value in DENIED_PATH_ROOTS:
            root = next(r for r in DENIED_PATH_ROOTS if is_under(value, r))
            raise InvalidInput(f"{what} {quote(value)} is under {root}, where no image may be")
        return value
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {type(value).__name__}")
    q = quote(value)
    if len(value) > MAX_PATH:
        raise InvalidInput(f"{what} {q} is {len(value)} characters; at most {MAX_PATH}")
    if not value.startswith("/"):
        raise InvalidInput(f"{what} {q} must be absolute, starting with '/'")
    if any(seg in (".", "..") for seg in value.split("/")[1:]):
        raise InvalidInput(f"{what} {q} contains a '.' or '..' segment")
    raise InvalidInput(
        f"{what} {q} is not a plain absolute path: segments of letters, digits, '.', '_',"
        " '-', '+', '@', '=', '~', no empty segment or trailing '/'"
    )


def check_relative_path(value: str, what: str) -> str:
    """A relative file path of plain segments (as `check_path`, without the leading '/'):
    it names a file inside a host's image directories and cannot climb out of them."""
    if isinstance(value, str) and len(value) <= MAX_PATH and _RELATIVE_PATH.fullmatch(value):
        return value
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {type(value).__name__}")
    q = quote(value)
    if len(value) > MAX_PATH:
        raise InvalidInput(f"{what} {q} is {len(value)} characters; at most {MAX_PATH}")
    if value.startswith("/"):
        raise InvalidInput(f"{what} {q} must be relative to the hosts' image directories")
    if any(seg in (".", "..") for seg in value.split("/")):
        raise InvalidInput(f"{what} {q} contains a '.' or '..' segment")
    raise InvalidInput(
        f"{what} {q} is not a plain relative path: segments of letters, digits, '.', '_',"
        " '-', '+', '@', '=', '~', no empty segment or trailing '/'"
    )


def check_sha256(value: str, what: str) -> str:
    """A SHA-256 digest: 64 lower-case hex digits."""
    if isinstance(value, str) and _SHA256.fullmatch(value):
        return value
    raise InvalidInput(f"{what} {quote(value)} is not a sha256: 64 lower-case hex digits")
