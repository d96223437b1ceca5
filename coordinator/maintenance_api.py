"""gRPC MaintenanceService (live migration and drain): translation only; the logic is in
coordinator/migration.py and coordinator/drain.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from hvplace.coordinator.api import _abort, _guard
from hvplace.coordinator.backend import CoreBackend
from hvplace.coordinator.convert import to_proto
from hvplace.coordinator.drain import Drain
from hvplace.coordinator.migration import Migrations
from hvplace.coordinator.operations import Operations
from hvplace.proto.errors import HvplaceError, NotLeader, Unsupported
from hvplace.proto.v1 import hvplace_pb2 as pb
from hvplace.proto.v1 import hvplace_pb2_grpc as pb_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]


class MaintenanceServicer(pb_grpc.MaintenanceServiceServicer):
    def __init__(self, ops: Operations) -> None:
        self.ops = ops
        backend = ops.backend
        self.migrations: Migrations | None = None
        self.drain: Drain | None = None
        if isinstance(backend, CoreBackend):
            self.migrations = Migrations(backend.store, backend.cache, backend.planner)
            self.drain = Drain(backend.store, backend.cache, self.migrations)

    def _require(self) -> tuple[Migrations, Drain]:
        lead = self.ops.backend.leadership()
        if not lead.is_leader:
            raise NotLeader(
                "this coordinator is not the leader"
                + (f"; the leader is {lead.leader}" if lead.leader else "")
            )
        if self.migrations is None or self.drain is None:
            raise Unsupported("this coordinator serves no maintenance (no planner)")
        return self.migrations, self.drain

    async def MigrateVM(self, request: pb.MigrateVMRequest, context: Ctx) -> pb.MigrateVMResponse:
        async def run() -> pb.MigrateVMResponse:
            migrations, _ = self._require()
            result = await migrations.migrate_vm(
                request.scope, request.name, request.to, dry_run=request.dry_run
            )
            view = await self.ops.vms.get(request.scope, request.name)
            return pb.MigrateVMResponse(
                vm=to_proto(view, pb.VMView),
                source=result.source,
                target=result.target,
                seconds=result.seconds,
                mode=result.mode,
            )

        return await _guard(context, run())

    async def Drain(
        self, request: pb.DrainRequest, context: Ctx
    ) -> AsyncIterator[pb.DrainProgress]:
        try:
            _, drain = self._require()
            async for p in drain.run(
                request.host, dry_run=request.dry_run, parallel=request.parallel
            ):
                yield pb.DrainProgress(
                    vm=p.vm,
                    from_host=p.from_host,
                    to_host=p.to_host,
                    state=p.state,
                    reason=p.reason,
                    done=p.done,
                    total=p.total,
                )
        except HvplaceError as e:
            await _abort(context, e)
