"""How the CLI prints: aligned tables, or the API's JSON with --json; and the argument
helpers every noun shares (KEY=VALUE lists, SCOPE/NAME references, JSON to proto)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from google.protobuf.message import Message
from hvplace.coordinator.convert import proto_to_dict
from hvplace.proto.errors import InvalidInput
from hvplace.proto.v1 import hvplace_pb2 as pb

DEFAULT_SCOPE = "default"

R = TypeVar("R", bound=Message)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Columns aligned to their widest cell, two spaces apart."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def labels_text(labels: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def resources_text(r: pb.Resources) -> str:
    return f"{r.vcpus}c/{r.memory_mib}M/{r.disk_gib}G"


def explanation_text(e: pb.Explanation) -> str:
    lines = [f"{e.vm}: {e.feasible_hosts}/{e.total_hosts} hosts feasible"]
    if e.reasons:
        lines.append(
            table(
                ("HOSTS", "REASON", "RULE"),
                ([r.hosts, r.message, r.rule or "-"] for r in e.reasons),
            )
        )
    return "\n".join(lines)


def admission_text(a: pb.AdmissionReport) -> str:
    if not a.policy and a.ok:
        return ""
    head = f"failover admission ({a.policy or 'warn'}): {'ok' if a.ok else 'at risk'}"
    lines = [head]
    lines.extend(f"  warning: {w}" for w in a.warnings)
    for imp in a.impacts:
        failed = imp.failed or "(no failure)"
        for vm in imp.stranded:
            lines.append(f"  losing {failed} strands {vm}: {imp.reasons.get(vm, '')}")
    return "\n".join(lines)


def kv(items: Sequence[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"{what} {item!r} must be KEY=VALUE")
        out[key] = value
    return out


def ref(name: str, scope: str) -> tuple[str, str]:
    """`scope/name` or a bare name in --scope."""
    if name.count("/") == 1:
        s, n = name.split("/")
        return s, n
    return scope, name


def emit(args: argparse.Namespace, msg: Message, text: Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(proto_to_dict(msg), sort_keys=True))
    else:
        out = text()
        if out:
            print(out)


def json_to_proto(data: dict[str, Any], cls: type[R]) -> R:
    from google.protobuf import json_format

    try:
        return json_format.ParseDict(data, cls())
    except json_format.ParseError as e:
        raise InvalidInput(str(e)) from None


def add_scope(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scope",
        default=os.environ.get("HVPLACE_SCOPE", DEFAULT_SCOPE),
        help="tenant/project scope (default: $HVPLACE_SCOPE or 'default'); NAME may also be SCOPE/NAME",
    )
