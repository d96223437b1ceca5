"""`hvplace rule ...` and `hvplace policy ...`: affinity rules and per-scope policies."""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Iterable
from typing import Any

from hvplace.cli import rebalance
from hvplace.cli.client import Client
from hvplace.cli.render import add_scope, admission_text, emit, json_to_proto, kv, ref, table
from hvplace.coordinator.convert import proto_to_dict
from hvplace.proto.errors import InvalidInput
from hvplace.proto.v1 import hvplace_pb2 as pb

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


def _rule_from_args(args: argparse.Namespace, base: dict[str, Any] | None) -> dict[str, Any]:
    scope, name = ref(args.name, args.scope)
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
        rule["selector"] = {"match_labels": kv(args.selector, "--selector")}
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
    adm = admission_text(resp.admission)
    return out + ("\n" + adm if adm else "")


def cmd_rule_create(c: Client, args: argparse.Namespace) -> None:
    rule = json_to_proto(_rule_from_args(args, None), pb.Rule)
    rebalance.wait_for_moves(c, args.rebalance)
    resp: pb.RuleResponse = c.call(
        "rule",
        "CreateRule",
        pb.CreateRuleRequest(
            request_id=args.request_id or uuid.uuid4().hex, rule=rule, rebalance=args.rebalance
        ),
    )
    emit(args, resp, lambda: _rule_response_text(resp))


def cmd_rule_update(c: Client, args: argparse.Namespace) -> None:
    scope, name = ref(args.name, args.scope)
    current: pb.RuleView = c.call("rule", "GetRule", pb.RuleRef(scope=scope, name=name))
    rule = json_to_proto(_rule_from_args(args, proto_to_dict(current.rule)), pb.Rule)
    rebalance.wait_for_moves(c, args.rebalance)
    resp: pb.RuleResponse = c.call(
        "rule", "UpdateRule", pb.UpdateRuleRequest(rule=rule, rebalance=args.rebalance)
    )
    emit(args, resp, lambda: _rule_response_text(resp))


def cmd_rule_get(c: Client, args: argparse.Namespace) -> None:
    scope, name = ref(args.name, args.scope)
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

    emit(args, view, text)


def cmd_rule_list(c: Client, args: argparse.Namespace) -> None:
    resp: pb.ListRulesResponse = c.call("rule", "ListRules", pb.ListRulesRequest(scope=args.scope))
    emit(args, resp, lambda: table(RULE_HEADERS, _rule_rows(resp.rules)))


def cmd_rule_delete(c: Client, args: argparse.Namespace) -> None:
    scope, name = ref(args.name, args.scope)
    resp = c.call(
        "rule", "DeleteRule", pb.DeleteRuleRequest(scope=scope, name=name, force=args.force)
    )
    emit(args, resp, lambda: f"deleted rule {scope}/{name}")


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
    rebalance.wait_for_moves(c, args.rebalance)
    resp: pb.ScopePolicy = c.call("rule", "SetScopePolicy", policy)
    emit(args, resp, lambda: _policy_text(resp))


def cmd_policy_get(c: Client, args: argparse.Namespace) -> None:
    resp: pb.ScopePolicy = c.call("rule", "GetScopePolicy", pb.ScopeRef(scope=args.scope_name))
    emit(args, resp, lambda: _policy_text(resp))


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


def register(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rule = top.add_parser("rule", help="affinity and anti-affinity rules").add_subparsers(
        dest="cmd", required=True
    )
    p = rule.add_parser("create", help="create a rule (refused if running VMs break it)")
    p.add_argument("name", metavar="NAME")
    add_scope(p)
    _add_rule_fields(p)
    p.add_argument("--request-id", help="idempotency key")
    p.set_defaults(func=cmd_rule_create)
    p = rule.add_parser("update", help="change a rule; unnamed fields keep their value")
    p.add_argument("name", metavar="NAME")
    add_scope(p)
    _add_rule_fields(p)
    p.set_defaults(func=cmd_rule_update)
    p = rule.add_parser("get", help="a rule, its members and where each runs")
    p.add_argument("name", metavar="NAME")
    add_scope(p)
    p.set_defaults(func=cmd_rule_get)
    p = rule.add_parser("list", help="list rules")
    p.add_argument("--scope", default="", help="only this scope")
    p.set_defaults(func=cmd_rule_list)
    p = rule.add_parser(
        "delete", help="delete a rule (refused while it has members unless --force)"
    )
    p.add_argument("name", metavar="NAME")
    add_scope(p)
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
