"""A pure view of the cluster at one etcd revision: what the placement engine reads, and the
counters (`Usage`) a cache keeps per watch event so that a decision costs what it touches."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import immutables
from hvplace.proto.records import (
    VM,
    Assignment,
    HAPriority,
    Host,
    HostInfo,
    HostState,
    HostStatus,
    Rule,
    ScopePolicy,
)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything placement needs, keyed as in etcd.

    `placements` maps a VM key (scope/name) to the host it is assigned to now;
    `reservations` maps a VM key to a second host on which it holds capacity and
    counts for every rule while a migration or evacuation is in flight (SPEC §5.4).
    `degraded` maps a VM key to the rules it knowingly breaks (on_failure=degrade).
    """

    revision: int = 0
    hosts: Mapping[str, Host] = field(default_factory=dict)
    vms: Mapping[str, VM] = field(default_factory=dict)
    placements: Mapping[str, str] = field(default_factory=dict)
    rules: Mapping[str, Rule] = field(default_factory=dict)
    policies: Mapping[str, ScopePolicy] = field(default_factory=dict)
    reservations: Mapping[str, str] = field(default_factory=dict)
    degraded: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    derived: Derived | None = None
    """Counters kept for `vms` and `placements` (see `Usage`); the engine uses them while
    they are still those of this snapshot and recomputes from the records otherwise."""

    def usage(self) -> tuple[Usage, Mapping[str, str]] | None:
        """The counters and the placements laid over them (VM key -> host), or None when
        the counters describe other records than this snapshot's (the engine recounts)."""
        d = self.derived
        if d is None or d.view_placements is not self.placements or d.view_vms is not self.vms:
            return None
        if d.usage.placements is not d.placements or d.usage.vms is not d.vms:
            return None  # the cache has moved on since this snapshot was taken
        return d.usage, d.overlay

    def overlaid(self, specs: Mapping[str, VM], placements: Mapping[str, str]) -> Snapshot:
        """This snapshot with `specs` and `placements` laid over it (plans in flight, a
        request's own VMs): O(what is laid over), and the counters stay usable."""
        vms: Mapping[str, VM]
        where: Mapping[str, str]
        if isinstance(self.vms, immutables.Map):
            vms = self.vms.update(specs) if specs else self.vms
        else:
            vms = {**self.vms, **specs}
        if isinstance(self.placements, immutables.Map):
            where = self.placements.update(placements) if placements else self.placements
        else:
            where = {**self.placements, **placements}
        derived = None
        if self.usage() is not None and self.derived is not None:
            d = self.derived
            derived = Derived(
                usage=d.usage,
                placements=d.placements,
                vms=d.vms,
                overlay={
                    **d.overlay,
                    **placements,
                    **{k: "" for k in specs if k not in placements},
                },
                view_placements=where,
                view_vms=vms,
            )
        return Snapshot(
            revision=self.revision,
            hosts=self.hosts,
            vms=vms,
            placements=where,
            rules=self.rules,
            policies=self.policies,
            reservations=self.reservations,
            degraded=self.degraded,
            derived=derived,
        )

    def scope_vms(self, scopes: Iterable[str]) -> dict[str, list[VM]]:
        """The VMs of each scope: from the counters' per-scope index when usable (plus what
        is laid over), else one pass over every VM."""
        wanted = set(scopes)
        out: dict[str, list[VM]] = {s: [] for s in wanted}
        kept = self.usage()
        if kept is None:
            for vm in self.vms.values():
                if vm.scope in wanted:
                    out[vm.scope].append(vm)
            return out
        usage, overlay = kept
        changed = [k for k in overlay if k.split("/", 1)[0] in wanted]
        for scope in wanted:
            base = usage.by_scope.get(scope)
            if not changed:
                out[scope] = list(base.values()) if base else []
                continue
            merged = dict(base) if base else {}
            for key in changed:
                if key.split("/", 1)[0] != scope:
                    continue
                shown = self.vms.get(key)
                if shown is None:
                    merged.pop(key, None)
                else:
                    merged[key] = shown
            out[scope] = list(merged.values())
        return out

    @classmethod
    def from_records(
        cls,
        revision: int,
        infos: Iterable[HostInfo],
        statuses: Mapping[str, HostStatus],
        vms: Iterable[VM] | Mapping[str, VM],
        assignments: Iterable[Assignment],
        rules: Iterable[Rule],
        policies: Iterable[ScopePolicy],
        alive: Iterable[str] | None = None,
        placements: Mapping[str, str] | None = None,
        derived: Derived | None = None,
        reservations: Mapping[str, str] | None = None,
    ) -> Snapshot:
        """Build from the records as read from etcd.

        `alive`, when given, names the hosts whose registration (lease) exists now; a
        registered host missing from it is treated as lost even before the coordinator
        has written its `lost` status. `vms` keyed by VM key and `placements` (VM key ->
        host, instead of `assignments`) are copied as they are: a cache that keeps them
        so spares a pass over every VM per revision.
        """
        alive_set = None if alive is None else set(alive)
        hosts: dict[str, Host] = {}
        for info in infos:
            host = Host.from_records(info, statuses.get(info.name))
            if alive_set is not None and info.name not in alive_set:
                host = Host(
                    name=host.name,
                    labels=host.labels,
                    capacity=host.capacity,
                    ratios=host.ratios,
                    reserved_memory_mib=host.reserved_memory_mib,
                    state=HostState.LOST,
                )
            hosts[info.name] = host
        return cls(
            revision=revision,
            hosts=hosts,
            vms=dict(vms) if isinstance(vms, Mapping) else {vm.key: vm for vm in vms},
            placements=(
                dict(placements)
                if placements is not None
                else {a.vm.key: a.host for a in assignments}
            ),
            rules={r.key: r for r in rules},
            policies={p.scope: p for p in policies},
            derived=derived,
            reservations=dict(reservations or {}),
        )


@dataclass(frozen=True, slots=True)
class Derived:
    """`usage` as it stood for the (immutable) `vms` and `placements` maps, the placements
    laid over them since (VM key -> host; "" for a spec laid over without a placement),
    and the maps the snapshot shows (`view_*`: identity says nobody replaced them)."""

    usage: Usage
    placements: Mapping[str, str]
    vms: Mapping[str, VM]
    overlay: Mapping[str, str]
    view_placements: Mapping[str, str]
    view_vms: Mapping[str, VM]

    @classmethod
    def of(cls, usage: Usage) -> Derived:
        return cls(usage, usage.placements, usage.vms, {}, usage.placements, usage.vms)


def restart_key(vm: VM) -> tuple[int, int, int, int]:
    """How failover admission counts a VM: its size and whether it is pinned by a
    required node affinity (a pinned VM needs a real search)."""
    r = vm.resources
    return (r.vcpus, r.memory_mib, r.disk_gib, 1 if vm.node_affinity.required else 0)


class Usage:
    """What placement and admission need, moved by each put or delete of a VM spec or a
    placement instead of recounted per decision: immutable maps of the specs and
    placements (a snapshot of them costs O(1)), capacity used per host, VM keys per
    host and per scope, and per host the sizes of the VMs a failure would restart.

    A placement counts once its VM has a spec (as the engine counts it). `check()`
    recounts everything from the maps: tests compare it after every event."""

    __slots__ = (
        "_kept",
        "_tables",
        "by_host",
        "by_scope",
        "placements",
        "restart",
        "used",
        "vms",
    )

    def __init__(self) -> None:
        self.vms: immutables.Map[str, VM] = immutables.Map()
        self.placements: immutables.Map[str, str] = immutables.Map()
        self.used: dict[str, list[int]] = {}
        self.by_host: dict[str, set[str]] = {}
        self.by_scope: dict[str, dict[str, VM]] = {}
        # host -> {(vcpus, memory, disk, pinned): VMs of that size (and with a required
        # node affinity or not) whose HA priority is not off: what its failure restarts}
        self.restart: dict[str, dict[tuple[int, int, int, int], int]] = {}
        self._tables: tuple[object, Any] | None = None
        # What the engine derives from these counters and keeps between decisions, by
        # name: (the host table it is for, the state, hosts changed since it was synced).
        self._kept: dict[str, tuple[object, Any, set[str]]] = {}

    # ------------------------------------------------------------------ events

    def set_vm(self, key: str, vm: VM | None) -> None:
        old = self.vms.get(key)
        if old is vm:
            return
        host = self.placements.get(key)
        if host is not None and old is not None:
            self._count(host, key, old, -1)
        if vm is None:
            if isinstance(self.vms, dict):
                self.vms.pop(key, None)
            elif old is not None:
                self.vms = self.vms.delete(key)
            scope = self.by_scope.get(old.scope) if old is not None else None
            if scope is not None:
                scope.pop(key, None)
                if not scope:
                    del self.by_scope[old.scope]  # type: ignore[union-attr]
            return
        if isinstance(self.vms, dict):
            self.vms[key] = vm
        else:
            self.vms = self.vms.set(key, vm)
        if old is not None and old.scope != vm.scope:  # pragma: no cover - keys embed scopes
            self.by_scope.get(old.scope, {}).pop(key, None)
        self.by_scope.setdefault(vm.scope, {})[key] = vm
        if host is not None:
            self._count(host, key, vm, 1)

    def set_placement(self, key: str, host: str | None) -> None:
        old = self.placements.get(key)
        if old == host:
            return
        vm = self.vms.get(key)
        if old is not None and vm is not None:
            self._count(old, key, vm, -1)
        bulk = isinstance(self.placements, dict)
        if host is None:
            if bulk:
                del self.placements[key]  # type: ignore[attr-defined]
            else:
                self.placements = self.placements.delete(key)
            return
        if bulk:
            self.placements[key] = host  # type: ignore[index]
        else:
            self.placements = self.placements.set(key, host)
        if vm is not None:
            self._count(host, key, vm, 1)

    def _count(self, host: str, key: str, vm: VM, delta: int) -> None:
        for _table, _state, dirty in self._kept.values():
            dirty.add(host)
        r = vm.resources
        used = self.used.get(host)
        if used is None:
            used = self.used[host] = [0, 0, 0]
        used[0] += delta * r.vcpus
        used[1] += delta * r.memory_mib
        used[2] += delta * r.disk_gib
        keys = self.by_host.setdefault(host, set())
        if delta > 0:
            keys.add(key)
        else:
            keys.discard(key)
        if not keys:
            del self.by_host[host]
            del self.used[host]
        if vm.ha_priority is not HAPriority.OFF:
            sizes = self.restart.setdefault(host, {})
            size = restart_key(vm)
            n = sizes.get(size, 0) + delta
            if n:
                sizes[size] = n
            else:
                del sizes[size]
                if not sizes:
                    del self.restart[host]

    @classmethod
    def build(cls, vms: Mapping[str, VM], placements: Mapping[str, str]) -> Usage:
        """The counters for these records in one pass (a relist, a check)."""
        usage = cls()
        usage.vms = immutables.Map(vms)
        usage.placements = immutables.Map(placements)
        used, by_host, by_scope, restart = usage.used, usage.by_host, usage.by_scope, usage.restart
        for key, vm in vms.items():
            scope = by_scope.get(vm.scope)
            if scope is None:
                scope = by_scope[vm.scope] = {}
            scope[key] = vm
        off = HAPriority.OFF
        for key, host in placements.items():
            spec = vms.get(key)
            if spec is None:
                continue
            r = spec.resources
            u = used.get(host)
            if u is None:
                u = used[host] = [0, 0, 0]
                by_host[host] = set()
            u[0] += r.vcpus
            u[1] += r.memory_mib
            u[2] += r.disk_gib
            by_host[host].add(key)
            if spec.ha_priority is not off:
                sizes = restart.get(host)
                if sizes is None:
                    sizes = restart[host] = {}
                rk = restart_key(spec)
                sizes[rk] = sizes.get(rk, 0) + 1
        return usage

    # ------------------------------------------------------------------ reading

    def host_table(self, hosts: Mapping[str, Any], build: Any) -> Any:
        """`build(hosts)`, kept while the same (immutable) hosts map comes back: the
        engine's host table is paid for once per change of the hosts, not per batch."""
        kept = self._tables
        if kept is not None and kept[0] is hosts:
            return kept[1]
        table = build(hosts)
        if isinstance(hosts, immutables.Map):
            self._tables = (hosts, table)
        return table

    def kept(self, name: str, table: object, build: Any) -> tuple[Any, set[str]]:
        """State derived from these counters for `table` (kept while the same table comes
        back; else `build()`), and the hosts whose counts moved since the caller last
        cleared that set: the caller brings its state up to date for those alone."""
        found = self._kept.get(name)
        if found is None or found[0] is not table:
            found = self._kept[name] = (table, build(), set())
        return found[1], found[2]

    def check(self) -> None:
        """Recount from the maps and raise AssertionError on any difference."""
        fresh = Usage.build(self.vms, self.placements)
        for name in ("used", "by_host", "by_scope", "restart"):
            mine, theirs = getattr(self, name), getattr(fresh, name)
            if mine != theirs:
                raise AssertionError(f"Usage.{name} drifted: {mine!r} != {theirs!r}")
