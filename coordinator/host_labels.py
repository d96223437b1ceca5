"""`hvplace host label H k=v ... [k-] [--rebalance]`: labels an operator sets on a host,
kept in the host's status record (the coordinator's; the agent's registration keeps the
labels of its config, which these override). Every required rule is checked under the
new labels: a change that would break one is refused (`conflict`), unless it asks for a
rebalance, which first moves VMs until every rule holds under the new labels."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from hvplace.coordinator.operations.backend import ClusterView
from hvplace.coordinator.operations.hosts import Hosts, host_view
from hvplace.coordinator.operations.hosts import find as find_host
from hvplace.coordinator.operations.results import HostView
from hvplace.coordinator.rebalance import Rebalancing, breaking, newly_broken
from hvplace.coordinator.snapshot import Snapshot
from hvplace.coordinator.store import Txn
from hvplace.proto import codec, keyspace
from hvplace.proto.errors import InvalidInput
from hvplace.proto.names import check_label, check_label_key, check_name, quote
from hvplace.proto.records import Host, HostInfo, HostStatus, host_labels
from hvplace.proto.validation import MAX_LABELS


def relabelled(
    status: HostStatus, set_labels: Mapping[str, str], remove: Sequence[str]
) -> HostStatus:
    """The status with labels set and removed; InvalidInput names a bad one."""
    if not set_labels and not remove:
        raise InvalidInput("give at least one KEY=VALUE to set or KEY- to remove")
    for k, v in set_labels.items():
        check_label(k, v, "host label")
    labels = dict(status.labels)
    for k in remove:
        check_label_key(k, "host label")
        if k in set_labels:
            raise InvalidInput(f"host label {quote(k)} is both set and removed")
        if k not in labels:
            raise InvalidInput(
                f"host label {quote(k)} was not set by an operator; labels from the agent's"
                " config change there"
            )
        del labels[k]
    labels.update(set_labels)
    if len(labels) > MAX_LABELS:
        raise InvalidInput(f"{len(labels)} host labels; at most {MAX_LABELS}")
    return dataclasses.replace(status, labels=labels)


async def label_host(
    hosts: Hosts,
    rebalancing: Rebalancing,
    name: str,
    set_labels: Mapping[str, str],
    remove: Sequence[str],
    rebalance: bool,
) -> HostView:
    check_name(name, "host name")
    relabelled(HostStatus(name=name, labels=dict.fromkeys(remove, "x")), set_labels, remove)
    hosts.require_leader()
    key = keyspace.host_status(name)

    def change_of(view: ClusterView, current: HostStatus) -> tuple[HostStatus, Snapshot]:
        status = relabelled(current, set_labels, remove)
        info = view.hosts.get(name) or HostInfo(name=name)
        before = view.snapshot
        host = before.hosts.get(name) or Host.from_records(info, current)
        labelled = dataclasses.replace(host, labels=host_labels(info, status))
        return status, dataclasses.replace(before, hosts={**before.hosts, name: labelled})

    if rebalance:
        # Move VMs first, so that the change then holds (checked again below).
        view = await hosts.backend.fresh_view()
        find_host(view, name)
        _status, after = change_of(view, view.host_status.get(name) or HostStatus(name=name))
        broken = newly_broken(view.snapshot, after)
        if broken:
            await rebalancing.make_hold(after, f"labels of host {name}", broken)

    async def change(txn: Txn) -> None:
        view = await hosts.backend.fresh_view()
        find_host(view, name)
        raw = await txn.get(key)
        current = codec.loads(HostStatus, raw) if raw is not None else HostStatus(name=name)
        status, after = change_of(view, current)
        broken = newly_broken(view.snapshot, after)
        if broken:
            raise breaking(
                f"new labels on host {name}", broken, "move the VMs first, or ask for a rebalance"
            )
        txn.put(key, codec.dumps(status))

    # With placement held still: a plan computed under the old labels must not land
    # beside the change (the planner compares only its target hosts' records).
    await hosts.backend.update(change, subject=f"host {name} labels", hold_placement=True)
    return host_view(hosts.backend.view(), name)
