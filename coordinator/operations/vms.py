"""The VM API calls: create (validate, resolve images, place and commit in one fenced
transaction through the planner), read, list, power, delete and explain."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections import Counter
from collections.abc import Sequence

from hvplace.coordinator import phases
from hvplace.coordinator.admission import AdmissionCheck, AdmissionReport, join_keys
from hvplace.coordinator.operations.backend import Backend, ClusterView
from hvplace.coordinator.operations.images import Catalogue
from hvplace.coordinator.operations.noun import Noun, fingerprint, replay
from hvplace.coordinator.operations.results import CreateVMsResult, VMView
from hvplace.coordinator.placement import explain
from hvplace.coordinator.planner import MAX_TXN_VMS, merge
from hvplace.coordinator.store import Txn
from hvplace.proto import codec, keyspace, records, validation
from hvplace.proto.errors import Conflict, InvalidInput, NotFound, Unavailable
from hvplace.proto.names import check_name, quote
from hvplace.proto.records import (
    VM,
    Assignment,
    ClusterConfig,
    Explanation,
    Phase,
    Power,
    ReasonCount,
    RequestRecord,
    VMStatus,
)

MAX_BATCH = 10_000
"""VMs per create request; larger batches are split by the client."""

START_FAILED = "start_failed"
"""Reason code in `explain` for a VM that failed to start where it was placed."""


def vm_phase(view: ClusterView, key: str) -> phases.Derived:
    """The phase users read, derived from the records now (never stored as such)."""
    a = view.assignments.get(key)
    return phases.derive(
        view.vms[key],
        view.vm_status.get(key),
        a,
        view.domains.get(key),
        view.hosts.get(a.host) if a is not None else None,
    )


def vm_view(view: ClusterView, key: str) -> VMView:
    """A VM as `vm get` shows it: its status with the derived phase and reason."""
    vm = view.vms[key]
    status = view.vm_status.get(key)
    derived = vm_phase(view, key)
    if status is not None and (status.phase, status.reason) != (derived.phase, derived.reason):
        status = dataclasses.replace(status, phase=derived.phase, reason=derived.reason)
    return VMView(spec=vm, status=status, domain=view.domains.get(key))


def _with_images(vms: Sequence[VM], config: ClusterConfig) -> list[VM]:
    """Each VM with its image, or the cluster's default image; without either the request
    is refused, as the VM could boot nowhere. Paths outside the cluster's image roots
    (when it has any) are refused."""
    out = []
    for vm in vms:
        if not validation.has_image(vm.image):
            if config.default_image is None:
                raise InvalidInput(
                    f"VM {vm.key} has no image (a kernel or a base disk) and the cluster"
                    " has no default image; give one"
                )
            vm = dataclasses.replace(vm, image=config.default_image)
        validation.check_image_roots(vm.image, config.image_roots, f"VM {vm.key}")
        out.append(vm)
    return out


class VMs(Noun):
    def __init__(
        self, backend: Backend, images: Catalogue, admission_on_create: bool = True
    ) -> None:
        super().__init__(backend)
        self.images = images
        # The failover simulation costs O(VMs) per create (it dominates the commit
        # benchmark); a deployment may turn it off for VM creates and keep it for rules.
        self.admission_on_create = admission_on_create

    def _find(self, view: ClusterView, scope: str, name: str) -> str:
        check_name(scope, "scope")
        check_name(name, "VM name")
        key = records.vm_key(scope, name)
        if key not in view.vms:
            raise NotFound(f"VM {key} does not exist")
        return key

    async def _replayed(self, keys: Sequence[str]) -> CreateVMsResult:
        view = await self.backend.fresh_view()
        return CreateVMsResult(
            vms=tuple(vm_view(view, k) for k in keys if k in view.vms),
            admission=AdmissionReport(ok=True),
        )

    async def create(self, request_id: str, vms: Sequence[VM], atomic: bool) -> CreateVMsResult:
        """Validate all, replay a retried request, place and commit in one fenced
        transaction (with the request record; failover admission checked on the plan
        committed), or raise with the explanations. The reply is what was stored."""
        if not vms:
            raise InvalidInput("a create request names at least one VM")
        if len(vms) > MAX_BATCH:
            raise InvalidInput(f"{len(vms)} VMs in one request; at most {MAX_BATCH}")
        if request_id:
            check_name(request_id, "request id")
        for vm in vms:
            validation.validate_vm(vm)
        requested = vms
        # Every read from here on is a precondition of the commit (an image deleted or
        # the request applied meanwhile fails it).
        txn = self.backend.txn()
        resolved = await self.images.resolve(vms, txn)
        vms = _with_images(resolved, self.backend.view().config)
        keys = [vm.key for vm in vms]
        dupes = sorted(k for k, n in Counter(keys).items() if n > 1)
        if dupes:
            raise InvalidInput(f"the request names {join_keys(dupes)} more than once")
        self.require_leader()
        digest = fingerprint(
            "create_vms", {"atomic": atomic, "vms": [codec.to_dict(vm) for vm in requested]}
        )
        if request_id and await replay(txn, request_id, "create_vms", digest):
            return await self._replayed(keys)
        view = self.backend.view()
        exists = [k for k in keys if k in view.vms]
        if exists:
            raise Conflict(
                f"VM(s) {join_keys(exists)} already exist; delete them or pick new names"
            )
        now = time.time()
        stamped = [
            dataclasses.replace(
                vm, uid=vm.uid or uuid.uuid4().hex, request_id=request_id, created_at=now
            )
            for vm in vms
        ]
        for vm in stamped:
            validation.check_vm_size(vm)
        admission = AdmissionCheck.of(view.config, simulate=self.admission_on_create)
        # One transaction, or (not atomic, too many for one) one per chunk, each under
        # the reads made so far; the request record goes with the last.
        size = len(stamped) if atomic else MAX_TXN_VMS
        chunks = [stamped[i : i + size] for i in range(0, len(stamped), size)]
        outcomes = []
        for n, chunk in enumerate(chunks):
            part = txn if len(chunks) == 1 else txn.fork()
            for vm in chunk:
                part.require_absent(keyspace.vm(vm.scope, vm.name))
            if request_id and n == len(chunks) - 1:
                record = RequestRecord(
                    request_id=request_id,
                    kind="create_vms",
                    targets=tuple(keys),
                    fingerprint=digest,
                    created_at=now,
                )
                part.put(keyspace.request(request_id), codec.dumps(record))
            try:
                outcomes.append(
                    await self.backend.place(chunk, atomic=atomic, admission=admission, txn=part)
                )
            except Conflict:
                # A concurrent retry of this very request won the race: answer as a replay.
                if request_id and await replay(
                    self.backend.txn(), request_id, "create_vms", digest
                ):
                    return await self._replayed(keys)
                raise
        outcome = outcomes[0] if len(outcomes) == 1 else merge(outcomes)
        plan = outcome.plan
        if atomic and plan.pending:
            blockers = [
                k for k in keys if k in plan.pending and plan.pending[k].feasible_hosts == 0
            ]
            why = "; ".join(
                f"{k}: {plan.pending[k].summary()}" for k in (blockers or list(plan.pending))[:5]
            )
            raise Unavailable(
                f"atomic batch of {len(keys)} VM(s) not created: {why}"
                " (nothing was written; add capacity or relax the rules)"
            )
        report = outcome.admission or AdmissionReport(ok=True, policy="off")
        return CreateVMsResult(
            vms=tuple(VMView(spec=vm, status=outcome.statuses.get(vm.key)) for vm in stamped),
            admission=report,
        )

    async def get(self, scope: str, name: str) -> VMView:
        view = self.backend.view()
        return vm_view(view, self._find(view, scope, name))

    async def list(self, scope: str = "", host: str = "", phase: str = "") -> list[VMView]:
        if scope:
            check_name(scope, "scope")
        if host:
            check_name(host, "host name")
        if phase and phase not in {p.value for p in Phase}:
            raise InvalidInput(
                f"phase {quote(phase)} is not one of {', '.join(p.value for p in Phase)}"
            )
        view = self.backend.view()
        out = []
        for key in sorted(view.vms):
            vm = view.vms[key]
            if scope and vm.scope != scope:
                continue
            status = view.vm_status.get(key)
            placed = view.snapshot.placements.get(key, status.host if status else "")
            if host and placed != host:
                continue
            if phase and vm_phase(view, key).phase.value != phase:
                continue
            out.append(vm_view(view, key))
        return out

    async def delete(self, scope: str, name: str) -> None:
        """Delete the spec, status and assignment together; the host's agent then stops it."""
        check_name(scope, "scope")
        check_name(name, "VM name")
        self.require_leader()
        vm_key = keyspace.vm(scope, name)

        async def remove(txn: Txn) -> None:
            if await txn.get(vm_key) is None:
                raise NotFound(f"VM {scope}/{name} does not exist")
            view = await self.backend.fresh_view()
            txn.delete(vm_key)
            txn.delete(keyspace.vm_status(scope, name))
            host = view.snapshot.placements.get(records.vm_key(scope, name))
            if host:
                txn.delete(keyspace.assignment(host, scope, name))

        await self.backend.update(remove, subject=f"VM {scope}/{name}")

    async def set_power(self, scope: str, name: str, power: Power) -> VMView:
        """Change the desired power state in the spec and in its assignment (which the
        agent reads), in one transaction."""
        check_name(scope, "scope")
        check_name(name, "VM name")
        self.require_leader()
        key = keyspace.vm(scope, name)

        async def change(txn: Txn) -> VM:
            raw = await txn.get(key)
            if raw is None:
                raise NotFound(f"VM {scope}/{name} does not exist")
            vm = dataclasses.replace(codec.loads(VM, raw), power=power)
            txn.put(key, codec.dumps(vm))
            assignment = (await self.backend.fresh_view()).assignments.get(vm.key)
            if assignment is not None:
                akey = keyspace.assignment(assignment.host, scope, name)
                current = await txn.get(akey)
                if current is not None:
                    a = codec.loads(Assignment, current)
                    txn.put(akey, codec.dumps(dataclasses.replace(a, vm=vm)))
            if power is Power.RUNNING:
                await _retry_failed(txn, scope, name)
            return vm

        vm = await self.backend.update(change, subject=f"VM {scope}/{name}")
        view = self.backend.view()
        return vm_view(view, vm.key) if vm.key in view.vms else VMView(spec=vm)

    async def explain(self, scope: str, name: str) -> Explanation:
        view = self.backend.view()
        key = self._find(view, scope, name)
        why = explain(view.snapshot, view.vms[key])
        status = view.vm_status.get(key)
        derived = vm_phase(view, key)
        if derived.phase is Phase.FAILED or (status is not None and status.start_failures):
            # Placement alone does not say why a VM is not running: its start failures do.
            failed = {f.host for f in status.start_failures} if status is not None else set()
            row = ReasonCount(
                code=START_FAILED,
                message=f"{derived.phase.value}: {derived.reason}",
                hosts=len(failed),
            )
            why = dataclasses.replace(why, reasons=(row, *why.reasons))
        return why


async def _retry_failed(txn: Txn, scope: str, name: str) -> None:
    """`vm start` on a VM with start failures: the operator's retry clears the count
    (vSphere's restart count); a `failed` VM goes back to pending and is placed again."""
    skey = keyspace.vm_status(scope, name)
    raw = await txn.get(skey)
    if raw is None:
        return
    status = codec.loads(VMStatus, raw)
    if not status.start_failures and status.phase is not Phase.FAILED:
        return
    tried = ", ".join(f.host for f in status.start_failures) or "-"
    reason = f"retry requested by an operator (had failed to start on {tried})"
    if status.phase is Phase.FAILED:
        reset = dataclasses.replace(
            status,
            phase=Phase.PENDING,
            reason=reason,
            host="",
            since=time.time(),
            start_failures=(),
            explanation=None,
        )
    else:
        reset = dataclasses.replace(status, start_failures=())
    txn.put(skey, codec.dumps(reset))
