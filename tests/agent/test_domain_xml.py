"""Domain XML from a VM record: what validation accepts, libvirt defines; what libvirt would
refuse (NUL, control characters), render refuses with `incorrect` first."""

from __future__ import annotations

from collections.abc import Iterator

import libvirt
import pytest
from hvplace.agent import domain_xml
from hvplace.proto import validation
from hvplace.proto.errors import InvalidInput
from hvplace.proto.records import VM, Assignment, Image, Resources


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    c = libvirt.open("test:///default")
    try:
        yield c
    finally:
        c.close()


def define(conn: libvirt.virConnect, vm: VM) -> str:
    """Render the VM's domain, define it on the test driver, return the XML libvirt keeps."""
    xml = domain_xml.render(
        Assignment(vm=vm, host="hv1", epoch=1), domain_type="test", serial_log="/tmp/x.log"
    )
    dom = conn.defineXML(xml)
    try:
        return str(dom.XMLDesc())
    finally:
        dom.undefine()


def vm(**kw: object) -> VM:
    base: dict[str, object] = {
        "scope": "acme",
        "name": "v",
        "uid": "u1",
        "resources": Resources(vcpus=1, memory_mib=64),
        "image": Image(kernel="/boot/vmlinuz"),
    }
    base.update(kw)
    return VM(**base)  # type: ignore[arg-type]


EDGY_BUT_VALID = [
    vm(description="tabs\tand\nnewlines, <tags> & \"quotes\" 'too'"),
    vm(description="ünïcödé ✓ 日本語 \U0001f680 \ud7ff \ue000 \ufffd"),
    vm(description="x" * validation.MAX_DESCRIPTION),
    vm(image=Image(kernel="/boot/vmlinuz", cmdline="console=ttyS0 a=<b> & c='d' \"e\" ~" * 20)),
    vm(image=Image(kernel="/a/.hidden/k+1@x=y~z", initrd="/a/b_c-d.img")),
    vm(image=Image(disk="/var/lib/hvplace/base.qcow2")),
    vm(name="_x.y-z" + "a" * 57, scope="S.c_o-p"),
]


@pytest.mark.parametrize("spec", EDGY_BUT_VALID)
def test_what_validation_accepts_libvirt_defines(conn: libvirt.virConnect, spec: VM) -> None:
    validation.validate_vm(spec)
    kept = define(conn, spec)
    if spec.description:
        assert domain_xml.ET.fromstring(kept).findtext("description") == spec.description


@pytest.mark.parametrize(
    "spec",
    [
        vm(description="a\x00b"),
        vm(description="a\x01b"),
        vm(description="a\x1bb"),
        vm(description="a\ufffeb"),
        vm(image=Image(kernel="/boot/vmlinuz", cmdline="a\x00b")),
        vm(image=Image(kernel="/boot/vmlinuz", cmdline="a\x0cb")),
        vm(image=Image(kernel="/boot/vm\x00linuz")),
    ],
)
def test_render_refuses_what_libvirt_would(spec: VM) -> None:
    """The agent's second line: a record that skipped the API's validation (written to
    etcd by hand) is refused as `incorrect` before libvirt sees it."""
    with pytest.raises(InvalidInput):
        domain_xml.render(
            Assignment(vm=spec, host="hv1", epoch=1), domain_type="test", serial_log="/tmp/x"
        )
