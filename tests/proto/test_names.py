"""One table per validator in proto/names.py: what each accepts, what it refuses, and that
no message quotes more than about 100 characters of its input."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from hvplace.proto import names
from hvplace.proto.errors import InvalidInput

LONG = "x" * 20_000
Check = Callable[[str], object]

CHECKS: dict[str, Check] = {
    "name": lambda v: names.check_name(v, "VM name"),
    "label_key": lambda v: names.check_label_key(v),
    "label_value": lambda v: names.check_label_value(v),
    "selector_value": lambda v: names.check_selector_value(v, "expr"),
    "number": lambda v: names.check_number(v, "expr"),
    "description": lambda v: names.check_text(v, "description", 1024),
    "cmdline": lambda v: names.check_cmdline(v, "cmdline"),
    "path": lambda v: names.check_path(v, "kernel"),
}

ACCEPTED = [
    ("name", "db-1"),
    ("name", "_x.y"),
    ("name", "a" * 63),
    ("label_key", "app"),
    ("label_key", "hvplace.io/rack"),
    ("label_key", "a" * 253 + "/" + "b" * 63),
    ("label_key", "A.b_c-D"),
    ("label_value", ""),
    ("label_value", "front end"),
    ("label_value", "v" * 63),
    ("selector_value", "east"),
    ("selector_value", "_host-"),  # a host name, for the `host` key
    ("number", "-12"),
    ("number", "9" * 18),
    ("description", ""),
    ("description", "tab\tnewline\n <xml> & ünïcode \U0001f680"),
    ("description", "d" * 1024),
    ("cmdline", 'console=ttyS0 root=/dev/vda quiet a="b c" ~'),
    ("cmdline", "c" * 1024),
    ("path", "/var/cache/hvplace/guest/vmlinuz"),
    ("path", "/a/.hidden/k+1@x=y~z-v_1.2"),
    ("path", "/" + "p" * 1023),
    ("path", "/devices/x"),
    ("path", "/var/lib/etc/x"),
]

REFUSED = [
    # (check, input, words in the message)
    ("name", "", "empty"),
    ("name", "a/b", "'/'"),
    ("name", "a..b", "'..'"),
    ("name", "a\x00", "control character"),
    ("name", "db\n", "control character"),
    ("name", "-x", "must start"),
    ("name", "a b", "contains ' '"),
    ("name", LONG, "20000 characters"),
    ("label_key", "app\n", "not valid"),
    ("label_key", "*Q", "not valid"),
    ("label_key", "", "not valid"),
    ("label_key", "-app", "not valid"),
    ("label_key", "a/b/c", "not valid"),
    ("label_key", "UPPER.io/x", "not valid"),
    ("label_key", "a" * 64, "not valid"),
    ("label_key", "a" * 254 + "/b", "not valid"),
    ("label_key", LONG, "not valid"),
    ("label_value", "db\n", "not valid"),
    ("label_value", "db ", "not valid"),
    ("label_value", "v" * 64, "not valid"),
    ("label_value", "a\x00", "not valid"),
    ("label_value", LONG, "not valid"),
    ("selector_value", "east\n", "not valid"),
    ("selector_value", LONG, "not valid"),
    ("number", "many", "integer"),
    ("number", "9" * 19, "integer"),
    ("number", "1\n", "integer"),
    ("number", LONG, "integer"),
    ("description", "a\x00b", "control character"),
    ("description", "a\x01b", "control character"),
    ("description", "a\rb", "control character"),
    ("description", "a\x7fb", "control character"),
    ("description", "a\x85b", "control character"),
    ("description", "a\ufffeb", "control character"),
    ("description", "d" * 1025, "over 1024"),
    ("description", LONG, "over 1024"),
    ("cmdline", "a\x00b", "printable ASCII"),
    ("cmdline", "a\nb", "printable ASCII"),
    ("cmdline", "é", "printable ASCII"),
    ("cmdline", "c" * 1025, "over 1024"),
    ("path", "", "absolute"),
    ("path", "vmlinuz", "absolute"),
    ("path", "/boot/../etc/shadow", "'..'"),
    ("path", "/boot/./vmlinuz", "'.'"),
    ("path", "/boot/..", "'..'"),
    ("path", "/boot//vmlinuz", "plain absolute path"),
    ("path", "/boot/", "plain absolute path"),
    ("path", "/boot/vm\x00linuz", "plain absolute path"),
    ("path", "/boot/vm linuz", "plain absolute path"),
    ("path", "/boot/vm,linuz", "plain absolute path"),
    ("path", "/" + "p" * 1024, "at most 1024"),
    ("path", "/dev/sda", "under /dev"),
    ("path", "/etc/shadow", "under /etc"),
    ("path", "/proc/self/mem", "under /proc"),
    ("path", "/sys/firmware/x", "under /sys"),
    ("path", "/var/run/libvirt/x", "under /var/run"),
    ("path", "/dev", "under /dev"),
]


@pytest.mark.parametrize(("check", "value"), ACCEPTED)
def test_accepted(check: str, value: str) -> None:
    CHECKS[check](value)


@pytest.mark.parametrize(("check", "value", "words"), REFUSED)
def test_refused_with_a_short_message(check: str, value: str, words: str) -> None:
    with pytest.raises(InvalidInput) as info:
        CHECKS[check](value)
    message = info.value.message
    assert words in message, message
    # The input is quoted at most ~100 characters (repr may double escapes), the rest of
    # the message is fixed text.
    assert len(message) < 500, len(message)


def test_quote_and_clip_bound_any_input() -> None:
    assert names.quote("abc") == "'abc'"
    q = names.quote(LONG)
    assert q.startswith("'xxx") and q.endswith("... (20000 characters)") and len(q) < 140
    assert len(names.quote(["a" * 500])) <= 104
    assert names.clip("short") == "short"
    assert names.clip(LONG).endswith("(20000 characters)") and len(names.clip(LONG)) < 240


def test_check_int_bounds() -> None:
    assert names.check_int(5, "n", 1, 10) == 5
    for bad in (0, 11, True, "5", 2.0):
        with pytest.raises(InvalidInput):
            names.check_int(bad, "n", 1, 10)  # type: ignore[arg-type]


@pytest.mark.parametrize("good", ["vmlinuz", "tiny/initrd.img", "a/b.c/d-1+x@y=z~"])
def test_relative_image_paths(good: str) -> None:
    assert names.check_relative_path(good, "kernel") == good


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ("/boot/vmlinuz", "must be relative"),
        ("../etc/shadow", "'..'"),
        ("a/../../b", "'..'"),
        ("./a", "'.'"),
        ("a//b", "not a plain relative path"),
        ("a/", "not a plain relative path"),
        ("", "not a plain relative path"),
        ("a b", "not a plain relative path"),
    ],
)
def test_bad_relative_image_paths(bad: str, needle: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(needle)):
        names.check_relative_path(bad, "kernel")


def test_sha256() -> None:
    assert names.check_sha256("a" * 64, "d") == "a" * 64
    for bad in ("A" * 64, "a" * 63, "g" * 64, ""):
        with pytest.raises(InvalidInput, match="not a sha256"):
            names.check_sha256(bad, "d")
