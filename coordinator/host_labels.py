"""`hvplace host label H k=v ... [k-] [--rebalance]`: labels an operator sets on a host,
kept in the host's status record (the coordinator's; the agent's registration keeps the
labels of its config, which these override). Every required rule is checked under the
new labels: a change that would break one is refused (`conflict`), unless it asks for a
rebalance, which first moves VMs until every rule holds under the new labels."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from hvplace.coordinator.rebalance import newly_broken
from hvplace.proto import keyspace, models
from hvplace.proto.errors import Busy, Conflict, InvalidInput
from hvplace.proto.models import MAX_LABELS, Host, HostInfo, HostStatus, host_labels
from hvplace.proto.names import check_label, check_label_key, check_name, quote

if TYPE_CHECKING:
    from hvplace.coordinator.operations import HostView, Operations

ATTEMPTS = 5


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
    ops: Operations,
    name: str,
    set_labels: Mapping[str, str],
    remove: Sequence[str],
    rebalance: bool,
) -> HostView:
    check_name(name, "host name")
    relabelled(HostStatus(name=name, labels=dict.fromkeys(remove, "x")), set_labels, remove)
    ops._require_leader()
    key = keyspace.host_status(name)
    for _attempt in range(ATTEMPTS):
        view = await ops.backend.fresh_view()
        ops._find_host(view, name)
        found = await ops.backend.get(key)
        current = models.loads(HostStatus, found[0]) if found else HostStatus(name=name)
        status = relabelled(current, set_labels, remove)
        info = view.hosts.get(name) or HostInfo(name=name)
        before = view.snapshot
        host = before.hosts.get(name) or Host.from_records(info, current)
        after = dataclasses.replace(
            before,
            hosts={
                **before.hosts,
                name: dataclasses.replace(host, labels=host_labels(info, status)),
            },
        )
        broken = newly_broken(before, after)
        if broken and not rebalance:
            raise Conflict(
                f"new labels on host {name} would break {', '.join(f'`{k}`' for k in sorted(broken))};"
                " move the VMs first, or ask for a rebalance"
            )
        if broken:
            await ops.rebalancing.make_hold(after, f"labels of host {name}", broken)
            continue  # re-read: the moves changed where VMs run
        compare = (key, found[1] if found else 0)
        if await ops.backend.commit([compare], [(key, models.dumps(status))]):
            return ops._host_view(await ops.backend.fresh_view(), name)
    raise Busy(f"host {name} kept changing while being labelled; retry")
