"""The coordinator's settings: TOML file, then HVPLACE_* environment, then flags -> one frozen
dataclass, with the cluster timing budget checked for safety before anything starts."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvplace.proto.errors import InvalidInput
from hvplace.proto.names import check_name
from hvplace.proto.records import AdmissionPolicy, ClusterConfig, Image
from hvplace.proto.timing import FENCE_GRACE_S
from hvplace.proto.validation import validate_cluster_config
from hvplace.runtime import settings

DEFAULT_CONFIG = Path("/etc/hvplace/coordinator.toml")
ENV_PREFIX = "HVPLACE_"
_CLUSTER = ClusterConfig()


@dataclass(frozen=True, slots=True)
class CoordinatorConfig(settings.EtcdSettings):
    node_name: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    etcd_endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    # For https:// endpoints: etcd's CA (default: the system's), a client cert and key.
    etcd_ca: Path | None = None
    etcd_cert: Path | None = None
    etcd_key: Path | None = None
    # etcd's user authentication (`hvplace etcd add-agent` / `init-auth` create the users).
    etcd_user: str = ""
    etcd_password_file: Path | None = None
    etcd_timeout_s: float = 5.0
    listen: str = "127.0.0.1:7400"
    """The gRPC API's host:port; '' serves no API (a placement-only coordinator)."""
    metrics_listen: str = "127.0.0.1:9465"
    """Prometheus host:port; '' disables the endpoint."""
    session_ttl_s: float = 5.0
    """TTL of the leader election lease: a standby takes over within about this long."""
    resync_s: float = 30.0
    """Full resync period of the controller (catches anything a watch missed)."""
    batch_size: int = 500
    # The cluster record written at first start (when /hvplace/v1/config is absent).
    lease_ttl_s: float = _CLUSTER.lease_ttl_s
    fence_after_s: float = _CLUSTER.fence_after_s
    failover_delay_s: float = _CLUSTER.failover_delay_s
    watchdog_timeout_s: float = _CLUSTER.watchdog_timeout_s
    admission_policy: str = _CLUSTER.admission_policy.value
    admission_failures: int = _CLUSTER.admission_failures
    admission_topology: str = _CLUSTER.admission_topology
    tls_cert: str = ""
    """PEM certificate (chain) the API serves TLS with; '' serves plain text."""
    tls_key: str = ""
    tls_client_ca: str = ""
    """CA whose client certificates authenticate callers (mTLS): the certificate's CN is
    looked up among the auth file's principals (`cert_cn`)."""
    auth_file: str = ""
    """TOML list of [[principal]] (name, role, token_sha256 and/or cert_cn, expires):
    re-read when it changes, so removing an entry revokes it at once."""
    anonymous_role: str = ""
    """The role of callers without credentials: '' refuses them (the default); a closed
    lab may say admin. Health and reflection never need credentials."""
    default_image_kernel: str = ""
    """With default_image_initrd/_cmdline/_disk: the image a VM created without one boots
    from (ClusterConfig.default_image); unset, such a VM is refused."""
    default_image_initrd: str = ""
    default_image_cmdline: str = ""
    default_image_disk: str = ""
    image_roots: str = ""
    """Comma-separated directories every image path must lie under (ClusterConfig)."""
    max_start_attempts: int = _CLUSTER.max_start_attempts
    rebalance_interval_s: float = 30.0
    """The leader's rebalancer repairs degraded VMs at most `rebalance_max_moves` moves
    per this many seconds (0: it does not run; `hvplace rebalance --apply` still does)."""
    rebalance_max_moves: int = 2
    log_level: str = "INFO"
    leader_self_checks: bool = True
    """Step down as soon as the own clock or etcd says the session lease is gone. Off,
    only etcd's fence (every leader write compares the leader key's create revision)
    demotes a stale leader: a diagnostic setting, used by the test that proves the fence
    alone keeps a frozen-and-woken leader from writing."""

    def cluster(self) -> ClusterConfig:
        image = Image(
            kernel=self.default_image_kernel,
            initrd=self.default_image_initrd,
            cmdline=self.default_image_cmdline,
            disk=self.default_image_disk,
        )
        return ClusterConfig(
            lease_ttl_s=self.lease_ttl_s,
            fence_after_s=self.fence_after_s,
            failover_delay_s=self.failover_delay_s,
            watchdog_timeout_s=self.watchdog_timeout_s,
            admission_policy=AdmissionPolicy(self.admission_policy),
            admission_failures=self.admission_failures,
            admission_topology=self.admission_topology,
            default_image=image if image != Image() else None,
            image_roots=tuple(r.strip() for r in self.image_roots.split(",") if r.strip()),
            max_start_attempts=self.max_start_attempts,
        )


_FIELDS = {f.name: f for f in dataclasses.fields(CoordinatorConfig)}
_CLUSTER_TABLE = "cluster"
_CLUSTER_KEYS = {
    "lease_ttl_s",
    "fence_after_s",
    "failover_delay_s",
    "watchdog_timeout_s",
    "admission_policy",
    "admission_failures",
    "admission_topology",
    "default_image_kernel",
    "default_image_initrd",
    "default_image_cmdline",
    "default_image_disk",
    "image_roots",
    "max_start_attempts",
}


def _coerce(name: str, value: Any, where: str) -> Any:
    """A TOML value or an environment/flag string, as the field's type."""
    kind = str(_FIELDS[name].type)
    try:
        return settings.coerce(name, kind, value)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"{where} {name}: expected {e or kind}, got {value!r}") from None


def load(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> CoordinatorConfig:
    """File < environment < flags. A missing default file is fine; a named one must exist.
    Cluster settings may sit at the top level or in a [cluster] table."""
    values: dict[str, Any] = {}
    file = path or DEFAULT_CONFIG
    if path is not None or file.exists():
        raw = settings.read_toml(file, "coordinator config")
        table = raw.pop(_CLUSTER_TABLE, {})
        if not isinstance(table, dict):
            raise InvalidInput(f"coordinator config {file}: [cluster] must be a table")
        bad = set(table) - _CLUSTER_KEYS
        if bad:
            raise InvalidInput(
                f"coordinator config {file}: unknown [cluster] key(s) {', '.join(sorted(bad))}"
            )
        raw.update(table)
        unknown = set(raw) - set(_FIELDS)
        if unknown:
            raise InvalidInput(
                f"coordinator config {file}: unknown key(s) {', '.join(sorted(unknown))}"
            )
        where = f"coordinator config {file}:"
        values.update({k: _coerce(k, v, where) for k, v in raw.items()})
    for key, value in (os.environ if env is None else env).items():
        # Only HVPLACE_<setting> is read: the CLI, the lab and the agent (HVPLACE_AGENT_*)
        # have HVPLACE_ variables of their own in the same environment.
        name = key[len(ENV_PREFIX) :].lower()
        if key.startswith(ENV_PREFIX) and name in _FIELDS:
            values[name] = _coerce(name, value, f"environment {key}:")
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value, "flag")
    return validate(CoordinatorConfig(**values))


def validate(cfg: CoordinatorConfig) -> CoordinatorConfig:
    check_name(cfg.node_name, "node name")
    cfg.check_etcd()
    for name in ("etcd_timeout_s", "resync_s"):
        if getattr(cfg, name) <= 0:
            raise InvalidInput(f"{name} must be positive, got {getattr(cfg, name)}")
    if not 1 <= cfg.session_ttl_s <= 600:
        raise InvalidInput(f"session_ttl_s {cfg.session_ttl_s} must be between 1 and 600 seconds")
    if not 1 <= cfg.batch_size <= 1000:
        raise InvalidInput(f"batch_size {cfg.batch_size} must be between 1 and 1000")
    if cfg.rebalance_interval_s < 0 or not 0 <= cfg.rebalance_max_moves <= 1000:
        raise InvalidInput(
            f"rebalance_interval_s {cfg.rebalance_interval_s} must be >= 0 and"
            f" rebalance_max_moves {cfg.rebalance_max_moves} between 0 and 1000"
        )
    try:
        AdmissionPolicy(cfg.admission_policy)
    except ValueError:
        raise InvalidInput(
            f"admission_policy {cfg.admission_policy!r} must be one of"
            f" {', '.join(p.value for p in AdmissionPolicy)}"
        ) from None
    for name in ("listen", "metrics_listen"):
        address = getattr(cfg, name)
        if address and not address.rpartition(":")[2].isdigit():
            raise InvalidInput(f"{name} {address!r} must be host:port (or '' to disable)")
    validate_cluster_config(cfg.cluster())
    _validate_auth(cfg)
    return cfg


def _validate_auth(cfg: CoordinatorConfig) -> None:
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise InvalidInput("tls_cert and tls_key go together: give both or neither")
    if cfg.tls_client_ca and not cfg.tls_cert:
        raise InvalidInput("tls_client_ca (mTLS) needs the API to serve TLS: set tls_cert/tls_key")
    if cfg.anonymous_role not in ("", "admin", "operator", "viewer"):
        raise InvalidInput(
            f"anonymous_role {cfg.anonymous_role[:40]!r} must be admin, operator, viewer or ''"
        )
    for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_file"):
        path = getattr(cfg, name)
        if path and not Path(path).is_file():
            raise InvalidInput(f"{name} {path[:100]!r} is not a readable file")
    if cfg.listen and not cfg.auth_file and not cfg.anonymous_role:
        raise InvalidInput(
            "the API has no way to authenticate callers: set auth_file (bearer tokens or"
            " client-certificate names, see `hvplace auth add-token`), or anonymous_role"
            " for a closed lab"
        )


def budget_text(cluster: ClusterConfig) -> str:
    """The fencing time budget, as printed at start (SPEC §5.6)."""
    return (
        f"timing budget: lease_ttl {cluster.lease_ttl_s}s, agents fence after"
        f" {cluster.fence_after_s}s (+{FENCE_GRACE_S}s to destroy domains) and stop petting"
        f" their host's watchdog then (a dead agent's host resets within"
        f" {cluster.fence_after_s + cluster.watchdog_s}s: watchdog_timeout"
        f" {cluster.watchdog_s}s{'' if cluster.watchdog_timeout_s else ' (derived)'}),"
        " the coordinator re-places"
        f" {cluster.failover_delay_s}s after a lease expires: a lost host's VMs are"
        f" reassigned within {cluster.lease_ttl_s + cluster.failover_delay_s}s;"
        f" admission {cluster.admission_policy.value} for {cluster.admission_failures}"
        f" {cluster.admission_topology} failure(s)"
    )
