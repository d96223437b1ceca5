"""What every API noun shares: its Backend, the leader check before a write, and request
ids (a retried create is answered from its first run, SPEC's idempotency)."""

from __future__ import annotations

import hashlib
import json

from hvplace.coordinator.operations.backend import Backend
from hvplace.coordinator.store import Txn
from hvplace.proto import codec, keyspace
from hvplace.proto.errors import Conflict, NotLeader
from hvplace.proto.records import RequestRecord


class Noun:
    """The base of each noun's operations; every public method is one API call."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def require_leader(self) -> None:
        lead = self.backend.leadership()
        if not lead.is_leader:
            raise NotLeader(
                f"not the leader; leader is {lead.leader or 'unknown (election under way)'}"
            )


def fingerprint(kind: str, payload: object) -> str:
    """What identifies a request's content, to tell a retry from a reuse of its id."""
    raw = json.dumps({"kind": kind, "payload": payload}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()


async def replay(txn: Txn, request_id: str, kind: str, fingerprint: str) -> RequestRecord | None:
    """The earlier record of this request, if it was already applied (read through `txn`:
    when absent, the commit requires it still absent); a different payload under the same
    id is a conflict."""
    raw = await txn.get(keyspace.request(request_id))
    if raw is None:
        return None
    record = codec.loads(RequestRecord, raw)
    if record.kind != kind or record.fingerprint != fingerprint:
        raise Conflict(
            f"request id {request_id!r} was already used for a different {record.kind}"
            " request; use a new id for a new request"
        )
    return record
