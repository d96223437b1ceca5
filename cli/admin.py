"""Local administration, no coordinator called: `hvplace auth add-token` (edits the
coordinator's auth file) and `hvplace etcd init-auth|add-agent` (etcd's own auth)."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from hvplace.cli.client import Client
from hvplace.proto.errors import InvalidInput, Unavailable


def cmd_auth_add_token(_c: Client | None, args: argparse.Namespace) -> None:
    from hvplace.coordinator import auth

    expires = None
    if args.expires_days is not None:
        if not 0 < args.expires_days <= 3650:
            raise InvalidInput("--expires-days must be between 0 and 3650")
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=args.expires_days)
    token = auth.add_token(
        Path(args.auth_file), args.name, auth.Role.parse(args.role, "--role"), expires
    )
    if args.out:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        print(f"token for {args.name} ({args.role}) written to {args.out}", file=sys.stderr)
    else:
        print(token)


def _add_etcd_admin(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--etcd",
        default=os.environ.get("ETCDCTL_ENDPOINTS", "127.0.0.1:2379"),
        help="etcd endpoint host:port (default: $ETCDCTL_ENDPOINTS or %(default)s)",
    )
    p.add_argument(
        "--root-password-file",
        required=True,
        help="etcd root's password (created with a new one, 0600, if absent)",
    )
    p.add_argument(
        "--etcd-ca",
        default=os.environ.get("ETCDCTL_CACERT", ""),
        help="CA of etcd's certificate, for an https:// endpoint (default: $ETCDCTL_CACERT)",
    )
    p.add_argument("--etcd-cert", default=os.environ.get("ETCDCTL_CERT", ""))
    p.add_argument("--etcd-key", default=os.environ.get("ETCDCTL_KEY", ""))


def _password(path: str) -> str:
    """The password in `path`, or a new one written there (0600) if the file is absent."""
    from hvplace.coordinator.etcd_auth import new_password

    file = Path(path)
    if file.exists():
        text = file.read_text().strip()
        if not text:
            raise InvalidInput(f"password file {path} is empty")
        return text
    password = new_password()
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password


def _etcd_admin(args: argparse.Namespace, work: Callable[[Any], Any]) -> Any:
    import asyncio

    from hvplace.coordinator.etcd_auth import EtcdAdmin

    endpoint = args.etcd.split(",")[0]
    target = endpoint.removeprefix("http://").removeprefix("https://")
    secure = endpoint.startswith("https://") or bool(args.etcd_ca)
    ca = Path(args.etcd_ca).read_bytes() if args.etcd_ca else None
    key = Path(args.etcd_key).read_bytes() if args.etcd_key else None
    cert = Path(args.etcd_cert).read_bytes() if args.etcd_cert else None

    async def run() -> Any:
        if secure:
            credentials = grpc.ssl_channel_credentials(ca, key, cert)
            channel = grpc.aio.secure_channel(target, credentials)
        else:
            channel = grpc.aio.insecure_channel(target)
        async with channel:
            return await work(EtcdAdmin(channel))

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as e:
        raise Unavailable(f"etcd {target}: {e.details()}") from None


def cmd_etcd_init_auth(_c: Client | None, args: argparse.Namespace) -> None:
    from hvplace.coordinator.etcd_auth import init_auth

    root, coordinator = (
        _password(args.root_password_file),
        _password(args.coordinator_password_file),
    )
    already = _etcd_admin(args, lambda admin: init_auth(admin, root, coordinator))
    print("etcd auth " + ("was on; users and roles checked" if already else "is on now"))


def cmd_etcd_add_agent(_c: Client | None, args: argparse.Namespace) -> None:
    from hvplace.coordinator.etcd_auth import add_agent, agent_user

    agent_user(args.host)  # a bad host name is refused before any file is written
    root, password = _password(args.root_password_file), _password(args.password_file)
    user = _etcd_admin(args, lambda admin: add_agent(admin, root, args.host, password))
    print(f"etcd user {user}: may write only {args.host}'s keys; password in {args.password_file}")


def register(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    auth = top.add_parser(
        "auth", help="credentials for the API (local: edits the coordinator's auth file)"
    ).add_subparsers(dest="cmd", required=True)
    p = auth.add_parser(
        "add-token", help="add a principal with a new bearer token; prints the token once"
    )
    p.add_argument("name", help="who the token is for (shown in audit lines)")
    p.add_argument("--role", choices=["admin", "operator", "viewer"], required=True)
    p.add_argument(
        "--auth-file",
        default=os.environ.get("HVPLACE_AUTH_FILE", "/etc/hvplace/auth.toml"),
        help="the coordinator's auth_file (default: $HVPLACE_AUTH_FILE or %(default)s)",
    )
    p.add_argument("--expires-days", type=float, help="the token expires after this many days")
    p.add_argument("--out", help="write the token to this file (0600) instead of stdout")
    p.set_defaults(func=cmd_auth_add_token, local=True)
    etcd = top.add_parser(
        "etcd", help="etcd's own auth for hvplace (local: talks to etcd, not a coordinator)"
    ).add_subparsers(dest="cmd", required=True)
    p = etcd.add_parser(
        "init-auth",
        help="idempotently create the root and coordinator users and roles, then turn auth on",
    )
    _add_etcd_admin(p)
    p.add_argument(
        "--coordinator-password-file",
        required=True,
        help="the coordinator user's password (created with a new one, 0600, if absent)",
    )
    p.set_defaults(func=cmd_etcd_init_auth, local=True)
    p = etcd.add_parser(
        "add-agent",
        help="create or update agent-HOST: may write only HOST's keys, read its assignments",
    )
    p.add_argument("host")
    _add_etcd_admin(p)
    p.add_argument(
        "--password-file",
        required=True,
        help="the agent user's password (created with a new one, 0600, if absent)",
    )
    p.set_defaults(func=cmd_etcd_add_agent, local=True)
