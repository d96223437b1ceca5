"""Who may call the API: callers are authenticated by client certificate (mTLS) or bearer
token, authorised by role in one server interceptor, and every mutating call is audited."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, NoReturn

import grpc
from google.protobuf.message import Message
from hvplace.coordinator.errors_grpc import rich_status
from hvplace.proto.errors import Forbidden, HvplaceError, InvalidInput, Unauthenticated
from hvplace.proto.names import check_name

log = logging.getLogger(__name__)
audit_log = logging.getLogger("hvplace.audit")

Ctx = grpc.aio.ServicerContext[Any, Any]


class Role(IntEnum):
    """Each role may do what the roles below it may."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @classmethod
    def parse(cls, text: str, where: str) -> Role:
        try:
            return cls[text.upper()]
        except KeyError:
            raise InvalidInput(
                f"{where}: role {text[:40]!r} must be one of admin, operator, viewer"
            ) from None


_V, _O, _A = Role.VIEWER, Role.OPERATOR, Role.ADMIN
_PKG = "/hvplace.v1."
METHOD_ROLES: Mapping[str, Role] = {
    f"{_PKG}VMService/CreateVMs": _O,
    f"{_PKG}VMService/GetVM": _V,
    f"{_PKG}VMService/ListVMs": _V,
    f"{_PKG}VMService/DeleteVM": _O,
    f"{_PKG}VMService/StartVM": _O,
    f"{_PKG}VMService/StopVM": _O,
    f"{_PKG}VMService/ExplainVM": _V,
    f"{_PKG}VMService/LabelVM": _O,
    f"{_PKG}RuleService/CreateRule": _O,
    f"{_PKG}RuleService/GetRule": _V,
    f"{_PKG}RuleService/ListRules": _V,
    f"{_PKG}RuleService/UpdateRule": _O,
    f"{_PKG}RuleService/DeleteRule": _O,
    f"{_PKG}RuleService/SetScopePolicy": _O,
    f"{_PKG}RuleService/GetScopePolicy": _V,
    f"{_PKG}HostService/ListHosts": _V,
    f"{_PKG}HostService/GetHost": _V,
    f"{_PKG}HostService/CordonHost": _O,
    f"{_PKG}HostService/UncordonHost": _O,
    f"{_PKG}HostService/DrainHost": _O,
    f"{_PKG}MaintenanceService/MigrateVM": _O,
    f"{_PKG}MaintenanceService/Drain": _O,
    f"{_PKG}HostService/LabelHost": _O,
    f"{_PKG}ClusterService/GetClusterStatus": _V,
    f"{_PKG}ClusterService/WatchEvents": _V,
    f"{_PKG}ClusterService/Simulate": _V,
    f"{_PKG}ClusterService/CheckAdmission": _V,
    f"{_PKG}ClusterService/PreviewRebalance": _V,
    f"{_PKG}ClusterService/Rebalance": _O,
    f"{_PKG}ImageService/AddImage": _A,
    f"{_PKG}ImageService/GetImage": _V,
    f"{_PKG}ImageService/ListImages": _V,
    f"{_PKG}ImageService/DeleteImage": _A,
}
"""The role each RPC needs. A method missing here needs `admin` (fail closed); a test
checks that every RPC of the proto has an entry."""

MUTATING: frozenset[str] = frozenset(m for m, r in METHOD_ROLES.items() if r >= Role.OPERATOR)
"""Calls that change state and leave an audit line (reads and what-ifs do not)."""

OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
"""Probes and reflection stay reachable without credentials."""

MAX_TOKEN = 512


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: Role
    token_sha256: str = ""
    cert_cn: str = ""
    expires: float | None = None
    """Unix time after which the token is refused; None: no expiry."""


@dataclass(frozen=True, slots=True)
class Caller:
    name: str
    role: Role
    via: str  # "token", "certificate" or "anonymous"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_principals(path: Path) -> list[Principal]:
    """The auth file: a TOML list of `[[principal]]` with name, role, and token_sha256
    and/or cert_cn (and an optional `expires` datetime for the token)."""
    where = f"auth file {path}"
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise InvalidInput(f"{where}: cannot read it: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidInput(f"{where}: not valid TOML: {e}") from None
    unknown = set(raw) - {"principal"}
    if unknown:
        raise InvalidInput(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    entries = raw.get("principal", [])
    if not isinstance(entries, list):
        raise InvalidInput(f"{where}: `principal` must be an array of tables ([[principal]])")
    result: list[Principal] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        at = f"{where}: principal #{i + 1}"
        if not isinstance(entry, dict):
            raise InvalidInput(f"{at} must be a table")
        bad = set(entry) - {"name", "role", "token_sha256", "cert_cn", "expires"}
        if bad:
            raise InvalidInput(f"{at}: unknown key(s) {', '.join(sorted(bad))}")
        name = check_name(str(entry.get("name", "")), f"{at} name")
        if name in seen:
            raise InvalidInput(f"{at}: name {name!r} appears twice")
        seen.add(name)
        role = Role.parse(str(entry.get("role", "")), at)
        digest = str(entry.get("token_sha256", "")).lower()
        if digest and (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
            raise InvalidInput(f"{at}: token_sha256 must be 64 hex digits")
        cn = str(entry.get("cert_cn", ""))
        if cn:
            check_name(cn, f"{at} cert_cn")
        if not digest and not cn:
            raise InvalidInput(f"{at}: give token_sha256 or cert_cn (or both)")
        expires = entry.get("expires")
        when: float | None = None
        if isinstance(expires, dt.datetime):
            if expires.tzinfo is None:
                expires = expires.replace(tzinfo=dt.UTC)
            when = expires.timestamp()
        elif expires is not None:
            raise InvalidInput(f"{at}: expires must be a TOML datetime (2027-01-31T00:00:00Z)")
        result.append(Principal(name, role, digest, cn, when))
    return result


@dataclass
class Authenticator:
    """Maps a call's credentials to a caller. The auth file is re-read when it changes, so
    a revoked token (its entry removed) is refused from the next call on."""

    auth_file: Path | None = None
    anonymous_role: Role | None = None
    clock: Callable[[], float] = time.time
    _stamp: tuple[int, int, int] | None = field(default=None, init=False)
    _by_token: dict[str, Principal] = field(default_factory=dict, init=False)
    _by_cn: dict[str, Principal] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.auth_file is not None:
            self._reload(force=True)

    def _reload(self, force: bool = False) -> None:
        assert self.auth_file is not None
        try:
            st = self.auth_file.stat()
        except OSError:
            if force:
                raise InvalidInput(f"auth file {self.auth_file} does not exist") from None
            # Gone: nobody authenticates by it any more (fail closed).
            self._stamp, self._by_token, self._by_cn = None, {}, {}
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp and not force:
            return
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO) & ~stat.S_IRGRP:
            log.warning("auth file %s is writable or readable by others", self.auth_file)
        try:
            principals = load_principals(self.auth_file)
        except InvalidInput:
            if force:
                raise
            log.exception("auth file %s is invalid; keeping the previous one", self.auth_file)
            return
        self._stamp = stamp
        self._by_token = {p.token_sha256: p for p in principals if p.token_sha256}
        self._by_cn = {p.cert_cn: p for p in principals if p.cert_cn}

    def authenticate(self, token: str | None, cert_cn: str | None) -> Caller:
        if self.auth_file is not None:
            self._reload()
        if token is not None:
            if len(token) > MAX_TOKEN:
                raise Unauthenticated("the bearer token is too long")
            digest = token_digest(token)
            found = next(
                (p for d, p in self._by_token.items() if hmac.compare_digest(d, digest)), None
            )
            if found is None:
                raise Unauthenticated("the bearer token is not valid (unknown or revoked)")
            if found.expires is not None and self.clock() >= found.expires:
                when = dt.datetime.fromtimestamp(found.expires, dt.UTC).isoformat()
                raise Unauthenticated(f"the bearer token of {found.name} expired at {when}")
            return Caller(found.name, found.role, "token")
        if cert_cn is not None:
            principal = self._by_cn.get(cert_cn)
            if principal is None:
                raise Unauthenticated(
                    f"client certificate CN={cert_cn[:64]!r} is not a known principal"
                )
            return Caller(principal.name, principal.role, "certificate")
        if self.anonymous_role is not None:
            return Caller("anonymous", self.anonymous_role, "anonymous")
        raise Unauthenticated(
            "no credentials: present a client certificate or an `authorization: Bearer` token"
        )


def authorize(caller: Caller, method: str) -> None:
    needed = METHOD_ROLES.get(method, Role.ADMIN)
    if caller.role < needed:
        raise Forbidden(
            f"{caller.name} ({caller.role.name.lower()}) may not call"
            f" {method.rsplit('/', 1)[-1]}: it needs {needed.name.lower()}"
        )


def _bearer(context: Ctx) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("the authorization header must be `Bearer <token>`")
            return token.strip()
    return None


def _cert_cn(context: Ctx) -> str | None:
    # Present only when TLS verified the peer's certificate against the client CA.
    names = list(context.auth_context().get("x509_common_name") or ())
    if not names:
        return None
    first: bytes | str = names[0]
    return first.decode(errors="replace") if isinstance(first, bytes) else str(first)


def objects_of(request: Message, limit: int = 20) -> list[str]:
    """The objects a request names, for the audit line: `scope/name` or `name`."""
    found: list[str] = []

    def one(msg: Message) -> None:
        fields = {f.name: v for f, v in msg.ListFields()}
        name = fields.get("name")
        if isinstance(name, str) and name:
            scope = fields.get("scope")
            found.append(f"{scope}/{name}" if isinstance(scope, str) and scope else name)

    one(request)
    more = 0
    for fd, value in request.ListFields():
        if fd.message_type is None:
            continue
        if isinstance(value, Message):
            one(value)
        else:  # a repeated message field: past the limit, only counted (500 VMs a create)
            for n, item in enumerate(value):
                if len(found) > limit:
                    more += sum(1 for rest in value[n:] if getattr(rest, "name", ""))
                    break
                if isinstance(item, Message):
                    one(item)
    if len(found) > limit:
        more += len(found) - limit
        found = found[:limit]
    if more:
        found.append(f"... {more} more")
    return found


def audit(caller: Caller, method: str, request: Message, result: str) -> None:
    audit_log.info(
        "audit %s",
        json.dumps(
            {
                "who": caller.name,
                "role": caller.role.name.lower(),
                "via": caller.via,
                "method": method.removeprefix(_PKG),
                "objects": objects_of(request),
                "result": result,
            },
            separators=(",", ":"),
        ),
    )


async def _refuse(context: Ctx, err: HvplaceError) -> NoReturn:
    await context.abort_with_status(rich_status(err))  # type: ignore[attr-defined]
    raise AssertionError("abort_with_status returned")


def _result_of(context: Ctx) -> str:
    code = context.code()
    return "OK" if code in (None, grpc.StatusCode.OK) else str(getattr(code, "name", code))


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authenticates and authorises every hvplace RPC; audits the mutating ones."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        # The stubs type handlers for the sync server; these behaviours are coroutines.
        handler: Any = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        auth = self.authenticator

        async def admit(context: Ctx) -> Caller:
            try:
                caller = auth.authenticate(_bearer(context), _cert_cn(context))
                authorize(caller, method)
            except HvplaceError as e:
                log.warning("refused %s: %s", method, e)
                await _refuse(context, e)
            return caller

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Message, context: Ctx) -> Any:
                caller = await admit(context)
                if method not in MUTATING:
                    return await inner(request, context)
                try:
                    reply = await inner(request, context)
                except BaseException:
                    audit(caller, method, request, _result_of(context) or "error")
                    raise
                audit(caller, method, request, "OK")
                return reply

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Message, context: Ctx) -> AsyncIterator[Any]:
                await admit(context)
                async for item in inner_stream(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # no client-streaming RPCs exist


@dataclass(frozen=True, slots=True)
class ServerTLS:
    cert: bytes
    key: bytes
    client_ca: bytes | None

    @classmethod
    def load(cls, cert: str, key: str, client_ca: str) -> ServerTLS:
        def read(path: str, what: str) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as e:
                raise InvalidInput(f"{what} {path}: cannot read it: {e.strerror}") from None

        return cls(
            read(cert, "tls_cert"),
            read(key, "tls_key"),
            read(client_ca, "tls_client_ca") if client_ca else None,
        )

    def credentials(self) -> grpc.ServerCredentials:
        # gRPC either requires and verifies a client certificate or never asks for one
        # (no "verify if given"): with a client CA every connection needs a certificate
        # from it (probes too; health then needs no principal), without one callers
        # authenticate by token over server-side TLS.
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


def new_token() -> str:
    return secrets.token_urlsafe(32)


def add_token(auth_file: Path, name: str, role: Role, expires: dt.datetime | None = None) -> str:
    """Append a principal with a new token to the auth file (created 0600); the token is
    returned once and only its SHA-256 is stored."""
    check_name(name, "principal name")
    if auth_file.exists() and any(p.name == name for p in load_principals(auth_file)):
        raise InvalidInput(f"auth file {auth_file}: principal {name!r} exists already")
    token = new_token()
    lines = [
        "",
        "[[principal]]",
        f'name = "{name}"',
        f'role = "{role.name.lower()}"',
        f'token_sha256 = "{token_digest(token)}"',
    ]
    if expires is not None:
        lines.append(f"expires = {expires.astimezone(dt.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}")
    fd = os.open(auth_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write("\n".join(lines) + "\n")
    return token
