"""What the lab's cluster looks like now, read straight from etcd (its JSON gateway).

One range read of /hvplace/v1/ costs a few milliseconds, so the demo, the failover
benchmark and the end-to-end tests can poll it every 50-100 ms without a client library.
Records are decoded with `hvplace.proto.codec`, the same code the daemons use.
"""

from __future__ import annotations

import base64
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvplace.proto import codec, keyspace
from hvplace.proto.keyspace import Kind
from hvplace.proto.records import (
    TOPOLOGY_HOST,
    VM,
    Assignment,
    DomainState,
    DomainStatus,
    HostInfo,
    HostState,
    HostStatus,
    OnFailure,
    Rule,
    RuleKind,
    VMStatus,
)


class ObserveError(RuntimeError):
    pass


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _prefix_end(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode()


@dataclass
class EtcdAccess:
    """How to read the lab's etcd: its URL and, when it runs TLS with auth, the CA and a
    user whose password file logs in (the token is kept until etcd calls it stale)."""

    url: str
    ca: str | None = None
    user: str = ""
    password_file: str | None = None
    _token: str = field(default="", repr=False, compare=False)

    def __str__(self) -> str:
        return self.url

    def _post(self, path: str, body: dict[str, str], timeout: float) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = self._token
        request = urllib.request.Request(
            self.url.rstrip("/") + path, data=json.dumps(body).encode(), headers=headers
        )
        context = ssl.create_default_context(cafile=self.ca) if self.ca else None
        with urllib.request.urlopen(request, timeout=timeout, context=context) as reply:
            data: dict[str, Any] = json.loads(reply.read())
            return data

    def _login(self, timeout: float) -> None:
        assert self.password_file is not None
        secret = Path(self.password_file).read_text().strip()
        self._token = ""
        reply = self._post(
            "/v3/auth/authenticate", {"name": self.user, "password": secret}, timeout
        )
        self._token = str(reply["token"])

    def post(self, path: str, body: dict[str, str], timeout: float) -> dict[str, Any]:
        if self.user and not self._token:
            self._login(timeout)
        try:
            return self._post(path, body, timeout)
        except urllib.error.HTTPError as exc:
            # Simple tokens expire (and a restarted etcd forgets them): log in once more.
            if not self.user or exc.code not in (400, 401, 403):
                raise
            self._login(timeout)
            return self._post(path, body, timeout)


Endpoint = str | EtcdAccess


def read_prefix(
    endpoint: Endpoint, prefix: str, timeout: float = 2.0
) -> tuple[int, dict[str, bytes]]:
    """(revision, {key: value}) of every key under `prefix`, by etcd's gRPC-gateway."""
    access = endpoint if isinstance(endpoint, EtcdAccess) else EtcdAccess(endpoint)
    body = {"key": _b64(prefix), "range_end": _prefix_end(prefix)}
    try:
        data = access.post("/v3/kv/range", body, timeout)
    except (OSError, KeyError, ValueError) as exc:
        raise ObserveError(f"etcd at {access.url}: {exc}") from exc
    revision = int(data.get("header", {}).get("revision", 0))
    kvs = {
        base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", ""))
        for kv in data.get("kvs", [])
    }
    return revision, kvs


@dataclass
class ClusterState:
    """One consistent read of the cluster: every record the daemons wrote, decoded."""

    at: float
    revision: int
    registered: dict[str, HostInfo] = field(default_factory=dict)
    vms: dict[str, VM] = field(default_factory=dict)
    host_status: dict[str, HostStatus] = field(default_factory=dict)
    vm_status: dict[str, VMStatus] = field(default_factory=dict)
    assignments: dict[str, list[Assignment]] = field(default_factory=dict)
    domains: dict[str, list[DomainStatus]] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)

    def host_of(self, vm: str) -> str | None:
        """The host a VM is assigned to (None when unassigned)."""
        found = self.assignments.get(vm, [])
        return found[0].host if len(found) == 1 else None

    def lost(self, host: str) -> bool:
        status = self.host_status.get(host)
        return status is not None and status.state is HostState.LOST

    def host_labels(self) -> dict[str, dict[str, str]]:
        return {name: dict(info.labels) for name, info in self.registered.items()}

    def running_on(self, vm: str) -> list[str]:
        """Hosts whose agent reports this VM's domain running."""
        return sorted(d.host for d in self.domains.get(vm, []) if d.state is DomainState.RUNNING)


def read_cluster(endpoint: Endpoint) -> ClusterState:
    revision, kvs = read_prefix(endpoint, keyspace.ROOT)
    state = ClusterState(at=time.time(), revision=revision)
    for key, value in kvs.items():
        kind = keyspace.classify(key).kind
        if kind is Kind.HOSTS:
            info = codec.loads(HostInfo, value)
            state.registered[info.name] = info
        elif kind is Kind.VMS:
            vm = codec.loads(VM, value)
            state.vms[vm.key] = vm
        elif kind is Kind.HOST_STATUS:
            status = codec.loads(HostStatus, value)
            state.host_status[status.name] = status
        elif kind is Kind.VM_STATUS:
            vm_status = codec.loads(VMStatus, value)
            state.vm_status[f"{vm_status.scope}/{vm_status.name}"] = vm_status
        elif kind is Kind.ASSIGNMENTS:
            a = codec.loads(Assignment, value)
            state.assignments.setdefault(a.vm.key, []).append(a)
        elif kind is Kind.DOMAINS:
            d = codec.loads(DomainStatus, value)
            state.domains.setdefault(f"{d.scope}/{d.name}", []).append(d)
        elif kind is Kind.RULES:
            state.rules.append(codec.loads(Rule, value))
    return state


Condition = Callable[[ClusterState], bool]


def wait_for(
    endpoint: Endpoint,
    condition: Condition,
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> ClusterState:
    """Poll until `condition` holds; returns the first state where it did."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        try:
            state = read_cluster(endpoint)
            if condition(state):
                return state
        except ObserveError as exc:
            last_error = f" (last error: {exc})"
        if time.monotonic() > deadline:
            raise ObserveError(f"timed out after {timeout:.0f}s waiting for {what}{last_error}")
        time.sleep(interval)


# -- rules over what runs -----------------------------------------------------------


def anti_affinity_violations(
    rules: Iterable[Rule],
    where: Mapping[str, Iterable[str]],
    host_labels: Mapping[str, Mapping[str, str]],
    vms: Mapping[str, VM],
) -> list[str]:
    """Required anti-affinity rules (on_failure block) broken by `where`: VM -> the hosts
    it runs on. A VM running on two hosts counts in both domains. An independent check
    for tests and benchmarks: it shares nothing with the placement engine but the records.
    """
    problems: list[str] = []
    for rule in rules:
        if (
            rule.kind is not RuleKind.ANTI_AFFINITY
            or not rule.required
            or rule.on_failure is not OnFailure.BLOCK
        ):
            continue
        per_domain: dict[str, list[str]] = {}
        for key, hosts in where.items():
            vm = vms.get(key)
            if vm is None or not rule.selects(vm):
                continue
            for host in hosts:
                if rule.topology_key == TOPOLOGY_HOST:
                    domain = host
                else:
                    domain = host_labels.get(host, {}).get(rule.topology_key, "")
                if domain:
                    per_domain.setdefault(domain, []).append(key)
        for domain, members in sorted(per_domain.items()):
            if len(members) > rule.max_per_domain:
                problems.append(
                    f"rule {rule.key}: {len(members)} members in {rule.topology_key} {domain}"
                    f" (max {rule.max_per_domain}): {', '.join(sorted(members))}"
                )
    return problems
