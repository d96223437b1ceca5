"""What-if (SPEC §5.5): fail hosts or a topology domain on a copy of a snapshot, and place a
cluster described in a TOML/JSON file in-process. Pure: nothing is written anywhere."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvplace.coordinator.failure import replace_lost
from hvplace.coordinator.placement import Batch, Plan, place
from hvplace.coordinator.snapshot import Snapshot
from hvplace.proto import codec, validation
from hvplace.proto.errors import InvalidInput, NotFound
from hvplace.proto.names import check_label_key, check_name, check_selector_value
from hvplace.proto.records import (
    VM,
    ClusterConfig,
    Explanation,
    HostInfo,
    HostState,
    HostStatus,
    Rule,
    ScopePolicy,
)


@dataclass(frozen=True, slots=True)
class SimulatedMove:
    vm: str
    from_host: str
    to_host: str


@dataclass(frozen=True, slots=True)
class SimulateResult:
    """The failover plan: who moves where, who stays pending and why, who runs degraded."""

    moves: tuple[SimulatedMove, ...] = ()
    pending: tuple[Explanation, ...] = ()
    degraded: tuple[str, ...] = ()


def failed_hosts(
    snapshot: Snapshot, hosts: Sequence[str], topology_key: str = "", domain: str = ""
) -> list[str]:
    """The hosts a what-if fails: the named ones plus every host in `topology_key=domain`."""
    for name in hosts:
        check_name(name, "host name")
        if name not in snapshot.hosts:
            raise NotFound(f"host {name!r} is not registered")
    chosen = list(dict.fromkeys(hosts))
    if topology_key or domain:
        if not (topology_key and domain):
            raise InvalidInput("a failed domain needs both a topology key and a value (rack=r1)")
        check_label_key(topology_key, "failed domain's topology")
        check_selector_value(domain, f"failed domain {topology_key}")
        members = sorted(
            h.name for h in snapshot.hosts.values() if h.topology(topology_key) == domain
        )
        if not members:
            raise NotFound(f"no host has {topology_key}={domain}")
        chosen.extend(m for m in members if m not in chosen)
    if not chosen:
        raise InvalidInput("name at least one host to fail, or a domain (rack=r1)")
    return chosen


def simulate_failure(snapshot: Snapshot, lost: Iterable[str]) -> SimulateResult:
    """The plan the coordinator would make if `lost` failed now."""
    lost_set = set(lost)
    plan = replace_lost(snapshot, lost_set)
    moves = tuple(
        SimulatedMove(vm=key, from_host=snapshot.placements.get(key, ""), to_host=host)
        for key, host in sorted(plan.assignments.items())
    )
    return SimulateResult(
        moves=moves,
        pending=tuple(plan.pending[k] for k in sorted(plan.pending)),
        degraded=tuple(
            f"{vm} breaks {', '.join(rules)}" for vm, rules in sorted(plan.degraded.items())
        ),
    )


# --------------------------------------------------------------------------- cluster file


@dataclass(frozen=True, slots=True)
class ClusterFile:
    """A described cluster: hosts (with an optional state), VMs to place, rules, policies."""

    hosts: tuple[HostInfo, ...]
    states: Mapping[str, HostStatus] = field(default_factory=dict)
    vms: tuple[VM, ...] = ()
    rules: tuple[Rule, ...] = ()
    policies: tuple[ScopePolicy, ...] = ()
    config: ClusterConfig = field(default_factory=ClusterConfig)


def _records(cls: type[Any], rows: Any, what: str) -> list[Any]:
    if rows is None:
        return []
    if not isinstance(rows, list):
        raise InvalidInput(f"`{what}` must be a list of tables")
    return [codec.from_dict(cls, row) for row in rows]


def load_cluster(path: Path) -> ClusterFile:
    """Read a cluster description (.toml or .json); every record is validated."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise NotFound(f"cannot read {path}: {e.strerror}") from None
    try:
        data = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{path}: {e}") from None
    states: dict[str, HostStatus] = {}
    host_rows = []
    for row in data.get("hosts", []):
        row = dict(row)
        state = row.pop("state", None)
        host_rows.append(row)
        if state is not None:
            try:
                states[row.get("name", "")] = HostStatus(name=row["name"], state=HostState(state))
            except (ValueError, KeyError):
                raise InvalidInput(f"host {row.get('name')!r}: bad state {state!r}") from None
    hosts = [validation.validate_host_info(h) for h in _records(HostInfo, host_rows, "hosts")]
    vms = [validation.validate_vm(v) for v in _records(VM, data.get("vms"), "vms")]
    rules = [validation.validate_rule(r) for r in _records(Rule, data.get("rules"), "rules")]
    policies = [
        validation.validate_policy(p)
        for p in _records(ScopePolicy, data.get("policies"), "policies")
    ]
    config = codec.from_dict(ClusterConfig, data.get("config", {}))
    return ClusterFile(
        hosts=tuple(hosts),
        states=states,
        vms=tuple(vms),
        rules=tuple(rules),
        policies=tuple(policies),
        config=config,
    )


def place_cluster(cluster: ClusterFile) -> tuple[Snapshot, Plan]:
    """Place the file's VMs on its hosts; the snapshot returned includes the placements."""
    empty = Snapshot.from_records(
        revision=0,
        infos=cluster.hosts,
        statuses=cluster.states,
        vms=(),
        assignments=(),
        rules=cluster.rules,
        policies=cluster.policies,
    )
    plan = place(empty, Batch(tuple(cluster.vms)))
    placed = dataclasses.replace(
        empty,
        vms={vm.key: vm for vm in cluster.vms},
        placements=dict(plan.assignments),
    )
    return placed, plan
