"""The agent's settings: TOML file, then HVPLACE_AGENT_* environment, then flags -> one frozen dataclass."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvplace.proto.errors import InvalidInput
from hvplace.proto.names import check_label, check_name
from hvplace.proto.records import ClusterConfig, Ratios
from hvplace.proto.timing import fence_after_for
from hvplace.proto.validation import validate_cluster_config
from hvplace.runtime import settings

DEFAULT_CONFIG = Path("/etc/hvplace/agent.toml")
ENV_PREFIX = "HVPLACE_AGENT_"
DOMAIN_TYPES = ("auto", "kvm", "qemu")
DEFAULT_IMAGE_DIR = Path("/var/lib/hvplace/images")


@dataclass(frozen=True, slots=True)
class AgentConfig(settings.EtcdSettings):
    host: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    etcd_endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    # For https:// endpoints: etcd's CA (default: the system's), a client cert and key.
    etcd_ca: Path | None = None
    etcd_cert: Path | None = None
    etcd_key: Path | None = None
    # etcd's user authentication (`hvplace etcd add-agent` / `init-auth` create the users).
    etcd_user: str = ""
    etcd_password_file: Path | None = None
    libvirt_uri: str = "qemu:///system"
    state_dir: Path = Path("/var/lib/hvplace-agent")
    # Where qcow2 overlays live (its disk is the host's disk capacity); default <state_dir>/images.
    images_dir: Path | None = None
    # Serial console logs, one per domain; default <state_dir>/console.
    console_dir: Path | None = None
    guest_cache_dir: Path = Path("/var/cache/hvplace/guest")
    # Where catalogue images' files are looked up (only there); default
    # DEFAULT_IMAGE_DIR and guest_cache_dir.
    image_dirs: tuple[Path, ...] | None = None
    domain_type: str = "auto"
    kvm_probe_timeout_s: float = 15.0
    labels: Mapping[str, str] = field(default_factory=dict)
    cpu_ratio: float = 1.0
    ram_ratio: float = 1.0
    disk_ratio: float = 1.0
    reserved_memory_mib: int = 0
    address: str = ""
    # The libvirt URI other hosts' libvirtds dial to live-migrate a guest here (peer to
    # peer; e.g. qemu+tls://<address>/system); the guest's memory then comes to
    # tcp://<address>. Empty: this host takes no live migrations.
    migration_uri: str = ""
    # Used only when etcd holds no cluster config record (/hvplace/v1/config).
    lease_ttl: float | None = None
    fence_after: float | None = None
    resync_interval_s: float = 10.0
    stop_timeout_s: float = 10.0
    etcd_timeout_s: float = 2.0
    metrics_listen: str = "127.0.0.1:9464"
    # The host's watchdog (/dev/watchdog: softdog or hardware; the lab's stand-in FIFO).
    # Armed, it resets the host unless the agent pets it, which it does only while its
    # lease is fresh: a dead or hung agent's guests end before they are re-placed.
    watchdog_device: str = ""
    # The device timeout to set; default (and maximum) the cluster's watchdog timeout.
    watchdog_timeout_s: float | None = None
    log_level: str = "INFO"

    @property
    def images(self) -> Path:
        return self.images_dir or self.state_dir / "images"

    @property
    def catalogue_dirs(self) -> tuple[Path, ...]:
        if self.image_dirs is not None:
            return self.image_dirs
        return (DEFAULT_IMAGE_DIR, self.guest_cache_dir)

    @property
    def consoles(self) -> Path:
        return self.console_dir or self.state_dir / "console"

    @property
    def ratios(self) -> Ratios:
        return Ratios(cpu=self.cpu_ratio, ram=self.ram_ratio, disk=self.disk_ratio)


_FIELDS = {f.name: f for f in dataclasses.fields(AgentConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Turn a TOML value or an environment/flag string into the field's type."""
    kind = str(_FIELDS[name].type)
    try:
        return settings.coerce(name, kind, value)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"agent config {name}: expected {e or kind}, got {value!r}") from None


def load(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """File < environment < flags. A missing default file is fine; a named one must exist."""
    values: dict[str, Any] = {}
    file = path or DEFAULT_CONFIG
    if path is not None or file.exists():
        raw = settings.read_toml(file, "agent config")
        unknown = set(raw) - set(_FIELDS)
        if unknown:
            raise InvalidInput(f"agent config {file}: unknown key(s) {', '.join(sorted(unknown))}")
        values.update({k: _coerce(k, v) for k, v in raw.items()})
    for key, value in (os.environ if env is None else env).items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name not in _FIELDS:
                raise InvalidInput(f"environment {key}: no agent setting {name!r}")
            values[name] = _coerce(name, value)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value)
    return validate(AgentConfig(**values))


def validate(cfg: AgentConfig) -> AgentConfig:
    check_name(cfg.host, "host name")
    cfg.check_etcd()
    for k, v in cfg.labels.items():
        check_label(k, v, "host label")
    if cfg.domain_type not in DOMAIN_TYPES:
        raise InvalidInput(f"domain_type {cfg.domain_type!r} must be one of {DOMAIN_TYPES}")
    for name in ("resync_interval_s", "stop_timeout_s", "etcd_timeout_s", "kvm_probe_timeout_s"):
        if getattr(cfg, name) <= 0:
            raise InvalidInput(f"{name} must be positive")
    if cfg.watchdog_timeout_s is not None and not 0 < cfg.watchdog_timeout_s <= 600:
        raise InvalidInput("watchdog_timeout_s must be above 0 and at most 600 seconds")
    for d in cfg.image_dirs or ():
        if not d.is_absolute():
            raise InvalidInput(f"image_dirs: {str(d)!r} is not an absolute path")
    if cfg.reserved_memory_mib < 0:
        raise InvalidInput("reserved_memory_mib must not be negative")
    return cfg


def cluster_config(record: ClusterConfig | None, cfg: AgentConfig) -> ClusterConfig:
    """The timing budget in force: etcd's record if there is one, else the agent's own
    lease_ttl/fence_after/watchdog_timeout_s (fence_after derived from lease_ttl when only
    that is given; the watchdog timeout, when not given, is the budget's largest safe one),
    else the defaults. Raises InvalidInput when the budget is unsafe, or the agent's
    watchdog timeout exceeds it: the agent refuses to run."""
    if record is None:
        base = ClusterConfig()
        ttl = cfg.lease_ttl if cfg.lease_ttl is not None else base.lease_ttl_s
        fence = cfg.fence_after
        if fence is None:
            fence = (
                base.fence_after_s
                if cfg.lease_ttl is None
                else fence_after_for(ttl, base.failover_delay_s)
            )
        record = dataclasses.replace(
            base,
            lease_ttl_s=ttl,
            fence_after_s=fence,
            watchdog_timeout_s=cfg.watchdog_timeout_s or 0.0,
        )
    budget = validate_cluster_config(record)
    if cfg.watchdog_timeout_s is not None and cfg.watchdog_timeout_s > budget.watchdog_s:
        raise InvalidInput(
            f"unsafe timing budget: the agent's watchdog_timeout_s {cfg.watchdog_timeout_s}"
            f" exceeds the cluster's {budget.watchdog_s}: a dead agent's guests could"
            " still run when the coordinator re-places them"
        )
    return budget


def watchdog_timeout(cfg: AgentConfig, budget: ClusterConfig) -> float:
    """The timeout the agent sets on its watchdog device."""
    return cfg.watchdog_timeout_s if cfg.watchdog_timeout_s is not None else budget.watchdog_s
