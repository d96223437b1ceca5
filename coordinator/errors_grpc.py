"""The one mapping of hvplace errors to gRPC: a status code, the reason word in the message,
and a google.rpc.ErrorInfo (reason, domain "hvplace") in the rich status details."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from hvplace.proto import errors
from hvplace.proto.errors import HvplaceError, Reason

DOMAIN = "hvplace"
NOT_LEADER = "not_leader"
MAX_MESSAGE_BYTES = 1500
"""UTF-8 bytes of an error message sent to a client. It travels twice in the trailers
(percent-encoded, and base64 in the status details): at most ~6.5 KiB, inside gRPC's
8 KiB soft limit for metadata."""

STATUS_OF_REASON: Mapping[Reason, grpc.StatusCode] = {
    Reason.INCORRECT: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.UNKNOWN: grpc.StatusCode.UNKNOWN,
    # Not enough hosts, not the leader, etcd unreachable: retrying later may succeed.
    Reason.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Reason.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
    # Optimistic concurrency gave up: the standard code for "retry the read-modify-write".
    Reason.BUSY: grpc.StatusCode.ABORTED,
    Reason.FAULT: grpc.StatusCode.INTERNAL,
    Reason.PARTIAL: grpc.StatusCode.ABORTED,
    Reason.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.INTERRUPTED: grpc.StatusCode.ABORTED,
    Reason.UNSUPPORTED: grpc.StatusCode.UNIMPLEMENTED,
    Reason.CONFLICT: grpc.StatusCode.FAILED_PRECONDITION,
}

_ERROR_OF_REASON: Mapping[Reason, type[HvplaceError]] = {
    Reason.INCORRECT: errors.InvalidInput,
    Reason.NOT_FOUND: errors.NotFound,
    Reason.CONFLICT: errors.Conflict,
    Reason.FORBIDDEN: errors.Forbidden,
    Reason.UNAVAILABLE: errors.Unavailable,
    Reason.BUSY: errors.Busy,
    Reason.INTERRUPTED: errors.Interrupted,
    Reason.UNSUPPORTED: errors.Unsupported,
    Reason.PARTIAL: errors.Partial,
    Reason.FAULT: errors.Fault,
}

# Reasons a client answers by trying the next coordinator (leader moved, leader gone).
_GRPC_REASON: Mapping[grpc.StatusCode, Reason] = {
    grpc.StatusCode.UNAVAILABLE: Reason.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: Reason.UNAVAILABLE,
    grpc.StatusCode.CANCELLED: Reason.INTERRUPTED,
    grpc.StatusCode.INVALID_ARGUMENT: Reason.INCORRECT,
    grpc.StatusCode.NOT_FOUND: Reason.NOT_FOUND,
    grpc.StatusCode.UNIMPLEMENTED: Reason.UNSUPPORTED,
    grpc.StatusCode.PERMISSION_DENIED: Reason.FORBIDDEN,
    grpc.StatusCode.UNAUTHENTICATED: Reason.FORBIDDEN,
}


def rich_status(err: HvplaceError, metadata: Mapping[str, str] | None = None) -> grpc.Status:
    """The gRPC status for `err`: code, "reason: message", and ErrorInfo in the details."""
    code = STATUS_OF_REASON.get(err.reason, grpc.StatusCode.UNKNOWN)
    if isinstance(err, errors.Unauthenticated):
        code = grpc.StatusCode.UNAUTHENTICATED
    if isinstance(err, errors.NotLeader):
        # UNAVAILABLE also means "no capacity": clients move on only with this mark.
        metadata = {**(metadata or {}), NOT_LEADER: "true"}
    info = error_details_pb2.ErrorInfo(
        reason=err.reason.value, domain=DOMAIN, metadata=dict(metadata or {})
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    # A longer message would reach the client as RESOURCE_EXHAUSTED instead of the
    # reason. Validators quote input briefly; this bound holds for every other message.
    status = status_pb2.Status(code=code.value[0], message=wire_message(str(err)), details=[detail])
    result: grpc.Status = rpc_status.to_status(status)
    return result


def wire_message(text: str) -> str:
    """`text` cut to MAX_MESSAGE_BYTES of UTF-8, never inside a character."""
    raw = text.encode()
    if len(raw) <= MAX_MESSAGE_BYTES:
        return text
    return raw[: MAX_MESSAGE_BYTES - 3].decode(errors="ignore") + "..."


def unexpected(exc: BaseException) -> HvplaceError:
    """A bug or an unforeseen failure, reported as `fault` without hiding what it was."""
    return errors.Fault(f"internal error: {type(exc).__name__}: {exc}")


def error_from_rpc(err: grpc.RpcError) -> HvplaceError:
    """The client side: rebuild the typed error from a failed call's status."""
    call = cast(grpc.Call, err)  # every RpcError a stub raises is also its Call
    code = call.code()
    details = call.details() or ""
    info = error_info(err)
    ours = info is not None and info.domain == DOMAIN
    if ours and info is not None and info.metadata.get(NOT_LEADER) == "true":
        return errors.NotLeader(details.removeprefix("unavailable: "))
    if not ours and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return errors.Unreachable(details or code.name)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return errors.Unauthenticated(details.removeprefix("forbidden: "))
    reason = Reason(info.reason) if ours and info is not None else None
    if reason is None:
        reason = _GRPC_REASON.get(code, Reason.UNKNOWN)
    message = details
    prefix = f"{reason.value}: "
    if message.startswith(prefix):
        message = message[len(prefix) :]
    cls = _ERROR_OF_REASON.get(reason)
    if cls is None:
        error = HvplaceError(message)
        error.reason = reason
        return error
    return cls(message)


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo detail of a failed call, if the server sent one."""
    try:
        status = rpc_status.from_call(cast(grpc.Call, err))
    except ValueError:
        return None
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
            return info
    return None


__all__ = [
    "DOMAIN",
    "MAX_MESSAGE_BYTES",
    "STATUS_OF_REASON",
    "error_from_rpc",
    "error_info",
    "rich_status",
    "unexpected",
    "wire_message",
]
