"""Both daemons' one seam to etcd's gRPC API: the member list, a channel per member, and
moving to another member when the one in use fails (leases and watches carry over).

TLS (`https://` endpoints with `EtcdTLS` files) and etcd's user authentication
(`EtcdAuth`: a user and a password file; the token etcd issues rides on every call and is
renewed when etcd says it is invalid or expired) are built here.

A login is dear: etcd checks the password with bcrypt, and etcd 3.4 does so holding its
backend's write lock, so logins are served one at a time. After an etcd restart every
token is gone at once (simple tokens live in etcd's memory), and so is every token after
any change to users or roles (etcd answers "revision of auth store is old"). So a client
logs in once at a time whatever the number of calls waiting for it, lets that login run to
its end even when the call that started it gives up, and does not make a lease renewal
wait for it: etcd does not authenticate LeaseKeepAlive, and a renewal stuck behind a
login on a loaded etcd would fence the host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import grpc
from aetcd import rpc  # etcd's generated gRPC stubs, as aetcd ships them
from hvplace.proto.errors import InvalidInput, Unavailable
from hvplace.runtime.etcd_channel import RECONNECT_OPTIONS

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PORT = 2379
SCHEMES = ("http", "https")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_MAX_MESSAGE = 64 * 1024 * 1024

REQUIRE_LEADER = (("hasleader", "true"),)
"""etcd's `WithRequireLeader`: a member cut off from its cluster's leader ends our watch or
keepalive stream with UNAVAILABLE instead of keeping it open and silent, so we move on."""

_PAUSE_S = 0.02

LOGIN_TIMEOUT_S = 10.0
"""How long one login may take, whatever the deadline of the calls that wait for it: on a
busy etcd a bcrypt check can outlast a call's budget, and a login abandoned then (its
bcrypt already spent in etcd) and started again by the next call never ends."""

_MOVE_ON = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    # etcd answers "context deadline exceeded" with UNKNOWN when our deadline ran out
    # inside the member (waiting for its leader, say).
    grpc.StatusCode.UNKNOWN,
)
"""Failures of the member rather than of the request: try another member."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One etcd member's client URL: `http` or `https`, a host name or an IP literal, a port."""

    scheme: str
    host: str
    port: int

    @property
    def target(self) -> str:
        """The gRPC target (`host:port`, `[v6]:port`)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def secure(self) -> bool:
        return self.scheme == "https"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.target}"


def _bad(text: str, why: str) -> InvalidInput:
    return InvalidInput(f"etcd endpoint {text[:100]!r}: {why}")


def parse_endpoint(text: str) -> Endpoint:
    """`[http://|https://]host[:port]`, host a DNS name, an IPv4 address or a bracketed
    IPv6 address; the port defaults to 2379. Anything else is an InvalidInput naming it."""
    raw = text.strip()
    if not raw:
        raise InvalidInput("an etcd endpoint is empty")
    url_text = raw if "://" in raw else f"http://{raw}"
    try:
        url = urllib.parse.urlsplit(url_text)
        port = url.port
    except ValueError as e:
        raise _bad(raw, f"{e} (IPv6 addresses go in brackets: [::1]:2379)") from None
    if url.scheme not in SCHEMES:
        raise _bad(raw, f"the scheme must be http or https, not {url.scheme!r}")
    if url.username or url.password or url.query or url.fragment or url.path not in ("", "/"):
        raise _bad(raw, "must be scheme://host:port with nothing else")
    host = url.hostname or ""
    if not host:
        raise _bad(raw, "no host")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        labels = host.removesuffix(".").split(".")
        if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
            raise _bad(raw, "the host is neither a DNS name nor an IP address") from None
    if port == 0:
        raise _bad(raw, "port 0")
    return Endpoint(url.scheme, host, port or DEFAULT_PORT)


def parse_endpoints(texts: Sequence[str]) -> tuple[Endpoint, ...]:
    """Every member's endpoint, validated; one scheme for all, no member twice."""
    endpoints = tuple(parse_endpoint(t) for t in texts)
    if not endpoints:
        raise InvalidInput("no etcd endpoint given")
    if len({e.scheme for e in endpoints}) > 1:
        raise InvalidInput("etcd endpoints mix http:// and https://; use one scheme for all")
    seen: set[Endpoint] = set()
    for e in endpoints:
        if e in seen:
            raise InvalidInput(f"etcd endpoint {e} is listed twice")
        seen.add(e)
    return endpoints


@dataclass(frozen=True, slots=True)
class EtcdTLS:
    """Files for `https://` endpoints: the CA that signed etcd's certificate (default: the
    system's CAs), and a client certificate and key when etcd asks for one."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @property
    def configured(self) -> bool:
        return any((self.ca, self.cert, self.key))

    def check(self, endpoints: Sequence[Endpoint]) -> None:
        if (self.cert is None) != (self.key is None):
            raise InvalidInput("etcd_cert and etcd_key go together: give both or neither")
        if self.configured and not all(e.secure for e in endpoints):
            raise InvalidInput(
                "etcd_ca/etcd_cert/etcd_key are set: the etcd endpoints must be https://"
            )

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                return path.read_bytes()
            except OSError as e:
                raise InvalidInput(f"{what} {path}: {e.strerror}") from None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca, "etcd_ca"),
            private_key=read(self.key, "etcd_key"),
            certificate_chain=read(self.cert, "etcd_cert"),
        )


@dataclass(frozen=True, slots=True)
class EtcdAuth:
    """etcd's user authentication: `user` and the file holding its password (read at
    each login, so a changed password needs no restart)."""

    user: str = ""
    password_file: Path | None = None

    @property
    def configured(self) -> bool:
        return bool(self.user)

    def check(self) -> None:
        if bool(self.user) != (self.password_file is not None):
            raise InvalidInput("etcd_user and etcd_password_file go together")

    def password(self) -> str:
        assert self.password_file is not None
        try:
            text = self.password_file.read_text().strip()
        except OSError as e:
            raise InvalidInput(f"etcd_password_file {self.password_file}: {e.strerror}") from None
        if not text:
            raise InvalidInput(f"etcd_password_file {self.password_file} is empty")
        return text


_TOKEN_REFUSALS = ("invalid auth token", "revision of auth store is old", "user name is empty")


def _token_refused(e: grpc.aio.AioRpcError) -> bool:
    """etcd refused the auth token: expired, lost by a restarted member, issued before a
    change to users or roles (etcd's clientv3 logs in again for the same three errors)."""
    details = e.details() or ""
    return e.code() == grpc.StatusCode.UNAUTHENTICATED or any(
        why in details for why in _TOKEN_REFUSALS
    )


def _retrieve(task: asyncio.Future[None]) -> None:
    """A login nobody waits for any more still has its outcome read (no asyncio warning)."""
    if not task.cancelled():
        task.exception()


class Compacted(Exception):
    """The watch's start revision was compacted away; the caller must relist."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"etcd compacted the history up to revision {compact_revision}")
        self.compact_revision = compact_revision


class WatchEvent(NamedTuple):
    """One key's change (a named tuple: a watch of the keyspace makes one per write)."""

    type: str  # put | delete
    key: str
    value: bytes
    mod_revision: int


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """One watch response: `revision` is the highest revision the stream has shown
    (for a progress notification, etcd's revision with nothing missed below it)."""

    revision: int
    events: tuple[WatchEvent, ...]


class Member:
    """One member's channel and stubs, made on first use and kept for the client's life
    (gRPC reconnects it in the background, so moving back to it later is instant)."""

    def __init__(
        self, index: int, endpoint: Endpoint, credentials: grpc.ChannelCredentials | None
    ) -> None:
        self.index = index
        self.endpoint = endpoint
        options = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", _MAX_MESSAGE),
            # Finds a member that went silent (host down, network cut) under an idle watch.
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            *RECONNECT_OPTIONS,
        ]
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(endpoint.target, options=options)
        else:
            self.channel = grpc.aio.secure_channel(endpoint.target, credentials, options=options)
        self.kv: Any = rpc.KVStub(self.channel)
        self.lease: Any = rpc.LeaseStub(self.channel)
        self.watch: Any = rpc.WatchStub(self.channel)
        self.auth: Any = rpc.AuthStub(self.channel)


class TooLarge(Unavailable):
    """RESOURCE_EXHAUSTED: a message over the size either side takes (a range's answer over
    this client's cap, a request over etcd's), or etcd's "too many requests". A smaller
    request may pass: a listing asks again for fewer keys."""


def _error_text(e: grpc.aio.AioRpcError) -> str:
    return f"{e.code().name} {e.details() or ''}".strip()


def _never_sent(e: grpc.aio.AioRpcError) -> bool:
    """The call failed while connecting, so the member never saw it: safe to send
    elsewhere even when it is not idempotent (etcd's clientv3 retries the same case)."""
    details = (e.details() or "").lower()
    return e.code() is grpc.StatusCode.UNAVAILABLE and (
        "failed to connect" in details or "connection refused" in details
    )


class EtcdClient:
    """Every configured member; calls go to the current one and move to the next when it
    fails (UNAVAILABLE, DEADLINE_EXCEEDED). Each call is bounded by its own timeout,
    failover included; errors surface as `Unavailable`."""

    def __init__(
        self,
        endpoints: Sequence[str | Endpoint],
        *,
        tls: EtcdTLS | None = None,
        auth: EtcdAuth | None = None,
    ) -> None:
        self.endpoints = parse_endpoints([str(e) for e in endpoints])
        tls = tls or EtcdTLS()
        tls.check(self.endpoints)
        self._auth = auth if auth is not None and auth.configured else None
        if self._auth is not None:
            self._auth.check()
        self.logins = 0
        self._credentials = tls.credentials() if self.endpoints[0].secure else None
        self._members: list[Member | None] = [None] * len(self.endpoints)
        self._current = 0
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._login_task: asyncio.Future[None] | None = None
        self._login_member = -1
        self.failovers = 0
        self._failing: set[int] = set()

    @property
    def logged_in(self) -> bool:
        """A token is held (always true without auth)."""
        return self._auth is None or bool(self._metadata)

    @property
    def current(self) -> Endpoint:
        """The member calls go to now."""
        return self.endpoints[self._current]

    def _member(self, index: int) -> Member:
        member = self._members[index]
        if member is None:
            member = self._members[index] = Member(index, self.endpoints[index], self._credentials)
        return member

    def member_failed(self, index: int, why: str) -> None:
        """Calls move to the next member, unless another failure already moved them."""
        if index != self._current:
            return
        self._current = (index + 1) % len(self.endpoints)
        self.failovers += 1
        if index not in self._failing:  # once per outage, not once per retry
            self._failing.add(index)
            log.warning(
                "etcd member %s failed (%s); using %s",
                self.endpoints[index],
                why[:200],
                self.endpoints[self._current],
            )

    async def run(
        self,
        attempt: Callable[[Member, float], Awaitable[T]],
        *,
        timeout_s: float,
        idempotent: bool = True,
        token: bool = True,
    ) -> T:
        """`attempt(member, seconds)` on the current member, then on the next ones in turn
        while the member is at fault and `timeout_s` lasts (a leader election makes every
        member refuse for a moment: going round again finds the one that answers first).
        A call that is not idempotent moves on only when the failed member never got it.
        `token=False`: etcd does not check a token on this call; it goes with the token
        held, if any, and waits for no login unless etcd refuses it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        several = len(self.endpoints) > 1
        last = "no member tried"
        relogged = False
        needs_token = token
        while (left := deadline - loop.time()) > 0:
            index = self._current
            # Leave time for another member should this one hang rather than refuse.
            budget = max(left / 2, min(left, 0.2)) if idempotent and several else left
            started = loop.time()
            sent = self._metadata
            try:
                if self._auth is not None and needs_token and not self._metadata:
                    await self._logged_in(index, budget)
                sent = self._metadata
                result = await attempt(
                    self._member(index), max(0.0, started + budget - loop.time())
                )
                self._failing.discard(index)
                return result
            except grpc.aio.AioRpcError as e:
                last = f"{self.endpoints[index]}: {_error_text(e)}"
                if self._auth is not None and _token_refused(e) and not relogged:
                    # A refused token was not applied: log in again and retry, once. Only
                    # the token this call sent is dropped; another call may hold a new one.
                    relogged = needs_token = True
                    if self._metadata is sent:
                        self._metadata = ()
                    continue
                if e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise TooLarge(f"etcd: {last}") from None
                if e.code() not in _MOVE_ON:
                    raise Unavailable(f"etcd: {last}") from None
                self.member_failed(index, _error_text(e))
                if not idempotent and not _never_sent(e):
                    break
            except TimeoutError:
                last = f"{self.endpoints[index]}: no answer in {budget:.2f}s"
                self.member_failed(index, "timeout")
                if not idempotent:
                    break
            if loop.time() - started < _PAUSE_S and self._current in self._failing:
                # A refused connection fails at once: do not spin over dead members.
                await asyncio.sleep(min(_PAUSE_S, max(0.0, deadline - loop.time())))
        raise Unavailable(f"etcd: {last}")

    async def _logged_in(self, index: int, seconds: float) -> None:
        """Wait up to `seconds` for a token: from the login in flight on member `index`,
        else from a new one there. The login goes on when the wait ends, up to
        LOGIN_TIMEOUT_S, so the next call finds its token."""
        task = self._login_task
        if task is None or task.done() or self._login_member != index:
            task = self._login_task = asyncio.ensure_future(self._login(self._member(index)))
            task.add_done_callback(_retrieve)
            self._login_member = index
        await asyncio.wait_for(asyncio.shield(task), seconds)

    async def _login(self, member: Member) -> None:
        assert self._auth is not None
        try:
            reply = await member.auth.Authenticate(
                rpc.AuthenticateRequest(name=self._auth.user, password=self._auth.password()),
                timeout=LOGIN_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as e:
            if e.code() in _MOVE_ON:
                raise
            raise Unavailable(f"etcd refused user {self._auth.user!r}: {_error_text(e)}") from None
        self._metadata = (("token", str(reply.token)),)
        self.logins += 1

    async def unary(
        self,
        method: Callable[[Member], Any],
        request: Any,
        *,
        timeout_s: float,
        idempotent: bool = True,
    ) -> Any:
        """One unary RPC: `method` picks it from a member's stubs (`lambda m: m.kv.Range`)."""

        async def attempt(member: Member, seconds: float) -> Any:
            return await method(member)(request, timeout=seconds, metadata=self._metadata)

        return await self.run(attempt, timeout_s=timeout_s, idempotent=idempotent)

    # etcd's RPCs both daemons use; whether each may be re-sent to another member after
    # an ambiguous failure is decided here, once. A Txn is not re-sent: it may have been
    # applied, and the caller's compares decide what to do on a fresh read.

    async def range(self, request: Any, *, timeout_s: float) -> Any:
        return await self.unary(lambda m: m.kv.Range, request, timeout_s=timeout_s)

    async def txn(self, request: Any, *, timeout_s: float) -> Any:
        return await self.unary(lambda m: m.kv.Txn, request, timeout_s=timeout_s, idempotent=False)

    async def put(self, request: Any, *, timeout_s: float) -> Any:
        """A plain put is idempotent in effect: re-sending it writes the same value."""
        return await self.unary(lambda m: m.kv.Put, request, timeout_s=timeout_s)

    async def delete_range(self, request: Any, *, timeout_s: float) -> Any:
        return await self.unary(lambda m: m.kv.DeleteRange, request, timeout_s=timeout_s)

    async def compact(self, request: Any, *, timeout_s: float) -> Any:
        return await self.unary(
            lambda m: m.kv.Compact, request, timeout_s=timeout_s, idempotent=False
        )

    async def lease_grant(self, request: Any, *, timeout_s: float) -> Any:
        # Not re-sent: a second grant would leave an orphan lease until its TTL ends.
        return await self.unary(
            lambda m: m.lease.LeaseGrant, request, timeout_s=timeout_s, idempotent=False
        )

    async def lease_revoke(self, request: Any, *, timeout_s: float) -> Any:
        return await self.unary(lambda m: m.lease.LeaseRevoke, request, timeout_s=timeout_s)

    async def keepalive(self, lease_id: int, *, timeout_s: float) -> int:
        """Renew a lease once (on whichever member answers: leases live in the cluster);
        the remaining TTL in seconds, 0 when etcd no longer has the lease."""

        async def attempt(member: Member, seconds: float) -> int:
            call = member.lease.LeaseKeepAlive(
                iter([rpc.LeaseKeepAliveRequest(ID=lease_id)]),
                timeout=seconds,
                metadata=self._metadata + REQUIRE_LEADER,
            )
            async for reply in call:
                return int(reply.TTL)
            return 0

        # etcd (3.4, 3.5) checks no token on LeaseKeepAlive; were one to refuse it, the
        # renewal would log in like any other call.
        return await self.run(attempt, timeout_s=timeout_s, token=False)

    async def watch(
        self, key: bytes, range_end: bytes, start_revision: int, *, timeout_s: float
    ) -> WatchStream:
        """A watch from `start_revision` (0: from now) on the first member that creates it."""

        async def attempt(member: Member, seconds: float) -> WatchStream:
            stream = WatchStream(self, member, key, range_end, start_revision)
            try:
                await asyncio.wait_for(stream.start(), seconds)
            except BaseException:
                await stream.close()
                raise
            return stream

        return await self.run(attempt, timeout_s=timeout_s)

    async def close(self) -> None:
        if self._login_task is not None:
            self._login_task.cancel()
        members, self._members = self._members, [None] * len(self.endpoints)
        for member in members:
            if member is not None:
                await member.channel.close(None)


class WatchStream:
    """One etcd watch; iterate for WatchBatch. Raises Compacted when the history is gone,
    Unavailable when the stream breaks (its member is then marked failed: reopen from the
    last revision seen + 1 and the next member carries on). `revision` is the last
    revision this stream has shown; `request_progress()` asks etcd to advance it."""

    def __init__(
        self,
        client: EtcdClient,
        member: Member,
        key: bytes,
        range_end: bytes,
        start_revision: int,
    ) -> None:
        self._client = client
        self._index = member.index
        self._member = member
        self._requests: asyncio.Queue[Any] = asyncio.Queue()
        self._key = key
        self._range_end = range_end
        self._start = start_revision
        self._call: Any = None
        self._responses: AsyncIterator[Any] | None = None
        self.revision = max(0, start_revision - 1)

    @property
    def endpoint(self) -> Endpoint:
        return self._member.endpoint

    async def _request_iter(self) -> AsyncIterator[Any]:
        while True:
            req = await self._requests.get()
            if req is None:
                return
            yield req

    async def start(self) -> None:
        create = rpc.WatchCreateRequest(
            key=self._key,
            range_end=self._range_end,
            start_revision=self._start,
            progress_notify=True,
        )
        self._requests.put_nowait(rpc.WatchRequest(create_request=create))
        self._call = self._member.watch.Watch(
            self._request_iter(), metadata=self._client._metadata + REQUIRE_LEADER
        )
        self._responses = self._call.__aiter__()
        try:
            first = await self._responses.__anext__()
        except StopAsyncIteration:
            raise Unavailable("etcd closed the watch stream") from None
        if first.compact_revision:
            raise Compacted(int(first.compact_revision))
        if not first.created:
            raise Unavailable("etcd did not create the watch")
        if not self._start:
            self.revision = int(first.header.revision)

    async def _next(self) -> Any:
        assert self._responses is not None
        try:
            return await self._responses.__anext__()
        except StopAsyncIteration:
            why = "etcd closed the watch stream"
        except grpc.aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.CANCELLED:
                raise Unavailable("the watch was closed") from None
            why = f"etcd watch: {_error_text(e)}"
        self._client.member_failed(self._index, why)
        raise Unavailable(f"{why} ({self.endpoint})")

    def request_progress(self) -> None:
        self._requests.put_nowait(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))

    def __aiter__(self) -> WatchStream:
        return self

    async def __anext__(self) -> WatchBatch:
        resp = await self._next()
        if resp.compact_revision:
            raise Compacted(int(resp.compact_revision))
        if resp.canceled:
            why = f"etcd canceled the watch: {resp.cancel_reason}"
            self._client.member_failed(self._index, why)
            raise Unavailable(why)
        delete = rpc.Event.DELETE
        events = tuple(
            WatchEvent(
                "delete" if e.type == delete else "put",
                (kv := e.kv).key.decode(),
                kv.value,
                kv.mod_revision,
            )
            for e in resp.events
        )
        revision = events[-1].mod_revision if events else int(resp.header.revision)
        self.revision = max(self.revision, revision)
        return WatchBatch(revision=revision, events=events)

    async def close(self) -> None:
        self._requests.put_nowait(None)
        if self._call is not None:
            self._call.cancel()
