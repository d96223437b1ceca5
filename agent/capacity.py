"""The host record an agent registers, computed from what libvirt and the disk report. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hvplace.proto.records import HostInfo, Ratios, Resources
from hvplace.proto.validation import validate_host_info

GIB = 1024**3


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What the hypervisor reports about the machine (libvirt's node info)."""

    cpus: int
    memory_mib: int
    hostname: str = ""


def host_info(
    *,
    name: str,
    facts: NodeFacts,
    images_disk_bytes: int,
    labels: Mapping[str, str],
    ratios: Ratios,
    reserved_memory_mib: int,
    address: str,
    libvirt_uri: str,
    domain_type: str,
    agent_version: str,
    started_at: float,
) -> HostInfo:
    """A validated HostInfo; raises InvalidInput when the config or the facts are unusable."""
    return validate_host_info(
        HostInfo(
            name=name,
            labels=dict(labels),
            capacity=Resources(
                vcpus=facts.cpus,
                memory_mib=facts.memory_mib,
                disk_gib=images_disk_bytes // GIB,
            ),
            ratios=ratios,
            reserved_memory_mib=reserved_memory_mib,
            address=address,
            libvirt_uri=libvirt_uri,
            domain_type=domain_type,
            agent_version=agent_version,
            started_at=started_at,
        )
    )
