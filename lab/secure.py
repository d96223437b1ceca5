"""The lab's credentials: a CA and certificates (openssl), etcd's users (auth on), and the
coordinators' auth file with an admin token; all in <state dir>/secrets, private files 0600."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from hvplace.coordinator import auth, etcd_auth
from hvplace.proto.errors import HvplaceError

ROOT_USER = etcd_auth.ROOT_USER
COORDINATOR_USER = etcd_auth.COORDINATOR
agent_user = etcd_auth.agent_user


class SecureError(RuntimeError):
    pass


class Secrets:
    """Where each credential lives under one directory."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)

    ca = property(lambda self: self.dir / "ca.pem")
    etcd_cert = property(lambda self: self.dir / "etcd.pem")
    etcd_key = property(lambda self: self.dir / "etcd.key")
    api_cert = property(lambda self: self.dir / "api.pem")
    api_key = property(lambda self: self.dir / "api.key")
    root_password = property(lambda self: self.dir / "etcd-root.password")
    coordinator_password = property(lambda self: self.dir / "etcd-coordinator.password")
    auth_file = property(lambda self: self.dir / "auth.toml")
    admin_token = property(lambda self: self.dir / "admin.token")

    def agent_password(self, host: str) -> Path:
        return self.dir / f"etcd-agent-{host}.password"


def _private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def password(path: Path) -> str:
    """The password in `path`, or a new one written there (0600)."""
    if not path.exists():
        _private(path, etcd_auth.new_password() + "\n")
    return path.read_text().strip()


def make_certs(secrets: Secrets, etcd_addresses: list[str]) -> None:
    """A CA, etcd's server certificate (SANs: localhost, 127.0.0.1 and the bridge
    addresses agents dial) and the coordinators' API certificate (127.0.0.1). Kept when
    present: a restarted lab keeps trusting the same CA."""
    if secrets.ca.exists():
        return
    secrets.dir.mkdir(parents=True, exist_ok=True)
    os.chmod(secrets.dir, 0o700)

    def run(*args: str) -> None:
        out = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=secrets.dir)
        if out.returncode != 0:
            raise SecureError(f"openssl {args[0]}: {out.stderr.strip()[-500:]}")

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "3650",
        "-subj", "/CN=hvplace-lab-ca")  # fmt: skip
    ips = sorted({"127.0.0.1", *etcd_addresses})
    for name, sans in (("etcd", ips), ("api", ["127.0.0.1"])):
        ext = secrets.dir / f"{name}.ext"
        alt = ",".join(["DNS:localhost", *(f"IP:{ip}" for ip in sans)])
        ext.write_text(f"subjectAltName={alt}\nextendedKeyUsage=serverAuth,clientAuth\n")
        run("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN=hvplace-lab-{name}")  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "3650", "-extfile", str(ext))  # fmt: skip
    for private in secrets.dir.glob("*.key"):
        os.chmod(private, 0o600)


def _admin(
    secrets: Secrets, endpoint: str, work: Callable[[etcd_auth.EtcdAdmin], Awaitable[Any]]
) -> object:
    target = endpoint.removeprefix("https://")
    creds = grpc.ssl_channel_credentials(root_certificates=secrets.ca.read_bytes())

    async def run() -> object:
        async with grpc.aio.secure_channel(target, creds) as channel:
            return await work(etcd_auth.EtcdAdmin(channel))

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as e:
        raise SecureError(f"etcd {target}: {e.details()}") from None
    except HvplaceError as e:
        raise SecureError(f"etcd {target}: {e}") from None


def init_etcd_auth(secrets: Secrets, endpoint: str) -> None:
    """root and coordinator users, then auth on (idempotent: `hvplace etcd init-auth`)."""
    root, coordinator = password(secrets.root_password), password(secrets.coordinator_password)
    _admin(secrets, endpoint, lambda admin: etcd_auth.init_auth(admin, root, coordinator))


def add_agent(secrets: Secrets, endpoint: str, host: str) -> None:
    """agent-<host>: may write only that host's keys (`hvplace etcd add-agent`)."""
    root, mine = password(secrets.root_password), password(secrets.agent_password(host))
    _admin(secrets, endpoint, lambda admin: etcd_auth.add_agent(admin, root, host, mine))


def admin_token(secrets: Secrets) -> None:
    """The auth file with one admin principal, its token in admin.token (once)."""
    if secrets.admin_token.exists():
        return
    token = auth.add_token(secrets.auth_file, "lab-admin", auth.Role.ADMIN)
    _private(secrets.admin_token, token + "\n")
