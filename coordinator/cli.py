"""The `hvplace` operator CLI: a gRPC client of the coordinator, aligned tables or --json.

Endpoints come from --endpoint or HVPLACE_ENDPOINT (comma-separated); each is tried in
turn and one that answers "not the leader" or cannot be reached passes to the next.
Errors exit non-zero with the reason word and the message.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from hvplace.coordinator import cli_rebalance, whatif
from hvplace.coordinator.convert import proto_to_dict
from hvplace.coordinator.errors_grpc import error_from_rpc
from hvplace.proto import models
from hvplace.proto.errors import (
    HvplaceError,
    InvalidInput,
    NotLeader,
    Unavailable,
    Unreachable,
)
from hvplace.proto.v1 import hvplace_pb2 as pb
from hvplace.proto.v1 import hvplace_pb2_grpc as pb_grpc

DEFAULT_ENDPOINT = "127.0.0.1:7400"
DEFAULT_SCOPE = "default"
TIMEOUT_S = 30.0

R = TypeVar("R", bound=Message)

# Exit codes: 1 for an error the server reported (reason word printed), 2 for usage.
EXIT_ERROR = 1


# --------------------------------------------------------------------------- client


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
}


# --------------------------------------------------------------------------- output


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Columns aligned to their widest cell, two spaces apart."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def _labels(labels: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def _res(r: pb.Resources) -> str:
    return f"{r.vcpus}c/{r.memory_mib}M/{r.disk_gib}G"


def _vm_rows(views: Iterable[pb.VMView]) -> list[list[object]]:
    rows: list[list[object]] = []
    for v in views:
        phase = v.status.phase or "pending"
        # The coordinator writes the explanation's summary as the reason.
        reason = v.status.reason
        rows.append(
            [
                v.spec.scope,
                v.spec.name,
                phase,
                v.status.host or "-",
                _res(v.spec.resources),
                v.spec.power or "running",
                v.domain.state or "-",
                reason or "",
            ]
        )
    return rows


VM_HEADERS = ("SCOPE", "NAME", "PHASE", "HOST", "SIZE", "POWER", "DOMAIN", "REASON")


def _explanation_text(e: pb.Explanation) -> str:
    lines = [f"{e.vm}: {e.feasible_hosts}/{e.total_hosts} hosts feasible"]
    if e.reasons:
        lines.append(
            table(
                ("HOSTS", "REASON", "RULE"),
                ([r.hosts, r.message, r.rule or "-"] for r in e.reasons),
            )
        )
    return "\n".join(lines)


def _admission_text(a: pb.AdmissionReport) -> str:
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


def _host_rows(views: Iterable[pb.HostView]) -> list[list[object]]:
    return [
        [
            h.info.name,
            h.status.state or "ready",
            "yes" if h.alive else "no",
            _labels(h.info.labels),
            f"{h.used.vcpus}/{h.allocatable.vcpus}",
            f"{h.used.memory_mib}/{h.allocatable.memory_mib}",
            f"{h.used.disk_gib}/{h.allocatable.disk_gib}",
            len(h.vms),
        ]
        for h in views
    ]


HOST_HEADERS = ("NAME", "STATE", "ALIVE", "LABELS", "VCPUS", "MEMORY_MIB", "DISK_GIB", "VMS")


def _rule_members(r: pb.Rule) -> str:
    parts = list(r.members)
    sel = r.selector
    parts.extend(f"{k}={v}" for k, v in sorted(sel.match_labels.items()))
    parts.extend(f"{e.key} {e.operator} ({','.join(e.values)})" for e in sel.match_expressions)
    return ",".join(parts) or "-"


def _rule_rows(views: Iterable[pb.RuleView]) -> list[list[object]]:
    rows: list[list[object]] = []
    for v in views:
        r = v.rule
        enforcement = r.enforcement or "required"
        if enforcement == "preferred":
            enforcement += f"({r.weight})"
        bound = ""
        if r.kind == "anti_affinity":
            bound = f"max {r.max_per_domain or 1}/{r.topology_key or 'host'}"
            if r.min_domains:
                bound += f", min {r.min_domains}"
        rows.append(
            [
                r.scope,
                r.name,
                r.kind,
                enforcement,
                r.topology_key or "host",
                bound or "-",
                len(v.members),
                "yes" if v.satisfied else "NO",
                _rule_members(r),
            ]
        )
    return rows


RULE_HEADERS = (
    "SCOPE",
    "NAME",
    "KIND",
    "ENFORCEMENT",
    "TOPOLOGY",
    "BOUND",
    "MEMBERS",
    "SATISFIED",
    "SELECTS",
)


# --------------------------------------------------------------------------- helpers


def _kv(items: Sequence[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"{what} {item!r} must be KEY=VALUE")
        out[key] = value
    return out


def _ref(name: str, scope: str) -> tuple[str, str]:
    """`scope/name` or a bare name in --scope."""
    if name.count("/") == 1:
        s, n = name.split("/")
        return s, n
    return scope, name


def _emit(args: argparse.Namespace, msg: Message, text: Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(proto_to_dict(msg), sort_keys=True))
    else:
        out = text()
        if out:
            print(out)


# --------------------------------------------------------------------------- commands


def cmd_vm_create(c: Client, args: argparse.Namespace) -> None:
    vms: list[dict[str, Any]] = []
    if args.file:
        data = json.loads(Path(args.file).read_text())
        vms.extend(data if isinstance(data, list) else [data])
    names = list(args.names)
    if args.count:
        if len(names) != 1:
            raise InvalidInput("--count takes exactly one name prefix")
        names = [f"{names[0]}-{i}" for i in range(1, args.count + 1)]
    for name in names:
        scope, vm_name = _ref(name, args.scope)
        vm: dict[str, Any] = {
            "scope": scope,
            "name": vm_name,
            "labels": _kv(args.label, "label"),
            "resources": {"vcpus": args.vcpus, "memory_mib": args.memory, "disk_gib": args.disk},
            "ha_priority": args.ha,
            "power": "stopped" if args.stopped else "running",
        }
        if args.description:
            vm["description"] = args.description
        if args.image and args.kernel:
            raise InvalidInput("give --image or --kernel, not both")
        if args.image:
            vm["image"] = {"name": args.image}
        elif args.kernel:
            vm["image"] = {"kernel": args.kernel, "initrd": args.initrd, "cmdline": args.cmdline}
        if args.node:
            vm["node_affinity"] = {
                "required": [
                    {
                        "match_expressions": [
                            {"key": k, "operator": "In", "values": [v]}
                            for k, v in _kv(args.node, "--node").items()
                        ]
                    }
                ]
            }
        vms.append(vm)
    if not vms:
        raise InvalidInput("name at least one VM (or --file)")
    request = pb.CreateVMsRequest(
        request_id=args.request_id or uuid.uuid4().hex, atomic=args.atomic
    )
    for vm in vms:
        request.vms.append(models_json_to_proto(vm, pb.VM))
    resp: pb.CreateVMsResponse = c.call("vm", "CreateVMs", request)

    def text() -> str:
        out = table(VM_HEADERS, _vm_rows(resp.vms))
        adm = _admission_text(resp.admission)
        return out + ("\n" + adm if adm else "")

    _emit(args, resp, text)


def models_json_to_proto(data: dict[str, Any], cls: type[R]) -> R:
    from google.protobuf import json_format

    try:
        return json_format.ParseDict(data, cls())
    except json_format.ParseError as e:
        raise InvalidInput(str(e)) from None


def cmd_vm_get(c: Client, args: argparse.Namespace) -> None:
    scope, name = _ref(args.name, args.scope)
    view: pb.VMView = c.call("vm", "GetVM", pb.VMRef(scope=scope, name=name))

    def text() -> str:
        out = table(VM_HEADERS, _vm_rows([view]))
        details = [
            f"labels: {_labels(view.spec.labels)}",
            f"ha_priority: {view.spec.ha_priority or 'medium'}",
            f"uid: {view.spec.uid or '-'}  epoch: {view.status.epoch}",
        ]
        if view.status.degraded:
            details.append(f"degraded: {', '.join(view.status.degraded)}")
        if view.domain.last_error:
            details.append(f"last error: {view.domain.last_error}")
        if view.status.start_failures:
            details.append(
                f"failed to start on {len(view.status.start_failures)} host(s) in a row"
                " (`hvplace vm start` clears the count and retries):"
            )
            details.extend(
                f"  {f.host} (epoch {f.epoch}): {f.reason}" for f in view.status.start_failures
            )
        if view.status.HasField("explanation"):
            details.append(_explanation_text(view.status.explanation))
        return out + "\n" + "\n".join(details)

    _emit(args, view, text)


def cmd_vm_list(c: Client, args: argparse.Namespace) -> None:
    resp: pb.ListVMsResponse = c.call(
        "vm", "ListVMs", pb.ListVMsRequest(scope=args.scope, host=args.host, phase=args.phase)
    )
    _emit(args, resp, lambda: table(VM_HEADERS, _vm_rows(resp.vms)))


def cmd_vm_delete(c: Client, args: argparse.Namespace) -> None:
    scope, name = _ref(args.name, args.scope)
    resp = c.call("vm", "DeleteVM", pb.DeleteVMRequest(scope=scope, name=name))
    _emit(args, resp, lambda: f"deleted {scope}/{name}")


def _power(method: str) -> Callable[[Client, argparse.Namespace], None]:
    def run(c: Client, args: argparse.Namespace) -> None:
        scope, name = _ref(args.name, args.scope)
        view: pb.VMView = c.call("vm", method, pb.VMRef(scope=scope, name=name))
        _emit(args, view, lambda: table(VM_HEADERS, _vm_rows([view])))

    return run


def cmd_vm_explain(c: Client, args: argparse.Namespace) -> None:
    scope, name = _ref(args.name, args.scope)
    e: pb.Explanation = c.call("vm", "ExplainVM", pb.VMRef(scope=scope, name=name))
    _emit(args, e, lambda: _explanation_text(e))


def _rule_from_args(args: argparse.Namespace, base: dict[str, Any] | None) -> dict[str, Any]:
    scope, name = _ref(args.name, args.scope)
    rule: dict[str, Any] = dict(base or {"scope": scope, "name": name})
    if args.kind:
        rule["kind"] = args.kind.replace("-", "_")
    if args.preferred is not None:
        rule["enforcement"] = "preferred"
        rule["weight"] = args.preferred
    elif args.required:
        rule["enforcement"] = "required"
        rule.pop("weight", None)
    if args.member:
        rule["members"] = [m for item in args.member for m in item.split(",") if m]
    if args.selector:
        rule["selector"] = {"match_labels": _kv(args.selector, "--selector")}
    if args.topology_key:
        rule["topology_key"] = args.topology_key
    if args.max_per_domain is not None:
        rule["max_per_domain"] = args.max_per_domain
    if args.min_domains is not None:
        rule["min_domains"] = args.min_domains
    if args.max_members is not None:
        rule["max_members"] = args.max_members
    if args.on_failure:
        rule["on_failure"] = args.on_failure
    if args.description is not None:
        rule["description"] = args.description
    if "kind" not in rule:
        raise InvalidInput("a rule needs --kind affinity|anti-affinity")
    return rule


def _rule_response_text(resp: pb.RuleResponse) -> str:
    out = table(RULE_HEADERS, _rule_rows([resp.rule]))
    adm = _admission_text(resp.admission)
    return out + ("\n" + adm if adm else "")


def cmd_rule_create(c: Client, args: argparse.Namespace) -> None:
    rule = models_json_to_proto(_rule_from_args(args, None), pb.Rule)
    cli_rebalance.wait_for_moves(c, args.rebalance)
    resp: pb.RuleResponse = c.call(
        "rule",
        "CreateRule",
        pb.CreateRuleRequest(
            request_id=args.request_id or uuid.uuid4().hex, rule=rule, rebalance=args.rebalance
        ),
    )
    _emit(args, resp, lambda: _rule_response_text(resp))


def cmd_rule_update(c: Client, args: argparse.Namespace) -> None:
    scope, name = _ref(args.name, args.scope)
    current: pb.RuleView = c.call("rule", "GetRule", pb.RuleRef(scope=scope, name=name))
    rule = models_json_to_proto(_rule_from_args(args, proto_to_dict(current.rule)), pb.Rule)
    cli_rebalance.wait_for_moves(c, args.rebalance)
    resp: pb.RuleResponse = c.call(
        "rule", "UpdateRule", pb.UpdateRuleRequest(rule=rule, rebalance=args.rebalance)
    )
    _emit(args, resp, lambda: _rule_response_text(resp))


def cmd_rule_get(c: Client, args: argparse.Namespace) -> None:
    scope, name = _ref(args.name, args.scope)
    view: pb.RuleView = c.call("rule", "GetRule", pb.RuleRef(scope=scope, name=name))

    def text() -> str:
        out = [table(RULE_HEADERS, _rule_rows([view]))]
        if view.rule.description:
            out.append(f"description: {view.rule.description}")
        if view.members:
            out.append(
                table(
                    ("MEMBER", "PHASE", "HOST", "DOMAIN"),
                    (
                        [m.name, m.phase or "-", m.host or "-", m.domain or "-"]
                        for m in view.members
                    ),
                )
            )
        out.extend(f"violation: {v}" for v in view.violations)
        return "\n".join(out)

    _emit(args, view, text)


def cmd_rule_list(c: Client, args: argparse.Namespace) -> None:
    resp: pb.ListRulesResponse = c.call("rule", "ListRules", pb.ListRulesRequest(scope=args.scope))
    _emit(args, resp, lambda: table(RULE_HEADERS, _rule_rows(resp.rules)))


def cmd_rule_delete(c: Client, args: argparse.Namespace) -> None:
    scope, name = _ref(args.name, args.scope)
    resp = c.call(
        "rule", "DeleteRule", pb.DeleteRuleRequest(scope=scope, name=name, force=args.force)
    )
    _emit(args, resp, lambda: f"deleted rule {scope}/{name}")


IMAGE_HEADERS = ("NAME", "FILES", "CMDLINE")


def _image_rows(images: Iterable[pb.Image]) -> list[list[object]]:
    rows: list[list[object]] = []
    for i in images:
        files = [f"{f}={getattr(i, f)}" for f in ("kernel", "initrd", "disk") if getattr(i, f)]
        rows.append([i.name, " ".join(files), i.cmdline or "-"])
    return rows


def cmd_image_add(c: Client, args: argparse.Namespace) -> None:
    """The digests are computed here, from the files under --dir (a copy of what the
    hosts' image directories hold); the hosts check their own copies against them."""
    if bool(args.kernel) == bool(args.disk):
        raise InvalidInput("give --kernel (with --initrd, --cmdline) or --disk")
    if args.initrd and not args.kernel:
        raise InvalidInput("--initrd goes with --kernel")
    image = pb.Image(name=args.name, cmdline=args.cmdline)
    for field in ("kernel", "initrd", "disk"):
        relative = getattr(args, field)
        if relative:
            path = Path(args.dir) / relative
            try:
                with path.open("rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
            except OSError as e:
                raise InvalidInput(f"--{field} {path}: {e.strerror}") from None
            setattr(image, field, relative)
            setattr(image, f"{field}_sha256", digest)
    resp: pb.Image = c.call("image", "AddImage", image)
    _emit(args, resp, lambda: table(IMAGE_HEADERS, _image_rows([resp])))


def cmd_image_get(c: Client, args: argparse.Namespace) -> None:
    resp: pb.Image = c.call("image", "GetImage", pb.ImageRef(name=args.name))

    def text() -> str:
        digests = [
            f"{f}: {getattr(resp, f)} sha256 {getattr(resp, f + '_sha256')}"
            for f in ("kernel", "initrd", "disk")
            if getattr(resp, f)
        ]
        return "\n".join([f"image {resp.name}", *digests, f"cmdline: {resp.cmdline or '-'}"])

    _emit(args, resp, text)


def cmd_image_list(c: Client, args: argparse.Namespace) -> None:
    resp: pb.ListImagesResponse = c.call("image", "ListImages", pb.Empty())
    _emit(args, resp, lambda: table(IMAGE_HEADERS, _image_rows(resp.images)))


def cmd_image_delete(c: Client, args: argparse.Namespace) -> None:
    resp = c.call("image", "DeleteImage", pb.DeleteImageRequest(name=args.name, force=args.force))
    _emit(args, resp, lambda: f"deleted image {args.name}")


def _policy_text(p: pb.ScopePolicy) -> str:
    return table(
        ("SCOPE", "LABEL_ANTI_AFFINITY", "SPREAD", "LABEL_KEYS"),
        [
            [
                p.scope,
                "on" if p.label_anti_affinity else "off",
                p.spread,
                ",".join(p.label_keys) or "*",
            ]
        ],
    )


def cmd_policy_set(c: Client, args: argparse.Namespace) -> None:
    policy = pb.ScopePolicy(
        scope=args.scope_name,
        label_anti_affinity=args.label_anti_affinity,
        spread=args.spread,
        label_keys=args.label_key or [],
        rebalance=args.rebalance,
    )
    cli_rebalance.wait_for_moves(c, args.rebalance)
    resp: pb.ScopePolicy = c.call("rule", "SetScopePolicy", policy)
    _emit(args, resp, lambda: _policy_text(resp))


def cmd_policy_get(c: Client, args: argparse.Namespace) -> None:
    resp: pb.ScopePolicy = c.call("rule", "GetScopePolicy", pb.ScopeRef(scope=args.scope_name))
    _emit(args, resp, lambda: _policy_text(resp))


def cmd_host_list(c: Client, args: argparse.Namespace) -> None:
    resp: pb.ListHostsResponse = c.call("host", "ListHosts", pb.Empty())

    def text() -> str:
        out = table(HOST_HEADERS, _host_rows(resp.hosts))
        # Degraded and lost hosts say why under the table.
        notes = [
            f"{h.info.name}: {h.status.reason}"
            for h in resp.hosts
            if h.status.state in ("degraded", "lost") and h.status.reason
        ]
        return out + "".join(f"\n{n}" for n in notes)

    _emit(args, resp, text)


def _host_call(method: str) -> Callable[[Client, argparse.Namespace], None]:
    def run(c: Client, args: argparse.Namespace) -> None:
        view: pb.HostView = c.call("host", method, pb.HostRef(name=args.host))

        def text() -> str:
            out = table(HOST_HEADERS, _host_rows([view]))
            if view.status.reason:
                out += f"\nreason: {view.status.reason}"
            if method == "GetHost" and view.vms:
                out += "\nvms: " + ", ".join(view.vms)
            return out

        _emit(args, view, text)

    return run


def _counts(m: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(m.items())) or "-"


def cmd_cluster_status(c: Client, args: argparse.Namespace) -> None:
    s: pb.ClusterStatus = c.call("cluster", "GetClusterStatus", pb.Empty())

    def text() -> str:
        rows: list[list[object]] = [
            ["leader", s.leader or "-"],
            ["fencing token", s.fencing_token],
            ["revision", s.revision],
            ["hosts", _counts(s.hosts_by_state)],
            ["vms", _counts(s.vms_by_phase)],
            ["pending", _counts(s.pending_by_reason)],
            [
                "timing",
                f"lease_ttl {s.config.lease_ttl_s}s, fence_after {s.config.fence_after_s}s,"
                f" failover_delay {s.config.failover_delay_s}s",
            ],
            [
                "admission",
                f"{s.config.admission_policy or 'warn'}, any {s.config.admission_failures or 1}"
                f" {s.config.admission_topology or 'host'} failure(s)",
            ],
            ["headroom", "ok" if s.headroom.ok else "AT RISK"],
        ]
        out = table(("FIELD", "VALUE"), rows)
        for imp in s.headroom.impacts:
            out += f"\n  losing {imp.failed or '-'} strands {', '.join(imp.stranded)}"
        return out

    _emit(args, s, text)


def cmd_events(c: Client, args: argparse.Namespace) -> None:
    for ev in c.stream("cluster", "WatchEvents", pb.WatchEventsRequest(kinds=args.kinds)):
        if args.json:
            print(json.dumps(proto_to_dict(ev), sort_keys=True), flush=True)
        else:
            print(f"{ev.revision:>8}  {ev.kind:<10} {ev.type:<6} {ev.key}", flush=True)


def _simulate_text(
    moves: Sequence[tuple[str, str, str]], pending: Sequence[str], degraded: Sequence[str]
) -> str:
    out = [table(("VM", "FROM", "TO"), moves) if moves else "no VM moves"]
    if pending:
        out.append("stays pending:")
        out.extend(f"  {p}" for p in pending)
    out.extend(f"degraded: {d}" for d in degraded)
    return "\n".join(out)


def cmd_simulate(c: Client | None, args: argparse.Namespace) -> None:
    if args.cluster:
        simulate_offline(args)
        return
    assert c is not None
    request = pb.SimulateRequest(fail_hosts=args.fail or [])
    if args.domain:
        key, _, value = args.domain.partition("=")
        request.topology_key, request.domain = key, value
    resp: pb.SimulateResponse = c.call("cluster", "Simulate", request)
    _emit(
        args,
        resp,
        lambda: _simulate_text(
            [(m.vm, m.from_host, m.to_host) for m in resp.moves],
            [_explanation_text(e) for e in resp.pending],
            list(resp.degraded),
        ),
    )


def simulate_offline(args: argparse.Namespace) -> None:
    """`simulate --cluster FILE`: place a described cluster in-process (no etcd), print
    the placement, each pending VM's explanation, and with --fail the failover plan."""
    from hvplace.coordinator.placement import rule_compliance

    cluster = whatif.load_cluster(Path(args.cluster))
    snapshot, plan = whatif.place_cluster(cluster)
    compliance = rule_compliance(snapshot)
    result: whatif.SimulateResult | None = None
    if args.fail or args.domain:
        key, _, value = (args.domain or "").partition("=")
        lost = whatif.failed_hosts(snapshot, args.fail or [], key, value)
        result = whatif.simulate_failure(snapshot, lost)
    if args.json:
        out: dict[str, Any] = {
            "placements": dict(sorted(plan.assignments.items())),
            "pending": [models.to_dict(e) for _, e in sorted(plan.pending.items())],
            "rules": {
                k: {"satisfied": v.satisfied, "violations": list(v.violations)}
                for k, v in compliance.items()
            },
        }
        if result is not None:
            out["failover"] = models.to_dict(result)
        print(json.dumps(out, sort_keys=True))
        return
    by_key = {vm.key: vm for vm in cluster.vms}
    rows = []
    for key in sorted(by_key):
        vm = by_key[key]
        host = plan.assignments.get(key)
        rows.append(
            [
                vm.scope,
                vm.name,
                host or "-",
                "scheduled" if host else "pending",
                f"{vm.resources.vcpus}c/{vm.resources.memory_mib}M/{vm.resources.disk_gib}G",
                _labels(vm.labels),
            ]
        )
    print(
        f"placement of {args.cluster}: {len(plan.assignments)} placed, {len(plan.pending)} pending"
    )
    print(table(("SCOPE", "NAME", "HOST", "PHASE", "SIZE", "LABELS"), rows))
    for key, e in sorted(plan.pending.items()):
        print()
        print(f"why {key} is pending: {e.summary()}")
        print(
            table(
                ("HOSTS", "REASON", "RULE"),
                ([r.hosts, r.message, r.rule or "-"] for r in e.reasons),
            )
        )
    print()
    print(
        table(
            ("RULE", "SATISFIED", "VIOLATIONS"),
            (
                [k, "yes" if v.satisfied else "NO", "; ".join(v.violations) or "-"]
                for k, v in compliance.items()
            ),
        )
    )
    if result is not None:
        print()
        print(f"if {', '.join(lost)} failed:")
        print(
            _simulate_text(
                [(m.vm, m.from_host, m.to_host) for m in result.moves],
                [f"{e.vm}: {e.summary()}" for e in result.pending],
                list(result.degraded),
            )
        )


# --------------------------------------------------------------------------- parser


def _add_scope(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scope",
        default=os.environ.get("HVPLACE_SCOPE", DEFAULT_SCOPE),
        help="tenant/project scope (default: $HVPLACE_SCOPE or 'default'); NAME may also be SCOPE/NAME",
    )


def _add_rule_fields(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kind", choices=["affinity", "anti-affinity", "anti_affinity"], help="rule polarity"
    )
    enf = p.add_mutually_exclusive_group()
    enf.add_argument("--required", action="store_true", help="never broken (the default)")
    enf.add_argument("--preferred", type=int, metavar="WEIGHT", help="scored with weight 1-100")
    p.add_argument(
        "--member", action="append", metavar="VM[,VM]", help="member VM names (repeatable)"
    )
    p.add_argument(
        "--selector", action="append", metavar="KEY=VALUE", help="members by label (repeatable)"
    )
    p.add_argument("--topology-key", help="host (default) or a host label such as rack or zone")
    p.add_argument(
        "--max-per-domain", type=int, help="anti-affinity: members allowed per domain (default 1)"
    )
    p.add_argument(
        "--min-domains", type=int, help="anti-affinity: spread over at least this many domains"
    )
    p.add_argument(
        "--on-failure", choices=["block", "degrade"], help="what failover may do to this rule"
    )
    p.add_argument("--description")
    p.add_argument("--max-members", type=int, help="refuse members beyond this many (0: no cap)")
    p.add_argument("--rebalance", action="store_true", help="move VMs until the rule holds")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hvplace", description="Operate an hvplace cluster through its coordinator's gRPC API."
    )
    parser.add_argument(
        "--endpoint",
        default=os.environ.get("HVPLACE_ENDPOINT", DEFAULT_ENDPOINT),
        help="coordinator address(es), comma-separated; the leader is found among them"
        " (default: $HVPLACE_ENDPOINT or %(default)s)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the API's JSON instead of tables"
    )
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per call")
    for flag, env, text in (
        ("--ca", "HVPLACE_CA", "CA certificate (PEM) that signed the coordinators' TLS cert"),
        ("--cert", "HVPLACE_CERT", "client certificate (PEM) for mTLS"),
        ("--key", "HVPLACE_KEY", "the client certificate's key (PEM)"),
        ("--token-file", "HVPLACE_TOKEN_FILE", "file holding a bearer token"),
    ):
        parser.add_argument(flag, default=os.environ.get(env, ""), help=f"{text} (default: ${env})")
    top = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")

    vm = top.add_parser("vm", help="create, inspect and power VMs").add_subparsers(
        dest="cmd", required=True
    )
    cli_rebalance.add_vm_commands(vm, _add_scope)
    p = vm.add_parser(
        "create", help="create VMs (one batch); placed at once or left pending with a reason"
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="VM names (or SCOPE/NAME)")
    _add_scope(p)
    p.add_argument("--count", type=int, help="create NAME-1..NAME-COUNT")
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--memory", type=int, default=512, metavar="MIB")
    p.add_argument("--disk", type=int, default=0, metavar="GIB")
    p.add_argument("--label", action="append", metavar="KEY=VALUE", help="VM label (repeatable)")
    p.add_argument(
        "--node", action="append", metavar="KEY=VALUE", help="required host label (repeatable)"
    )
    p.add_argument(
        "--ha", choices=["high", "medium", "low", "off"], default="medium", help="HA priority"
    )
    p.add_argument("--stopped", action="store_true", help="create powered off")
    p.add_argument("--image", help="a catalogue image's name (`hvplace image list`)")
    p.add_argument("--kernel", help="direct kernel boot: kernel path on the hosts")
    p.add_argument("--initrd", default="")
    p.add_argument("--cmdline", default="")
    p.add_argument("--description")
    p.add_argument("--file", help="JSON file with a VM or a list of VMs (proto field names)")
    p.add_argument("--atomic", action="store_true", help="all placed or none created")
    p.add_argument("--request-id", help="idempotency key; a retry with it creates nothing new")
    p.set_defaults(func=cmd_vm_create)
    for name, func, what in (
        ("get", cmd_vm_get, "show a VM, its status and where it runs"),
        ("delete", cmd_vm_delete, "delete a VM (its host stops it)"),
        ("start", _power("StartVM"), "set a VM's desired power to running"),
        ("stop", _power("StopVM"), "set a VM's desired power to stopped"),
        ("explain", cmd_vm_explain, "why a VM can or cannot go on each host"),
    ):
        p = vm.add_parser(name, help=what)
        p.add_argument("name", metavar="NAME")
        _add_scope(p)
        p.set_defaults(func=func)
    p = vm.add_parser("list", help="list VMs")
    p.add_argument("--scope", default="", help="only this scope")
    p.add_argument("--host", default="", help="only VMs on this host")
    p.add_argument("--phase", default="", help="pending|scheduled|running|stopped|failed")
    p.set_defaults(func=cmd_vm_list)

    image = top.add_parser("image", help="the image catalogue VMs boot from").add_subparsers(
        dest="cmd", required=True
    )
    p = image.add_parser("add", help="add an image; its files' sha256 are computed from --dir")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--kernel", default="", help="kernel, relative to the image directories")
    p.add_argument("--initrd", default="", help="initrd, relative to the image directories")
    p.add_argument("--cmdline", default="", help="kernel command line")
    p.add_argument("--disk", default="", help="base disk, relative to the image directories")
    p.add_argument(
        "--dir", required=True, help="local copy of the hosts' image directory to hash from"
    )
    p.set_defaults(func=cmd_image_add)
    p = image.add_parser("get", help="an image's files and digests")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_image_get)
    p = image.add_parser("list", help="list images")
    p.set_defaults(func=cmd_image_list)
    p = image.add_parser("delete", help="delete an image (refused while VMs name it)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--force", action="store_true", help="even if VMs name it (they keep a copy)")
    p.set_defaults(func=cmd_image_delete)

    rule = top.add_parser("rule", help="affinity and anti-affinity rules").add_subparsers(
        dest="cmd", required=True
    )
    p = rule.add_parser("create", help="create a rule (refused if running VMs break it)")
    p.add_argument("name", metavar="NAME")
    _add_scope(p)
    _add_rule_fields(p)
    p.add_argument("--request-id", help="idempotency key")
    p.set_defaults(func=cmd_rule_create)
    p = rule.add_parser("update", help="change a rule; unnamed fields keep their value")
    p.add_argument("name", metavar="NAME")
    _add_scope(p)
    _add_rule_fields(p)
    p.set_defaults(func=cmd_rule_update)
    p = rule.add_parser("get", help="a rule, its members and where each runs")
    p.add_argument("name", metavar="NAME")
    _add_scope(p)
    p.set_defaults(func=cmd_rule_get)
    p = rule.add_parser("list", help="list rules")
    p.add_argument("--scope", default="", help="only this scope")
    p.set_defaults(func=cmd_rule_list)
    p = rule.add_parser(
        "delete", help="delete a rule (refused while it has members unless --force)"
    )
    p.add_argument("name", metavar="NAME")
    _add_scope(p)
    p.add_argument("--force", action="store_true", help="delete even with members present")
    p.set_defaults(func=cmd_rule_delete)

    pol = top.add_parser("policy", help="per-scope label anti-affinity").add_subparsers(
        dest="cmd", required=True
    )
    p = pol.add_parser("set", help="set a scope's policy")
    p.add_argument("scope_name", metavar="SCOPE")
    p.add_argument(
        "--label-anti-affinity",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="same-label VMs never share a host (default on)",
    )
    p.add_argument(
        "--spread", type=int, default=0, help="let them share, over at least this many hosts"
    )
    p.add_argument("--label-key", action="append", help="only these label keys count (repeatable)")
    p.add_argument("--rebalance", action="store_true", help="move VMs until the policy holds")
    p.set_defaults(func=cmd_policy_set)
    p = pol.add_parser("get", help="show a scope's policy")
    p.add_argument("scope_name", metavar="SCOPE")
    p.set_defaults(func=cmd_policy_get)

    host = top.add_parser("host", help="hosts and maintenance").add_subparsers(
        dest="cmd", required=True
    )
    p = host.add_parser("list", help="list hosts with state and usage")
    p.set_defaults(func=cmd_host_list)
    for name, method, what in (
        ("get", "GetHost", "show a host and its VMs"),
        ("cordon", "CordonHost", "take no new VMs"),
        ("uncordon", "UncordonHost", "take VMs again"),
        ("drain", "DrainHost", "cordon and move VMs away"),
    ):
        p = host.add_parser(name, help=what)
        p.add_argument("host", metavar="HOST")
        p.set_defaults(func=_host_call(method))
    cli_rebalance.add_commands(top, host)

    cl = top.add_parser("cluster", help="cluster-wide state").add_subparsers(
        dest="cmd", required=True
    )
    p = cl.add_parser("status", help="leader, counts, timing budget and failover headroom")
    p.set_defaults(func=cmd_cluster_status)

    p = top.add_parser("events", help="stream changes as they happen")
    p.add_argument("--kinds", default="", help="comma-separated: vm,host,rule,assignment,domain")
    p.set_defaults(func=cmd_events)

    p = top.add_parser("explain", help="why a VM can or cannot go on each host (as vm explain)")
    p.add_argument("name", metavar="NAME")
    _add_scope(p)
    p.set_defaults(func=cmd_vm_explain)

    p = top.add_parser(
        "simulate",
        help="what-if: the failover plan if hosts or a domain failed; changes nothing",
    )
    p.add_argument("--fail", action="append", metavar="HOST", help="a host to fail (repeatable)")
    p.add_argument(
        "--domain", metavar="KEY=VALUE", help="fail every host with this label (rack=r1)"
    )
    p.add_argument(
        "--cluster",
        metavar="FILE",
        help="offline: place the cluster described in FILE (TOML/JSON) in-process, no coordinator",
    )
    p.set_defaults(func=cmd_simulate)
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lab"]:
        # `hvplace lab ...` drives the single-machine lab; it talks to no coordinator.
        from hvplace.lab.cli import main as lab_main

        return lab_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    client = None
    endpoints = [e.strip() for e in args.endpoint.split(",") if e.strip()]
    try:
        if not getattr(args, "cluster", None) and not getattr(args, "local", False):
            creds = Credentials.load(args.ca, args.cert, args.key, args.token_file)
            client = Client(endpoints, timeout=args.timeout, credentials=creds)
        args.func(client, args)
    except HvplaceError as e:
        print(f"hvplace: {e.reason.value}: {e.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    finally:
        if client is not None:
            client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
