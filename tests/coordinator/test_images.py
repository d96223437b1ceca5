"""The image catalogue through the real API (real etcd): add/get/list/delete, VMs created
by image name (a copy of the image's files and digests), refusals that write nothing, and
end to end with test:/// agents: a VM by name runs; a tampered file fails only its VM."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import AsyncIterator
from contextlib import redirect_stdout
from pathlib import Path

import grpc
import pytest
from hvplace.cli import main as cli
from hvplace.coordinator.errors_grpc import error_info
from hvplace.proto import codec, keyspace, records
from hvplace.proto.records import ClusterConfig, Image
from hvplace.proto.v1 import hvplace_pb2 as pb
from support.api import Api, running_api
from support.etcd import EtcdServer
from support.wait import eventually
from test_restarts import cluster, get


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


TINY = pb.Image(
    name="tiny",
    kernel="tiny/vmlinuz",
    kernel_sha256=sha(b"kernel"),
    initrd="tiny/initrd.img",
    initrd_sha256=sha(b"initrd"),
    cmdline="console=ttyS0",
)


@pytest.fixture
async def api(etcd: EtcdServer) -> AsyncIterator[Api]:
    async with running_api(etcd) as a:
        await a.add_host("hv1")
        yield a


def by_image(name: str, image: str = "tiny") -> pb.VM:
    return pb.VM(
        scope="acme",
        name=name,
        resources=pb.Resources(vcpus=1, memory_mib=64),
        image=pb.Image(name=image),
    )


async def refused(call: object, reason: str, *needles: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    info_ = error_info(info.value)
    assert info_ is not None and info_.reason == reason, info.value.details()
    details = info.value.details() or ""
    for needle in needles:
        assert needle in details, details
    return details


async def test_add_get_list_delete(api: Api) -> None:
    assert await api.image.AddImage(TINY) == TINY
    disk = pb.Image(name="deb", disk="debian/base.qcow2", disk_sha256=sha(b"disk"))
    await api.image.AddImage(disk)
    assert await api.image.GetImage(pb.ImageRef(name="tiny")) == TINY
    listed = await api.image.ListImages(pb.Empty())
    assert [i.name for i in listed.images] == ["deb", "tiny"]
    stored = json.loads(api.etcd.etcdctl("get", "--print-value-only", keyspace.image("tiny")))
    assert stored["kernel"] == "tiny/vmlinuz" and stored["kernel_sha256"] == sha(b"kernel")
    await refused(api.image.AddImage(TINY), "conflict", "already exists")
    await api.image.DeleteImage(pb.DeleteImageRequest(name="deb"))
    await refused(api.image.GetImage(pb.ImageRef(name="deb")), "not-found", "'deb'")
    await refused(api.image.DeleteImage(pb.DeleteImageRequest(name="deb")), "not-found")


BAD_IMAGES = [
    ("absolute", pb.Image(name="a", disk="/etc/shadow", disk_sha256=sha(b"")), "relative"),
    ("dotdot", pb.Image(name="a", disk="x/../../etc/shadow", disk_sha256=sha(b"")), "'..'"),
    ("no-digest", pb.Image(name="a", disk="base.qcow2"), "has no sha256"),
    ("bad-digest", pb.Image(name="a", disk="b", disk_sha256="ABC"), "not a sha256"),
    (
        "digest-only",
        pb.Image(name="a", kernel="k", kernel_sha256=sha(b""), disk_sha256=sha(b"")),
        "no file",
    ),
    ("no-files", pb.Image(name="a", cmdline="quiet"), "neither a kernel nor a disk"),
    ("no-name", pb.Image(disk="b", disk_sha256=sha(b"")), "needs a name"),
    ("bad-name", pb.Image(name="a/b", disk="b", disk_sha256=sha(b"")), "contains '/'"),
    (
        "both",
        pb.Image(name="a", kernel="k", kernel_sha256=sha(b""), disk="d", disk_sha256=sha(b"")),
        "both",
    ),
]


@pytest.mark.parametrize("bad", [b[1] for b in BAD_IMAGES], ids=[b[0] for b in BAD_IMAGES])
async def test_bad_images_are_incorrect_and_write_nothing(api: Api, bad: pb.Image) -> None:
    needle = next(b[2] for b in BAD_IMAGES if b[1] is bad)
    await refused(api.image.AddImage(bad), "incorrect", needle)
    assert api.etcd.etcdctl("get", "--prefix", "--keys-only", keyspace.IMAGES).strip() == ""


async def test_a_vm_by_image_name_carries_a_copy(api: Api) -> None:
    await api.image.AddImage(TINY)
    # Raw host paths are confined to the cluster's image roots; catalogue images are not
    # host paths (the agents resolve them inside their image directories).
    config = ClusterConfig(image_roots=("/var/lib/hvplace/images",))
    await api.client.put(keyspace.CONFIG.encode(), codec.dumps(config))
    await api.backend.fresh_view()
    resp = await api.vm.CreateVMs(pb.CreateVMsRequest(vms=[by_image("web")]))
    assert resp.vms[0].spec.image == TINY
    stored = codec.loads(
        records.VM, api.etcd.etcdctl("get", "--print-value-only", keyspace.vm("acme", "web"))
    )
    assert stored.image == Image(
        name="tiny",
        kernel="tiny/vmlinuz",
        kernel_sha256=sha(b"kernel"),
        initrd="tiny/initrd.img",
        initrd_sha256=sha(b"initrd"),
        cmdline="console=ttyS0",
    )
    # In use: deleting the image is refused unless forced; the VM keeps its copy.
    await refused(api.image.DeleteImage(pb.DeleteImageRequest(name="tiny")), "conflict", "acme/web")
    await api.image.DeleteImage(pb.DeleteImageRequest(name="tiny", force=True))
    view = await api.vm.GetVM(pb.VMRef(scope="acme", name="web"))
    assert view.spec.image == TINY


async def test_unknown_or_mixed_image_is_refused_with_nothing_written(api: Api) -> None:
    await api.image.AddImage(TINY)
    before = api.key_count()
    await refused(
        api.vm.CreateVMs(pb.CreateVMsRequest(vms=[by_image("a"), by_image("b", "nope")])),
        "not-found",
        "image 'nope' is not in the catalogue",
    )
    mixed = by_image("c")
    mixed.image.cmdline = "init=/bin/sh"
    await refused(
        api.vm.CreateVMs(pb.CreateVMsRequest(vms=[mixed])), "incorrect", "give only the name"
    )
    forged = by_image("d")
    forged.image.kernel, forged.image.kernel_sha256 = "tiny/other", sha(b"")
    await refused(
        api.vm.CreateVMs(pb.CreateVMsRequest(vms=[forged])), "incorrect", "give only the name"
    )
    assert api.key_count() == before
    assert (await api.vm.ListVMs(pb.ListVMsRequest())).vms == []


async def test_an_image_deleted_during_a_create_fails_the_create(api: Api) -> None:
    """The create commits only if each image it copied is unchanged: a delete landing
    between the read and the commit (forced or not) leaves no VM with a vanished image."""
    await api.image.AddImage(TINY)
    place = api.backend.place

    async def after_a_concurrent_delete(*args: object, **kw: object) -> object:
        await api.client.delete(keyspace.image("tiny").encode())
        return await place(*args, **kw)  # type: ignore[arg-type]

    api.backend.place = after_a_concurrent_delete  # type: ignore[method-assign,assignment]
    await refused(
        api.vm.CreateVMs(pb.CreateVMsRequest(vms=[by_image("web")])),
        "conflict",
        "/hvplace/v1/images/tiny was changed",
    )
    assert (await api.vm.ListVMs(pb.ListVMsRequest())).vms == []


def run_cli(api: Api, *argv: str) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["--endpoint", api.endpoint, *argv]) == 0
    return out.getvalue()


async def test_cli_computes_the_digests(api: Api, tmp_path: Path) -> None:
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "vmlinuz").write_bytes(b"kernel")
    (tmp_path / "tiny" / "initrd.img").write_bytes(b"initrd")
    argv = ["image", "add", "tiny", "--kernel", "tiny/vmlinuz", "--initrd", "tiny/initrd.img"]
    argv += ["--cmdline", "console=ttyS0", "--dir", str(tmp_path)]
    await asyncio.to_thread(run_cli, api, *argv)
    assert await api.image.GetImage(pb.ImageRef(name="tiny")) == TINY
    listed = await asyncio.to_thread(run_cli, api, "image", "list")
    assert "tiny" in listed and "kernel=tiny/vmlinuz" in listed
    await asyncio.to_thread(
        run_cli, api, "vm", "create", "web-1", "--scope", "acme", "--image", "tiny"
    )
    assert (await api.vm.GetVM(pb.VMRef(scope="acme", name="web-1"))).spec.image == TINY
    await asyncio.to_thread(run_cli, api, "image", "delete", "tiny", "--force")
    assert (await api.image.ListImages(pb.Empty())).images == []


@pytest.mark.timeout(120)
async def test_a_vm_by_name_runs_and_a_tampered_file_fails_only_its_vm(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    (images / "tiny").mkdir(parents=True)
    (images / "tiny" / "vmlinuz").write_bytes(b"kernel")
    (images / "tiny" / "initrd.img").write_bytes(b"initrd")
    (images / "other.qcow2").write_bytes(b"disk")
    other = pb.Image(name="other", disk="other.qcow2", disk_sha256=sha(b"disk"))
    async with cluster(etcd, tmp_path, hosts=3, image_dirs=(images,)) as api:
        await api.image.AddImage(TINY)
        await api.image.AddImage(other)
        await api.vm.CreateVMs(pb.CreateVMsRequest(vms=[by_image("web")]))
        await eventually(lambda: _phase_is(api, "web", "running"), within=30)
        (images / "other.qcow2").write_bytes(b"disk, tampered with")
        await api.vm.CreateVMs(pb.CreateVMsRequest(vms=[by_image("bad", "other")]))
        view = await eventually(lambda: _failed(api, "bad"), within=60)
        reasons = [f.reason for f in view.status.start_failures]
        assert reasons and all("other.qcow2" in r and "sha256" in r for r in reasons), reasons
        assert (await get(api, "web")).status.phase == "running"


async def _phase_is(api: Api, name: str, wanted: str) -> bool:
    return (await get(api, name)).status.phase == wanted


async def _failed(api: Api, name: str) -> pb.VMView | None:
    view = await get(api, name)
    return view if view.status.phase == "failed" else None
