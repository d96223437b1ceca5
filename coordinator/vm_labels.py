"""`hvplace vm label SCOPE/NAME k=v ... [k-]`: change a VM's labels, which decide the rules
it is a member of. Checked like a create (at most one rule of each polarity per VM,
each rule's `max_members`) and against where VMs run now: a VM may join a rule only if
the rule still holds with it (Abiquo: a deployed VM joins a layer only if no other member
shares its host); the same goes for a scope policy's label groups. The spec and its
assignment's copy change in one transaction."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from hvplace.coordinator.placement import membership
from hvplace.coordinator.rebalance import newly_broken
from hvplace.proto import keyspace, models
from hvplace.proto.errors import Busy, Conflict, InvalidInput
from hvplace.proto.models import VM, Assignment
from hvplace.proto.names import check_label_key, check_name, quote

if TYPE_CHECKING:
    from hvplace.coordinator.operations import Operations, VMView

ATTEMPTS = 5


def relabelled(vm: VM, set_labels: Mapping[str, str], remove: Sequence[str]) -> VM:
    """The VM with labels set and removed, validated; InvalidInput names what is wrong."""
    if not set_labels and not remove:
        raise InvalidInput("give at least one KEY=VALUE to set or KEY- to remove")
    labels = dict(vm.labels)
    for k in remove:
        check_label_key(k, "VM label")
        if k in set_labels:
            raise InvalidInput(f"VM label {quote(k)} is both set and removed")
        if k not in labels:
            raise InvalidInput(f"VM {vm.key} has no label {quote(k)}")
        del labels[k]
    labels.update(set_labels)
    changed = dataclasses.replace(vm, labels=labels)
    models.validate_vm(changed)
    return changed


async def label_vm(
    ops: Operations, scope: str, name: str, set_labels: Mapping[str, str], remove: Sequence[str]
) -> VMView:
    check_name(scope, "scope")
    check_name(name, "VM name")
    ops._require_leader()
    key = keyspace.vm(scope, name)
    for _attempt in range(ATTEMPTS):
        view = await ops.backend.fresh_view()
        vm_key = ops._find_vm(view, scope, name)
        found = await ops.backend.get(key)
        if found is None:
            continue
        current = models.loads(VM, found[0])
        changed = relabelled(current, set_labels, remove)
        rules = view.rules.values()
        membership.check_polarity([changed], rules)
        vms = {**view.vms, vm_key: changed}
        membership.check_max_members(vms, rules, [changed])
        after = dataclasses.replace(view.snapshot, vms=vms)
        broken = newly_broken(view.snapshot, after)
        if broken:
            raise Conflict(
                f"with these labels VM {vm_key} would break"
                f" {', '.join(f'`{k}`' for k in sorted(broken))} where it runs now;"
                " move it first"
            )
        compares = [(key, found[1])]
        puts = [(key, models.dumps(changed))]
        a = view.assignments.get(vm_key)
        if a is not None:
            akey = keyspace.assignment(a.host, scope, name)
            stored = await ops.backend.get(akey)
            if stored is not None:
                old = models.loads(Assignment, stored[0])
                compares.append((akey, stored[1]))
                puts.append((akey, models.dumps(dataclasses.replace(old, vm=changed))))
        if await ops.backend.commit(compares, puts):
            return ops._vm_view(await ops.backend.fresh_view(), vm_key)
    raise Busy(f"VM {scope}/{name} kept changing while being labelled; retry")
