"""The domain's one exception tree; the API edge maps each to a gRPC code and a reason word.

The reason words are the Exoscale operation-result reasons (seeds/001): incorrect,
unknown, unavailable, forbidden, busy, fault, partial, not-found, interrupted,
unsupported, conflict.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    INCORRECT = "incorrect"
    UNKNOWN = "unknown"
    UNAVAILABLE = "unavailable"
    FORBIDDEN = "forbidden"
    BUSY = "busy"
    FAULT = "fault"
    PARTIAL = "partial"
    NOT_FOUND = "not-found"
    INTERRUPTED = "interrupted"
    UNSUPPORTED = "unsupported"
    CONFLICT = "conflict"


class HvplaceError(Exception):
    """Base of every error hvplace reports to a person; `reason` is the seed's word."""

    reason: Reason = Reason.FAULT

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.message}"


class InvalidInput(HvplaceError):
    """The request is malformed: a bad name, a size out of bounds, a bad rule."""

    reason = Reason.INCORRECT


class NotFound(HvplaceError):
    reason = Reason.NOT_FOUND


class Conflict(HvplaceError):
    """The request contradicts the current state (rule overlap, members present...)."""

    reason = Reason.CONFLICT


class Forbidden(HvplaceError):
    reason = Reason.FORBIDDEN


class Unauthenticated(Forbidden):
    """No valid credentials (gRPC UNAUTHENTICATED); a known caller without the role needed
    gets `Forbidden` (PERMISSION_DENIED). Both carry the reason word `forbidden`."""


class Unavailable(HvplaceError):
    """Not enough hosts or capacity, or a dependency (etcd, libvirt) cannot be reached."""

    reason = Reason.UNAVAILABLE


class NotLeader(Unavailable):
    """This coordinator is a standby: a client tries the next one (and only then)."""


class Unreachable(Unavailable):
    """The coordinator could not be reached at all (client side): try the next one."""


class Busy(HvplaceError):
    """Optimistic concurrency gave up after its bounded retries; the caller may retry."""

    reason = Reason.BUSY


class Interrupted(HvplaceError):
    """Leadership or a connection was lost while the request was in flight."""

    reason = Reason.INTERRUPTED


class Unsupported(HvplaceError):
    reason = Reason.UNSUPPORTED


class Partial(HvplaceError):
    reason = Reason.PARTIAL


class Fault(HvplaceError):
    reason = Reason.FAULT
