"""The API's callers: a real coordinator on a real etcd, with TLS certificates made by
openssl, bearer tokens from the auth file, and each refusal the security issue lists."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from coord_support import host, register
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hvplace.cli import main as cli
from hvplace.coordinator import auth, config
from hvplace.coordinator.daemon import Coordinator
from hvplace.coordinator.errors_grpc import error_info
from hvplace.coordinator.store import Store
from hvplace.proto.errors import InvalidInput
from hvplace.proto.v1 import hvplace_pb2 as pb
from hvplace.proto.v1 import hvplace_pb2_grpc as pb_grpc
from support.etcd import EtcdServer, free_port
from support.wait import eventually

# -------------------------------------------------------------------- certificates


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=d,
    )  # fmt: skip


def make_cert(d: Path, ca: str, cn: str, server: bool = False) -> None:
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
        "-keyout", f"{cn}.key", "-out", f"{cn}.csr", cwd=d,
    )  # fmt: skip
    ext = d / f"{cn}.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n" if server else "extendedKeyUsage=clientAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", f"{cn}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-extfile", ext.name, "-out", f"{cn}.crt", cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "rogue-ca")
    make_cert(d, "ca", "coordinator", server=True)
    make_cert(d, "ca", "alice")  # admin by certificate
    make_cert(d, "ca", "mallory")  # signed by our CA, but no principal
    make_cert(d, "rogue-ca", "eve")  # signed by another CA, CN of a real principal below
    return d


# -------------------------------------------------------------------- a coordinator


@dataclass
class Secured:
    address: str
    auth_file: Path
    tokens: dict[str, str]
    pki: Path
    etcd: EtcdServer

    def channel(self, cert: str | None = None, ca: str = "ca") -> grpc.aio.Channel:
        creds = grpc.ssl_channel_credentials(
            (self.pki / f"{ca}.crt").read_bytes(),
            (self.pki / f"{cert}.key").read_bytes() if cert else None,
            (self.pki / f"{cert}.crt").read_bytes() if cert else None,
        )
        return grpc.aio.secure_channel(self.address, creds)

    def key_count(self) -> int:
        out = self.etcd.etcdctl("get", "--prefix", "--keys-only", "/hvplace/v1/vms/")
        return len([line for line in out.splitlines() if line.strip()])


@asynccontextmanager
async def serving(
    etcd: EtcdServer, pki: Path, tmp_path: Path, mtls: bool
) -> AsyncIterator[Secured]:
    auth_file = tmp_path / "auth.toml"
    tokens = {
        "olga": auth.add_token(auth_file, "olga", auth.Role.OPERATOR),
        "victor": auth.add_token(auth_file, "victor", auth.Role.VIEWER),
        "old": auth.add_token(
            auth_file, "old", auth.Role.ADMIN, dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
        ),
    }
    with auth_file.open("a") as f:
        f.write('\n[[principal]]\nname = "alice"\nrole = "admin"\ncert_cn = "alice"\n')
        f.write('\n[[principal]]\nname = "eve"\nrole = "admin"\ncert_cn = "eve"\n')
    address = f"127.0.0.1:{free_port()}"
    cfg = config.validate(
        config.CoordinatorConfig(
            node_name="c1",
            etcd_endpoints=(etcd.endpoint,),
            listen=address,
            metrics_listen="",
            session_ttl_s=2,
            tls_cert=str(pki / "coordinator.crt"),
            tls_key=str(pki / "coordinator.key"),
            tls_client_ca=str(pki / "ca.crt") if mtls else "",
            auth_file=str(auth_file),
        )
    )
    store = await Store.connect([etcd.endpoint], timeout=5)
    await register(store, host("hv1"))
    try:
        async with Coordinator(cfg) as c:
            await eventually(lambda: c.election is not None and c.election.is_leader)
            yield Secured(address, auth_file, tokens, pki, etcd)
            await c.shutdown()
    finally:
        await store.close()


@pytest.fixture
async def secured(etcd: EtcdServer, pki: Path, tmp_path: Path) -> AsyncIterator[Secured]:
    """TLS with bearer tokens (no client CA)."""
    async with serving(etcd, pki, tmp_path, mtls=False) as s:
        yield s


@pytest.fixture
async def mtls(etcd: EtcdServer, pki: Path, tmp_path: Path) -> AsyncIterator[Secured]:
    """Every connection presents a certificate from the client CA."""
    async with serving(etcd, pki, tmp_path, mtls=True) as s:
        yield s


def _vm(name: str) -> pb.CreateVMsRequest:
    return pb.CreateVMsRequest(
        request_id=f"r-{name}",
        vms=[
            pb.VM(
                scope="acme",
                name=name,
                resources=pb.Resources(vcpus=1, memory_mib=256),
                image=pb.Image(kernel="/boot/vmlinuz"),
            )
        ],
    )


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


# -------------------------------------------------------------------- tests


def test_every_rpc_has_a_role() -> None:
    methods = {
        f"/{service.full_name}/{m.name}"
        for service in pb.DESCRIPTOR.services_by_name.values()
        for m in service.methods
    }
    assert methods == set(auth.METHOD_ROLES)


async def test_no_credentials_are_refused(secured: Secured) -> None:
    async with secured.channel() as ch:
        err = await refused(pb_grpc.VMServiceStub(ch).CreateVMs(_vm("a")))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        info = error_info(err)
        assert info is not None and info.reason == "forbidden"
        assert "no credentials" in (err.details() or "")
        # Probes need nothing.
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert secured.key_count() == 0


async def test_mtls_certificates(mtls: Secured) -> None:
    async with mtls.channel(cert="alice") as ch:  # a principal by certificate: admin
        reply = await pb_grpc.VMServiceStub(ch).CreateVMs(_vm("a-1"))
        assert reply.vms[0].spec.name == "a-1"
    async with mtls.channel(cert="mallory") as ch:  # our CA, but no principal
        err = await refused(pb_grpc.VMServiceStub(ch).ListVMs(pb.ListVMsRequest()))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "CN='mallory' is not a known principal" in (err.details() or "")
        # The health probe needs a certificate from the CA, no principal.
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # A token names the caller even over someone else's certificate.
        await pb_grpc.VMServiceStub(ch).ListVMs(
            pb.ListVMsRequest(), metadata=bearer(mtls.tokens["victor"])
        )
    for cert, ca in ((None, "ca"), ("eve", "rogue-ca"), ("eve", "ca")):
        # No certificate, or eve's (a principal by name) from another CA: no handshake.
        async with mtls.channel(cert=cert, ca=ca) as ch:
            err = await refused(pb_grpc.VMServiceStub(ch).CreateVMs(_vm("e"), timeout=5))
            assert err.code() == grpc.StatusCode.UNAVAILABLE, (cert, ca)
    assert mtls.key_count() == 1


async def test_roles_and_audit(secured: Secured, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hvplace.audit")
    async with secured.channel() as ch:
        vms = pb_grpc.VMServiceStub(ch)
        # A viewer reads but may not write.
        await vms.ListVMs(pb.ListVMsRequest(), metadata=bearer(secured.tokens["victor"]))
        err = await refused(vms.CreateVMs(_vm("v"), metadata=bearer(secured.tokens["victor"])))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "victor (viewer) may not call CreateVMs: it needs operator" in (err.details() or "")
        assert secured.key_count() == 0
        # An operator creates; the audit line says who, what, which objects, the result.
        reply = await vms.CreateVMs(_vm("web-1"), metadata=bearer(secured.tokens["olga"]))
        assert reply.vms[0].spec.name == "web-1"
        await refused(
            vms.DeleteVM(
                pb.DeleteVMRequest(scope="acme", name="nope"),
                metadata=bearer(secured.tokens["olga"]),
            )
        )
    lines = [r.getMessage() for r in caplog.records if r.name == "hvplace.audit"]
    assert any(
        '"who":"olga"' in line
        and '"method":"VMService/CreateVMs"' in line
        and '"objects":["acme/web-1"]' in line
        and '"result":"OK"' in line
        for line in lines
    ), lines
    assert any('"method":"VMService/DeleteVM"' in ln and '"result":"OK"' not in ln for ln in lines)
    assert not any("ListVMs" in line for line in lines)  # reads are not audited
    assert secured.key_count() == 1


async def test_only_an_admin_changes_the_image_catalogue(secured: Secured) -> None:
    image = pb.Image(name="tiny", disk="tiny.qcow2", disk_sha256="0" * 64)
    async with secured.channel() as ch:
        images = pb_grpc.ImageServiceStub(ch)
        for who, role in (("victor", "viewer"), ("olga", "operator")):
            err = await refused(images.AddImage(image, metadata=bearer(secured.tokens[who])))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert f"{who} ({role}) may not call AddImage: it needs admin" in (err.details() or "")
        listed = await images.ListImages(pb.Empty(), metadata=bearer(secured.tokens["victor"]))
        assert list(listed.images) == []
    assert secured.etcd.etcdctl("get", "--prefix", "--keys-only", "/hvplace/v1/images/") == ""


async def test_expired_and_revoked_tokens(secured: Secured) -> None:
    async with secured.channel() as ch:
        vms = pb_grpc.VMServiceStub(ch)
        err = await refused(
            vms.ListVMs(pb.ListVMsRequest(), metadata=bearer(secured.tokens["old"]))
        )
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token of old expired at" in (err.details() or "")
        err = await refused(vms.ListVMs(pb.ListVMsRequest(), metadata=bearer("guess")))
        assert "not valid (unknown or revoked)" in (err.details() or "")
        await vms.ListVMs(pb.ListVMsRequest(), metadata=bearer(secured.tokens["olga"]))
        # Revoke: remove olga's entry; the file is re-read on the next call.
        text = secured.auth_file.read_text()
        start = text.index('name = "olga"')
        block_start = text.rindex("[[principal]]", 0, start)
        block_end = text.index("[[principal]]", start)
        secured.auth_file.write_text(text[:block_start] + text[block_end:])
        err = await refused(
            vms.ListVMs(pb.ListVMsRequest(), metadata=bearer(secured.tokens["olga"]))
        )
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        await vms.ListVMs(pb.ListVMsRequest(), metadata=bearer(secured.tokens["victor"]))


async def test_cli_with_ca_and_token_file(secured: Secured, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    rc = await asyncio.to_thread(
        cli.main,
        ["auth", "add-token", "cli-op", "--role", "operator",
         "--auth-file", str(secured.auth_file), "--out", str(token_file)],
    )  # fmt: skip
    assert rc == 0 and oct(token_file.stat().st_mode & 0o777) == "0o600"
    base = ["--endpoint", secured.address, "--ca", str(secured.pki / "ca.crt")]
    rc = await asyncio.to_thread(
        cli.main,
        [
            *base,
            "--token-file",
            str(token_file),
            "vm",
            "create",
            "c-1",
            "--scope",
            "acme",
            "--kernel",
            "/boot/vmlinuz",
        ],
    )
    assert rc == 0 and secured.key_count() == 1
    rc = await asyncio.to_thread(
        cli.main, [*base, "vm", "create", "c-2", "--scope", "acme", "--kernel", "/boot/vmlinuz"]
    )
    assert rc == cli.EXIT_ERROR and secured.key_count() == 1


def test_config_refuses_an_api_nobody_can_authenticate_to(tmp_path: Path, pki: Path) -> None:
    with pytest.raises(InvalidInput, match="no way to authenticate callers"):
        config.load(None, env={})
    with pytest.raises(InvalidInput, match="tls_cert and tls_key go together"):
        config.load(None, env={}, overrides={"tls_cert": str(pki / "ca.crt"), "auth_file": "x"})
    bad = tmp_path / "auth.toml"
    bad.write_text('[[principal]]\nname = "x"\nrole = "root"\ntoken_sha256 = "00"\n')
    with pytest.raises(InvalidInput, match="role 'root' must be one of"):
        auth.load_principals(bad)
    assert config.load(None, env={}, overrides={"listen": "", "metrics_listen": ""}).listen == ""
