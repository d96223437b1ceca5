"""What the API logic needs from the coordinator (the Backend seam): the cache's view, the
leadership, linearizable reads, the one fenced read-modify-write, and the planner's commit
of new VMs. Implemented over store, cache, planner and election by backend.CoreBackend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from hvplace.coordinator.admission import AdmissionCheck
from hvplace.coordinator.planner import Outcome
from hvplace.coordinator.snapshot import Snapshot
from hvplace.coordinator.store import Txn
from hvplace.proto.records import (
    VM,
    Assignment,
    ClusterConfig,
    DomainStatus,
    HostInfo,
    HostStatus,
    Rule,
    ScopePolicy,
    VMStatus,
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ClusterView:
    """The records as the coordinator's cache holds them at one revision, keyed for the
    API: VM-keyed maps use `scope/name`; hosts present in `hosts` hold a lease now."""

    revision: int
    snapshot: Snapshot
    hosts: Mapping[str, HostInfo] = field(default_factory=dict)
    host_status: Mapping[str, HostStatus] = field(default_factory=dict)
    vms: Mapping[str, VM] = field(default_factory=dict)
    vm_status: Mapping[str, VMStatus] = field(default_factory=dict)
    assignments: Mapping[str, Assignment] = field(default_factory=dict)
    domains: Mapping[str, DomainStatus] = field(default_factory=dict)
    rules: Mapping[str, Rule] = field(default_factory=dict)
    policies: Mapping[str, ScopePolicy] = field(default_factory=dict)
    config: ClusterConfig = field(default_factory=ClusterConfig)


@dataclass(frozen=True, slots=True)
class Leadership:
    is_leader: bool
    leader: str = ""
    fencing_token: int = 0


@dataclass(frozen=True, slots=True)
class EtcdChange:
    """One etcd change as the cache saw it (the raw key and value; cache.Change is the
    decoded record)."""

    revision: int
    type: str  # put | delete
    key: str
    value: bytes = b""


class Backend(Protocol):
    """What the API nouns need from the coordinator's store, cache, planner and election.
    Every write is fenced with the leader's token; none exposes revisions to compare."""

    def view(self) -> ClusterView: ...

    async def fresh_view(self) -> ClusterView:
        """The view once the cache has caught up with etcd's revision now."""
        ...

    def leadership(self) -> Leadership: ...

    async def read(self, key: str) -> bytes | None:
        """A key's value read from etcd (linearizable), for records the cache skips."""
        ...

    async def read_prefix(self, prefix: str) -> list[bytes]:
        """Every value under `prefix`, read from etcd, in key order."""
        ...

    async def update(
        self, fn: Callable[[Txn], Awaitable[T]], *, subject: str, hold_placement: bool = False
    ) -> T:
        """The one read-modify-write (store.Store.update), fenced; `fn` may raise to abort
        and may read the view (`fresh_view`) to decide. Once it returns, the view shows
        what was written. Busy, naming `subject`, when conflicts persist.
        `hold_placement`: decided and written with placement held still (no plan in
        flight, none computed meanwhile): for a change to records that plans read but do
        not compare when they commit (labels)."""
        ...

    def txn(self) -> Txn:
        """A transaction to gather the reads (preconditions) and writes that `place`
        commits together with a plan."""
        ...

    async def place(
        self,
        vms: Sequence[VM],
        *,
        atomic: bool,
        admission: AdmissionCheck | None,
        txn: Txn,
    ) -> Outcome:
        """Place new VMs and commit them with `txn` (planner.Planner.place_and_commit):
        Conflict when a read of `txn` changed, admission checked on each attempt's plan;
        with `atomic` and a pending VM nothing is written. Once it returns, the view
        shows what was written."""
        ...

    def changes(self) -> AsyncIterator[EtcdChange]: ...
