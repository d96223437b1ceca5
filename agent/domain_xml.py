"""Libvirt domain XML for a VM spec, and the hvplace metadata tag that marks a domain as ours.

Pure: strings in, strings out. The hypervisor adapter decides paths and the domain type.
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from hvplace.proto.records import Assignment
from hvplace.proto.validation import validate_vm

NAMESPACE = "https://hvplace.dev/xmlns/domain/1"
PREFIX = "hvplace"
DOMAIN_TYPES = ("kvm", "qemu", "test")


@dataclass(frozen=True, slots=True)
class DomainTag:
    """What the metadata element says: whose VM this domain is, at which epoch."""

    scope: str
    name: str
    uid: str
    epoch: int

    @property
    def key(self) -> str:
        return f"{self.scope}/{self.name}"


def domain_name(scope: str, name: str) -> str:
    """`hv-<scope>.<name>-<hash8>`: readable, and unique even when a '.' in scope or name
    makes two readable parts look alike (the hash is over the unambiguous `scope/name`).
    Both parts are validated names, so the result is a safe libvirt name and file name."""
    digest = hashlib.sha256(f"{scope}/{name}".encode()).hexdigest()[:8]
    return f"hv-{scope}.{name}-{digest}"


def tag_element(tag: DomainTag) -> str:
    """The metadata element as libvirt stores it (setMetadata wants it without a prefix)."""
    el = ET.Element(
        f"{{{NAMESPACE}}}vm",
        {"scope": tag.scope, "name": tag.name, "uid": tag.uid, "epoch": str(tag.epoch)},
    )
    return ET.tostring(el, encoding="unicode")


def bare_tag_element(tag: DomainTag) -> str:
    """The tag without its namespace, as `virDomainSetMetadata` takes it (the namespace
    and prefix are passed apart; libvirt adds them)."""
    el = ET.Element(
        "vm", {"scope": tag.scope, "name": tag.name, "uid": tag.uid, "epoch": str(tag.epoch)}
    )
    return ET.tostring(el, encoding="unicode")


def parse_tag(element_xml: str) -> DomainTag | None:
    """The tag from `virDomainGetMetadata(ELEMENT)` output; None if it is not ours or is mangled."""
    try:
        el = ET.fromstring(element_xml)
        scope, name = el.attrib["scope"], el.attrib["name"]
        epoch = int(el.attrib.get("epoch", "0"))
    except (ET.ParseError, KeyError, ValueError):
        return None
    if el.tag.rsplit("}", 1)[-1] != "vm" or not scope or not name:
        return None
    return DomainTag(scope=scope, name=name, uid=el.attrib.get("uid", ""), epoch=epoch)


def render(
    assignment: Assignment,
    *,
    domain_type: str,
    serial_log: str,
    disk_path: str = "",
) -> str:
    """The domain XML: direct kernel boot when the image has a kernel, else boot from the
    qcow2 overlay at `disk_path`; serial console to a file; no network, no graphics.
    Raises InvalidInput for a VM that validation refuses."""
    if domain_type not in DOMAIN_TYPES:
        raise ValueError(f"domain type {domain_type!r} is not one of {DOMAIN_TYPES}")
    # The API's own validator, again: a record that reached etcd another way must not
    # become XML libvirt refuses (NUL, control characters) or a path it should not open.
    vm = validate_vm(assignment.vm)
    ET.register_namespace(PREFIX, NAMESPACE)
    dom = ET.Element("domain", {"type": domain_type})
    ET.SubElement(dom, "name").text = domain_name(vm.scope, vm.name)
    if vm.description:
        ET.SubElement(dom, "description").text = vm.description
    meta = ET.SubElement(dom, "metadata")
    meta.append(ET.fromstring(tag_element(DomainTag(vm.scope, vm.name, vm.uid, assignment.epoch))))
    ET.SubElement(dom, "memory", {"unit": "MiB"}).text = str(vm.resources.memory_mib)
    ET.SubElement(dom, "vcpu").text = str(vm.resources.vcpus)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", {"arch": "x86_64"}).text = "hvm"
    image = vm.image
    if image.kernel:
        ET.SubElement(os_el, "kernel").text = image.kernel
        if image.initrd:
            ET.SubElement(os_el, "initrd").text = image.initrd
        # The guest learns its name from the command line (the test guest prints it).
        cmdline = f"{image.cmdline} hvplace.hostname={vm.name}".strip()
        ET.SubElement(os_el, "cmdline").text = cmdline
    else:
        ET.SubElement(os_el, "boot", {"dev": "hd"})
    # A guest that powers off or crashes stays off: the agent sees it and decides.
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    if disk_path:
        disk = ET.SubElement(devices, "disk", {"type": "file", "device": "disk"})
        ET.SubElement(disk, "driver", {"name": "qemu", "type": "qcow2"})
        ET.SubElement(disk, "source", {"file": disk_path})
        ET.SubElement(disk, "target", {"dev": "vda", "bus": "virtio"})
    serial = ET.SubElement(devices, "serial", {"type": "file"})
    ET.SubElement(serial, "source", {"path": serial_log})
    ET.SubElement(serial, "target", {"port": "0"})
    ET.SubElement(devices, "memballoon", {"model": "none"})
    return ET.tostring(dom, encoding="unicode")


def with_console_log(xml: str, serial_log: str) -> str:
    """A domain's XML with its serial console logging to `serial_log`: the destination XML
    of a live migration, since each host keeps its console logs in its own directory."""
    ET.register_namespace(PREFIX, NAMESPACE)
    dom = ET.fromstring(xml)
    for source in dom.findall("./devices/serial/source"):
        if "path" in source.attrib:
            source.set("path", serial_log)
    for source in dom.findall("./devices/console/source"):
        if "path" in source.attrib:
            source.set("path", serial_log)
    return ET.tostring(dom, encoding="unicode")
