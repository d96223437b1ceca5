"""The cluster API calls: status (hosts by state, VMs by phase, failover headroom), the
what-if simulation, and the stream of record changes."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence

from hvplace.coordinator import whatif
from hvplace.coordinator.admission import AdmissionCheck, AdmissionReport
from hvplace.coordinator.operations.noun import Noun
from hvplace.coordinator.operations.results import ClusterStatusView, Event
from hvplace.coordinator.operations.vms import vm_phase
from hvplace.proto import keyspace
from hvplace.proto.errors import InvalidInput
from hvplace.proto.names import quote
from hvplace.proto.records import HostState, Phase, host_state

EVENT_KINDS: Mapping[keyspace.Kind, str] = {
    keyspace.Kind.VMS: "vm",
    keyspace.Kind.VM_STATUS: "vm",
    keyspace.Kind.HOSTS: "host",
    keyspace.Kind.HOST_STATUS: "host",
    keyspace.Kind.RULES: "rule",
    keyspace.Kind.POLICIES: "rule",
    keyspace.Kind.ASSIGNMENTS: "assignment",
    keyspace.Kind.DOMAINS: "domain",
    keyspace.Kind.CONFIG: "config",
}
"""The event kind a watcher asks for, by the kind of key (keyspace.classify) it shows."""


class Cluster(Noun):
    async def status(self) -> ClusterStatusView:
        view = self.backend.view()
        lead = self.backend.leadership()
        hosts_by_state: Counter[str] = Counter()
        for name in set(view.hosts) | set(view.host_status) | set(view.snapshot.hosts):
            state = host_state(view.hosts.get(name), view.host_status.get(name)).value
            if name not in view.hosts:
                state = HostState.LOST.value
            hosts_by_state[state] += 1
        vms_by_phase: Counter[str] = Counter()
        pending_by_reason: Counter[str] = Counter()
        for key in view.vms:
            vm_status = view.vm_status.get(key)
            phase = vm_phase(view, key).phase.value
            vms_by_phase[phase] += 1
            if phase == Phase.PENDING.value:
                e = vm_status.explanation if vm_status else None
                code = e.reasons[0].code if e and e.reasons else "unplaced"
                pending_by_reason[code] += 1
        return ClusterStatusView(
            leader=lead.leader,
            fencing_token=lead.fencing_token,
            revision=view.revision,
            hosts_by_state=dict(hosts_by_state),
            vms_by_phase=dict(vms_by_phase),
            pending_by_reason=dict(pending_by_reason),
            config=view.config,
            headroom=AdmissionCheck.of(view.config).headroom(view.snapshot),
        )

    async def headroom(self) -> AdmissionReport:
        return (await self.status()).headroom

    async def simulate(
        self, fail_hosts: Sequence[str], topology_key: str = "", domain: str = ""
    ) -> whatif.SimulateResult:
        """What-if on a copy of the snapshot: changes nothing."""
        view = self.backend.view()
        lost = whatif.failed_hosts(view.snapshot, fail_hosts, topology_key, domain)
        return whatif.simulate_failure(view.snapshot, lost)

    async def events(self, kinds: str) -> AsyncIterator[Event]:
        wanted = {k.strip() for k in kinds.split(",") if k.strip()}
        unknown = wanted - set(EVENT_KINDS.values())
        if unknown:
            raise InvalidInput(
                f"event kind(s) {quote(', '.join(sorted(unknown)))} unknown; use"
                f" {', '.join(sorted(set(EVENT_KINDS.values())))}"
            )
        async for change in self.backend.changes():
            kind = EVENT_KINDS.get(keyspace.classify(change.key).kind, "")
            if not kind or (wanted and kind not in wanted):
                continue
            yield Event(
                revision=change.revision,
                kind=kind,
                type=change.type,
                key=change.key,
                json=change.value.decode(errors="replace"),
            )
