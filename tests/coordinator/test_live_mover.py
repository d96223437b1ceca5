"""The daemon's mover (moves.LiveMover) over a real etcd: the rebalancer moves a VM by live
migration, and each VM's `migration` setting decides what happens when it cannot."""

from __future__ import annotations

import asyncio
import contextlib

from hvplace.coordinator.migration import Migrations
from hvplace.coordinator.moves import LiveMover
from hvplace.proto import codec, keyspace
from hvplace.proto.errors import Conflict
from hvplace.proto.records import HostInfo, Migration, Resources
from hvplace.proto.v1 import hvplace_pb2 as pb
from support.api import Api, running_api
from support.etcd import EtcdServer
from support.wait import eventually


class Recorded:
    """The cold path, recorded (its own tests are test_cold_mover.py)."""

    def __init__(self) -> None:
        self.moves: list[tuple[str, str]] = []

    async def move(self, vm: str, target: str) -> None:
        self.moves.append((vm, target))

    async def repair_interrupted(self) -> int:
        return 0


async def _host(api: Api, name: str, live: bool) -> None:
    info = HostInfo(
        name=name,
        capacity=Resources(vcpus=16, memory_mib=32768, disk_gib=1000),
        domain_type="test",
        address=f"10.0.0.{len(name)}",
        migration_uri=f"qemu+tcp://{name}/system" if live else "",
    )
    lease = await api.client.lease(60)
    await api.client.put(keyspace.host(name).encode(), codec.dumps(info), lease=lease)
    await api.backend.fresh_view()


async def _vm(api: Api, name: str, migration: str) -> str:
    resp = await api.vm.CreateVMs(
        pb.CreateVMsRequest(
            vms=[
                pb.VM(
                    scope="acme",
                    name=name,
                    image=pb.Image(kernel="/boot/vmlinuz"),
                    resources=pb.Resources(vcpus=1, memory_mib=256),
                    migration=migration,
                )
            ]
        )
    )
    return resp.vms[0].status.host


def _mover(api: Api, cold: Recorded) -> LiveMover:
    b = api.backend
    return LiveMover(Migrations(b.store, b.cache, b.planner), b.cache, cold)  # type: ignore[arg-type]


async def test_a_live_vm_moves_live_and_never_cold(etcd: EtcdServer) -> None:
    async with running_api(etcd) as api:
        await _host(api, "h1", live=True)
        await _host(api, "h2", live=True)
        source = await _vm(api, "web", "live")
        target = "h2" if source == "h1" else "h1"
        cold = Recorded()
        moving = asyncio.create_task(_mover(api, cold).move("acme/web", target))
        try:
            # The move is a live migration: its record, which the source's agent acts on
            # (none runs here to settle it); nothing went the cold way.
            async def recorded() -> Migration | None:
                got = await api.client.get(keyspace.migration(source, "acme", "web").encode())
                return codec.loads(Migration, got.value) if got is not None else None

            record = await eventually(recorded, within=30)
            assert record.target == target and not record.restart
            assert cold.moves == [] and not moving.done()
        finally:
            moving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await moving


async def test_the_vm_setting_decides_when_a_host_takes_no_live_migration(
    etcd: EtcdServer,
) -> None:
    async with running_api(etcd) as api:
        await _host(api, "h1", live=False)
        await _host(api, "h2", live=False)
        cold = Recorded()
        mover = _mover(api, cold)
        for name, setting in (("a", "live"), ("b", "live_or_restart"), ("c", "restart")):
            source = await _vm(api, name, setting)
            target = "h2" if source == "h1" else "h1"
            if setting == "live":
                try:
                    await mover.move(f"acme/{name}", target)
                except Conflict as e:
                    assert "takes no live migrations" in e.message
                else:
                    raise AssertionError("a live-only VM was moved without live migration")
                assert cold.moves == []
            else:
                await mover.move(f"acme/{name}", target)
                assert cold.moves[-1] == (f"acme/{name}", target)
        assert [vm for vm, _ in cold.moves] == ["acme/b", "acme/c"]
