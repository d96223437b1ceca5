"""The lab's settings and its state file: every PID, netns, link, dir and domain it made.

The state file is rewritten after every step of `up`, so `down` can undo a partial `up`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvplace.lab.processes import ProcessRecord

DEFAULT_STATE_DIR = "/var/lib/hvplace-lab"
DEFAULT_PREFIX = "hvlab"
DEFAULT_SUBNET = "10.213.0.0/24"
STATE_FILE = "lab.json"

# Interface names are at most 15 bytes; the longest we derive is "<prefix>-v<nn>".
_PREFIX = re.compile(r"^[a-z][a-z0-9]{0,8}$")


@dataclass(frozen=True)
class LabSettings:
    """Where the lab keeps its files and how it names what it creates (tests use their own)."""

    state_dir: Path
    prefix: str = DEFAULT_PREFIX
    subnet: ipaddress.IPv4Network = field(default=ipaddress.IPv4Network(DEFAULT_SUBNET))

    def __post_init__(self) -> None:
        if not _PREFIX.match(self.prefix):
            raise ValueError(
                f"lab prefix {self.prefix!r}: 1-9 lowercase letters/digits, letter first"
            )
        if self.subnet.num_addresses < 64:
            raise ValueError(f"lab subnet {self.subnet} is too small (need at least a /26)")

    @classmethod
    def from_env(
        cls, state_dir: str | None = None, prefix: str | None = None, subnet: str | None = None
    ) -> LabSettings:
        return cls(
            state_dir=Path(state_dir or os.environ.get("HVPLACE_LAB_DIR") or DEFAULT_STATE_DIR),
            prefix=prefix or os.environ.get("HVPLACE_LAB_PREFIX") or DEFAULT_PREFIX,
            subnet=ipaddress.IPv4Network(
                subnet or os.environ.get("HVPLACE_LAB_SUBNET") or DEFAULT_SUBNET
            ),
        )

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    @property
    def bridge(self) -> str:
        return f"{self.prefix}-br0"

    @property
    def bridge_address(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(f"{self.subnet[1]}/{self.subnet.prefixlen}")

    def host_name(self, index: int) -> str:
        return f"h{index}"

    def netns(self, index: int) -> str:
        return f"{self.prefix}-h{index}"

    def veth_root(self, index: int) -> str:
        return f"{self.prefix}-v{index}"

    def veth_peer(self, index: int) -> str:
        return f"{self.prefix}-p{index}"

    def host_address(self, index: int) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(f"{self.subnet[10 + index]}/{self.subnet.prefixlen}")

    def host_dir(self, name: str) -> Path:
        return self.state_dir / "hosts" / name


def _proc(raw: object) -> ProcessRecord | None:
    return ProcessRecord.from_json(raw) if isinstance(raw, Mapping) else None


def _procj(record: ProcessRecord | None) -> dict[str, object] | None:
    return None if record is None else record.to_json()


@dataclass
class HostRecord:
    """One lab host. `real`: netns + mount ns + its own libvirtd; `test`: an agent on test:///."""

    name: str
    index: int
    mode: str
    dir: str
    libvirt_uri: str
    address: str | None = None
    netns: str | None = None
    veth: str | None = None
    # The netns inode: how `down` finds processes in it (QEMU) even after `ip netns del`.
    netns_inode: int | None = None
    supervisor: ProcessRecord | None = None
    virtlogd: ProcessRecord | None = None
    libvirtd: ProcessRecord | None = None
    agent: ProcessRecord | None = None
    agent_config: str | None = None
    # host:port of the agent's /metrics (set when the agent is first started).
    metrics_address: str | None = None
    partitioned: bool = False
    # The stand-in for the host's watchdog (lab/watchdog.py); real hosts only.
    watchdog: ProcessRecord | None = None

    @property
    def run_dir(self) -> Path:
        """The host's private /run, seen from the root namespace."""
        return Path(self.dir) / "run"

    @property
    def root_side_uri(self) -> str:
        """A URI that reaches this host's libvirtd from the root namespace (its socket file)."""
        if self.mode != "real":
            return self.libvirt_uri
        return f"qemu:///system?socket={self.run_dir}/libvirt/libvirt-sock"

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "index": self.index,
            "mode": self.mode,
            "dir": self.dir,
            "libvirt_uri": self.libvirt_uri,
            "address": self.address,
            "netns": self.netns,
            "veth": self.veth,
            "netns_inode": self.netns_inode,
            "supervisor": _procj(self.supervisor),
            "virtlogd": _procj(self.virtlogd),
            "libvirtd": _procj(self.libvirtd),
            "agent": _procj(self.agent),
            "agent_config": self.agent_config,
            "metrics_address": self.metrics_address,
            "partitioned": self.partitioned,
            "watchdog": _procj(self.watchdog),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> HostRecord:
        return cls(
            name=str(raw["name"]),
            index=int(raw["index"]),
            mode=str(raw["mode"]),
            dir=str(raw["dir"]),
            libvirt_uri=str(raw["libvirt_uri"]),
            address=raw.get("address"),
            netns=raw.get("netns"),
            veth=raw.get("veth"),
            netns_inode=raw.get("netns_inode"),
            supervisor=_proc(raw.get("supervisor")),
            virtlogd=_proc(raw.get("virtlogd")),
            libvirtd=_proc(raw.get("libvirtd")),
            agent=_proc(raw.get("agent")),
            agent_config=raw.get("agent_config"),
            metrics_address=raw.get("metrics_address"),
            partitioned=bool(raw.get("partitioned", False)),
            watchdog=_proc(raw.get("watchdog")),
        )

    def processes(self) -> list[ProcessRecord]:
        """The recorded processes: the watchdog first (it must not fire on a half-removed
        host), then the agent (it must not see its libvirtd go first)."""
        return [
            p
            for p in (self.watchdog, self.agent, self.libvirtd, self.virtlogd, self.supervisor)
            if p is not None
        ]

    @property
    def watchdog_fifo(self) -> Path:
        """The watchdog stand-in's FIFO: the agent's `watchdog_device`."""
        return Path(self.dir) / "watchdog"


@dataclass
class CoordinatorRecord:
    name: str
    config: str
    api_address: str
    metrics_address: str
    process: ProcessRecord | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "config": self.config,
            "api_address": self.api_address,
            "metrics_address": self.metrics_address,
            "process": _procj(self.process),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> CoordinatorRecord:
        return cls(
            name=str(raw["name"]),
            config=str(raw["config"]),
            api_address=str(raw["api_address"]),
            metrics_address=str(raw["metrics_address"]),
            process=_proc(raw.get("process")),
        )


@dataclass
class EtcdMemberRecord:
    """One etcd member of the lab: its own process, data dir and URLs. `client_urls`:
    the bridge address first in a real lab (agents in a netns use it), loopback last."""

    name: str
    dir: str
    client_urls: list[str]
    peer_url: str
    process: ProcessRecord | None = None

    @property
    def loopback_url(self) -> str:
        return self.client_urls[-1]

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "dir": self.dir,
            "client_urls": list(self.client_urls),
            "peer_url": self.peer_url,
            "process": _procj(self.process),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> EtcdMemberRecord:
        return cls(
            name=str(raw["name"]),
            dir=str(raw["dir"]),
            client_urls=[str(u) for u in raw["client_urls"]],
            peer_url=str(raw["peer_url"]),
            process=_proc(raw.get("process")),
        )


@dataclass
class LabState:
    """What one `lab up` made. Saved as JSON in the state dir; `down` undoes all of it."""

    prefix: str
    subnet: str
    mode: str
    lease_ttl: float | None = None
    bridge: str | None = None
    # Directories created outside the state dir (bind-mount targets such as
    # /var/lib/libvirt on a machine without them); `down` removes them when empty.
    created_dirs: list[str] = field(default_factory=list)
    # Every etcd member, in the order the daemons are given them.
    etcd_members: list[EtcdMemberRecord] = field(default_factory=list)
    coordinators: list[CoordinatorRecord] = field(default_factory=list)
    hosts: dict[str, HostRecord] = field(default_factory=dict)
    # The tiny guest (kernel, initrd, cmdline) the real hosts boot; empty on test hosts.
    guest_image: dict[str, str] = field(default_factory=dict)
    # The CA, certificates, passwords and tokens (lab/secure.py), once etcd is planned.
    secrets_dir: str = ""

    def to_json(self) -> dict[str, object]:
        return {
            "prefix": self.prefix,
            "subnet": self.subnet,
            "mode": self.mode,
            "lease_ttl": self.lease_ttl,
            "bridge": self.bridge,
            "created_dirs": list(self.created_dirs),
            "etcd_members": [m.to_json() for m in self.etcd_members],
            "coordinators": [c.to_json() for c in self.coordinators],
            "hosts": {name: h.to_json() for name, h in self.hosts.items()},
            "guest_image": dict(self.guest_image),
            "secrets_dir": self.secrets_dir,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> LabState:
        ttl = raw.get("lease_ttl")
        return cls(
            prefix=str(raw["prefix"]),
            subnet=str(raw["subnet"]),
            mode=str(raw["mode"]),
            lease_ttl=None if ttl is None else float(ttl),
            bridge=raw.get("bridge"),
            created_dirs=[str(d) for d in raw.get("created_dirs", [])],
            etcd_members=_etcd_members(raw),
            coordinators=[CoordinatorRecord.from_json(c) for c in raw.get("coordinators", [])],
            hosts={str(name): HostRecord.from_json(h) for name, h in raw.get("hosts", {}).items()},
            guest_image={str(k): str(v) for k, v in raw.get("guest_image", {}).items()},
            secrets_dir=str(raw.get("secrets_dir", "")),
        )

    @property
    def etcd(self) -> ProcessRecord | None:
        """The first member's process (a one-member lab's etcd)."""
        return self.etcd_members[0].process if self.etcd_members else None

    @property
    def etcd_endpoints(self) -> list[str]:
        """The first member's client URLs (bridge first in a real lab, loopback last)."""
        return list(self.etcd_members[0].client_urls) if self.etcd_members else []

    def etcd_urls(self, *, bridge: bool) -> list[str]:
        """One client URL per member: on the bridge (agents in a netns) or on loopback."""
        return [m.client_urls[0] if bridge else m.loopback_url for m in self.etcd_members]

    def etcd_processes(self) -> list[ProcessRecord]:
        return [m.process for m in self.etcd_members if m.process is not None]

    def save(self, settings: LabSettings) -> None:
        """Write atomically: a crash mid-write must not lose the record of what runs."""
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = settings.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, settings.state_file)


def _etcd_members(raw: Mapping[str, Any]) -> list[EtcdMemberRecord]:
    """The members; a state file written before labs had several reads as one member,
    so `down` still finds its etcd."""
    if "etcd_members" in raw:
        return [EtcdMemberRecord.from_json(m) for m in raw["etcd_members"]]
    urls = [str(u) for u in raw.get("etcd_endpoints", [])]
    if not urls:
        return []
    return [
        EtcdMemberRecord(
            name="etcd",
            dir="",  # load_state knows the state dir: <state dir>/etcd
            client_urls=urls,
            peer_url=str(raw.get("etcd_peer", "")),
            process=_proc(raw.get("etcd")),
        )
    ]


def load_state(settings: LabSettings) -> LabState | None:
    try:
        raw = json.loads(settings.state_file.read_text())
    except FileNotFoundError:
        return None
    state = LabState.from_json(raw)
    for member in state.etcd_members:
        member.dir = member.dir or str(settings.state_dir / "etcd")
    return state
