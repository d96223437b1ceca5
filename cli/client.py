"""The CLI's gRPC client: credentials, and one call tried on each endpoint in turn.

Endpoints come from --endpoint or HVPLACE_ENDPOINT (comma-separated); each is tried in
turn and one that answers "not the leader" or cannot be reached passes to the next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message
from hvplace.coordinator.errors_grpc import error_from_rpc
from hvplace.proto.errors import HvplaceError, InvalidInput, NotLeader, Unavailable, Unreachable
from hvplace.proto.v1 import hvplace_pb2_grpc as pb_grpc

DEFAULT_ENDPOINT = "127.0.0.1:7400"
TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Credentials:
    """How the CLI proves who it is: a CA to trust the coordinator's TLS certificate, a
    client certificate and key (mTLS), and/or a bearer token."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    token: str | None = None

    @classmethod
    def load(cls, ca: str, cert: str, key: str, token_file: str) -> Credentials:
        def read(path: str, what: str) -> bytes | None:
            if not path:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as e:
                raise InvalidInput(f"{what} {path}: cannot read it: {e.strerror}") from None

        if bool(cert) != bool(key):
            raise InvalidInput("--cert and --key go together")
        if cert and not ca:
            raise InvalidInput("a client certificate needs TLS: give --ca too")
        raw = read(token_file, "--token-file")
        token = raw.decode(errors="replace").strip() if raw is not None else None
        if raw is not None and not token:
            raise InvalidInput(f"--token-file {token_file}: the file is empty")
        return cls(read(ca, "--ca"), read(cert, "--cert"), read(key, "--key"), token)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


class Client:
    """Calls one RPC on the first endpoint that is reachable and leads (for writes)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        timeout: float = TIMEOUT_S,
        credentials: Credentials | None = None,
    ) -> None:
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self.credentials = credentials or Credentials()
        self._metadata = self.credentials.metadata()
        self._channels: dict[str, grpc.Channel] = {}

    def _channel(self, endpoint: str) -> grpc.Channel:
        channel = self._channels.get(endpoint)
        if channel is None:
            creds = self.credentials
            if creds.ca is not None:
                tls = grpc.ssl_channel_credentials(creds.ca, creds.key, creds.cert)
                channel = grpc.secure_channel(endpoint, tls)
            else:
                channel = grpc.insecure_channel(endpoint)
            self._channels[endpoint] = channel
        return channel

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    def call(self, service: str, method: str, request: Message) -> Any:
        """Unary call; an unreachable endpoint or a standby ("not the leader") passes to the
        next endpoint; every other error, `unavailable` for capacity included, is final."""
        last: HvplaceError = Unavailable("no endpoint given")
        for endpoint in self.endpoints:
            stub = _STUBS[service](self._channel(endpoint))
            try:
                return getattr(stub, method)(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                err = error_from_rpc(e)
                if not isinstance(err, NotLeader | Unreachable):
                    raise err from None  # capacity, not found, refused...: as it is
                last = Unavailable(f"{endpoint}: {err.message}")
        raise last

    def stream(self, service: str, method: str, request: Message) -> Iterable[Any]:
        last: HvplaceError = Unavailable("no endpoint given")
        for endpoint in self.endpoints:
            stub = _STUBS[service](self._channel(endpoint))
            try:
                yield from getattr(stub, method)(request, metadata=self._metadata)
                return
            except grpc.RpcError as e:
                err = error_from_rpc(e)
                if not isinstance(err, NotLeader | Unreachable):
                    raise err from None
                last = Unavailable(f"{endpoint}: {err.message}")
        raise last


_STUBS: dict[str, Callable[[grpc.Channel], Any]] = {
    "vm": pb_grpc.VMServiceStub,
    "rule": pb_grpc.RuleServiceStub,
    "host": pb_grpc.HostServiceStub,
    "cluster": pb_grpc.ClusterServiceStub,
    "image": pb_grpc.ImageServiceStub,
    "maintenance": pb_grpc.MaintenanceServiceStub,
}
