"""`hvplace vm label SCOPE/NAME k=v ... [k-]`: change a VM's labels, which decide the rules
it is a member of. Checked like a create (at most one rule of each polarity per VM,
each rule's `max_members`) and against where VMs run now: a VM may join a rule only if
the rule still holds with it (Abiquo: a deployed VM joins a layer only if no other member
shares its host); the same goes for a scope policy's label groups. The spec and its
assignment's copy change in one transaction."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from hvplace.coordinator.operations.results import VMView
from hvplace.coordinator.operations.vms import VMs, vm_view
from hvplace.coordinator.placement import membership
from hvplace.coordinator.rebalance import breaking, newly_broken
from hvplace.coordinator.store import Txn
from hvplace.proto import codec, keyspace, validation
from hvplace.proto.errors import InvalidInput, NotFound
from hvplace.proto.names import check_label_key, check_name, quote
from hvplace.proto.records import VM, Assignment


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
    validation.validate_vm(changed)
    return changed


async def label_vm(
    vms: VMs, scope: str, name: str, set_labels: Mapping[str, str], remove: Sequence[str]
) -> VMView:
    check_name(scope, "scope")
    check_name(name, "VM name")
    vms.require_leader()
    key = keyspace.vm(scope, name)

    async def change(txn: Txn) -> str:
        view = await vms.backend.fresh_view()
        raw = await txn.get(key)
        if raw is None:
            raise NotFound(f"VM {scope}/{name} does not exist")
        current = codec.loads(VM, raw)
        changed = relabelled(current, set_labels, remove)
        rules = view.rules.values()
        membership.check_polarity([changed], rules)
        after = view.snapshot.overlaid({changed.key: changed}, {})
        membership.check_max_members(after, rules, [changed])
        broken = newly_broken(view.snapshot, after)
        if broken:
            raise breaking(
                f"with these labels VM {changed.key}", broken, "move it first", " where it runs now"
            )
        txn.put(key, codec.dumps(changed))
        a = view.assignments.get(changed.key)
        if a is not None:
            akey = keyspace.assignment(a.host, scope, name)
            stored = await txn.get(akey)
            if stored is not None:
                old = codec.loads(Assignment, stored)
                txn.put(akey, codec.dumps(dataclasses.replace(old, vm=changed)))
        return changed.key

    # With placement held still: a plan computed under the old labels (joining or not
    # joining this VM's rules) must not land beside the change.
    vm_key = await vms.backend.update(
        change, subject=f"VM {scope}/{name} labels", hold_placement=True
    )
    return vm_view(vms.backend.view(), vm_key)
