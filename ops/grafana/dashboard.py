"""Writes hvplace-overview.json, the Grafana dashboard of an hvplace fleet, from the panel
list below (`python ops/grafana/dashboard.py`; `--check` fails if the file is stale)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("hvplace-overview.json")
DS = {"type": "prometheus", "uid": "${datasource}"}

# Only the leading coordinator keeps the cluster-wide gauges current; a standby's (or a
# deposed leader's) copies are stale, so those queries keep the leader's series alone.
LEADER = "and on (instance) (hvplace_leader == 1)"


def q(expr: str, legend: str = "") -> dict[str, str]:
    return {"expr": expr, "legendFormat": legend}


def quantiles(metric: str, by: str = "") -> list[dict[str, str]]:
    """p50 and p99 of a histogram over the panel's rate interval, and the slowest bucket."""
    group = f"le, {by}" if by else "le"
    label = f"{{{{{by}}}}} " if by else ""
    return [
        q(
            f"histogram_quantile({p}, sum by ({group}) (rate({metric}_bucket[$__rate_interval])))",
            f"{label}p{int(p * 100)}",
        )
        for p in (0.5, 0.99)
    ]


# (row title, [(panel title, type, unit, description, targets)]) in screen order.
ROWS: list[tuple[str, list[tuple[str, str, str, str, list[dict[str, str]]]]]] = [
    (
        "Fleet",
        [
            (
                "Leader and fencing token",
                "stat",
                "none",
                "The leading coordinator and its fencing token (its election key's create"
                " revision); a new token means a new leader.",
                [q(f"hvplace_leader_fencing_token {LEADER}", "{{instance}}")],
            ),
            (
                "Coordinators leading",
                "stat",
                "none",
                "Should be 1. 0: no leader (nothing is placed or failed over).",
                [q("sum(hvplace_leader)", "leaders")],
            ),
            (
                "HA headroom",
                "stat",
                "none",
                "1 when the loss of any one host can be absorbed under every required rule.",
                [q(f"min(hvplace_ha_headroom_ok {LEADER})", "headroom ok")],
            ),
            (
                "Hosts by state",
                "timeseries",
                "none",
                "ready, cordoned, draining, lost (and any state the coordinator reports).",
                [q(f"sum by (state) (hvplace_hosts {LEADER})", "{{state}}")],
            ),
            (
                "VMs by phase",
                "timeseries",
                "none",
                "pending, scheduled, running, stopped, failed, as the API reports them.",
                [q(f"sum by (phase) (hvplace_vms {LEADER})", "{{phase}}")],
            ),
            (
                "Pending VMs by reason",
                "timeseries",
                "none",
                "The first reason code of each pending VM's explanation (`hvplace vm explain`).",
                [q(f"sum by (reason) (hvplace_pending_vms {LEADER})", "{{reason}}")],
            ),
        ],
    ),
    (
        "Placement, failover and fencing",
        [
            (
                "Placement latency",
                "timeseries",
                "s",
                "From snapshot to committed plan, per placement transaction.",
                quantiles("hvplace_placement_latency_seconds"),
            ),
            (
                "Placements",
                "timeseries",
                "ops",
                "VMs placed (or left pending) by committed plans, per second.",
                [
                    q(
                        "sum by (result) (rate(hvplace_placements_total[$__rate_interval]))",
                        "{{result}}",
                    )
                ],
            ),
            (
                "Failover duration",
                "timeseries",
                "s",
                "From a host's loss being noticed to its VMs' re-placement being committed.",
                quantiles("hvplace_failover_duration_seconds"),
            ),
            (
                "Fence duration (agents)",
                "timeseries",
                "s",
                "From an agent's decision to fence itself to every managed domain destroyed.",
                quantiles("hvplace_agent_fence_duration_seconds"),
            ),
            (
                "Fence events",
                "timeseries",
                "none",
                "Agents that fenced themselves (lease lost), and writes of a deposed leader"
                " that etcd rejected (stale fencing token).",
                [
                    q(
                        "sum by (instance) "
                        "(increase(hvplace_agent_fence_events_total[$__rate_interval]))",
                        "agent {{instance}}",
                    ),
                    q(
                        "sum by (instance) "
                        "(increase(hvplace_fence_rejections_total[$__rate_interval]))",
                        "coordinator {{instance}}",
                    ),
                ],
            ),
            (
                "HA headroom per host",
                "timeseries",
                "none",
                "0: losing this host would leave a required rule's member with nowhere to go.",
                [q(f"hvplace_ha_headroom {LEADER}", "{{host}}")],
            ),
        ],
    ),
    (
        "Rules",
        [
            (
                "Rule compliance",
                "timeseries",
                "none",
                "1 while the rule holds where VMs run now.",
                [q(f"hvplace_rule_satisfied {LEADER}", "{{rule}}")],
            ),
            (
                "Degraded VMs per rule",
                "timeseries",
                "none",
                "VMs knowingly breaking a rule with on_failure=degrade (the rebalancer repairs).",
                [q(f"hvplace_rule_degraded_vms {LEADER}", "{{rule}}")],
            ),
            (
                "Time in violation per required rule",
                "timeseries",
                "s",
                "Seconds each required rule was broken or degraded over the dashboard's range"
                " (summed over the coordinators that led meanwhile).",
                [
                    q(
                        "sum by (rule) (increase(hvplace_rule_violation_seconds_total[$__range]))",
                        "{{rule}}",
                    )
                ],
            ),
        ],
    ),
    (
        "API",
        [
            (
                "API requests",
                "timeseries",
                "reqps",
                "gRPC calls per second by method and status code (refused calls included).",
                [
                    q(
                        "sum by (method, code) "
                        "(rate(hvplace_api_requests_total[$__rate_interval]))",
                        "{{method}} {{code}}",
                    )
                ],
            ),
            (
                "API errors",
                "timeseries",
                "reqps",
                "Calls that did not end OK, by method and status code.",
                [
                    q(
                        "sum by (method, code) "
                        '(rate(hvplace_api_requests_total{code!="OK"}[$__rate_interval]))',
                        "{{method}} {{code}}",
                    )
                ],
            ),
            (
                "API latency p99",
                "timeseries",
                "s",
                "Unary calls, by method.",
                [
                    q(
                        "histogram_quantile(0.99, sum by (le, method) "
                        "(rate(hvplace_api_request_duration_seconds_bucket[$__rate_interval])))",
                        "{{method}}",
                    )
                ],
            ),
        ],
    ),
    (
        "Agents and etcd",
        [
            (
                "Agents holding a lease / fenced",
                "timeseries",
                "none",
                "Agents registered under a live lease, and agents fenced now.",
                [
                    q("sum(hvplace_agent_lease_held)", "lease held"),
                    q("sum(hvplace_agent_fenced)", "fenced"),
                ],
            ),
            (
                "Domains by state",
                "timeseries",
                "none",
                "Managed domains as the agents see them in libvirt.",
                [q("sum by (state) (hvplace_agent_domains)", "{{state}}")],
            ),
            (
                "Lease renewal latency p99",
                "timeseries",
                "s",
                "Acknowledged renewals per agent; a renewal slower than fence_after fences.",
                [
                    q(
                        "histogram_quantile(0.99, sum by (le, instance) "
                        "(rate(hvplace_agent_lease_renew_seconds_bucket[$__rate_interval])))",
                        "{{instance}}",
                    )
                ],
            ),
            (
                "Lease renewal failures and reconcile errors",
                "timeseries",
                "ops",
                "Renewals that failed (etcd unreachable from the host) and agent actions that"
                " failed, per second.",
                [
                    q(
                        "sum(rate(hvplace_agent_lease_renew_failures_total[$__rate_interval]))",
                        "renewal failures",
                    ),
                    q(
                        "sum(rate(hvplace_agent_reconcile_errors_total[$__rate_interval]))",
                        "reconcile errors",
                    ),
                ],
            ),
            (
                "etcd",
                "timeseries",
                "none",
                "etcd members up (scrape job `etcd`) and with a leader; the coordinators'"
                " transaction conflicts per second (someone wrote first).",
                [
                    q('sum(up{job="etcd"})', "members up"),
                    q("sum(etcd_server_has_leader)", "members with a leader"),
                    q(
                        "sum(rate(hvplace_etcd_txn_conflicts_total[$__rate_interval]))",
                        "txn conflicts/s",
                    ),
                ],
            ),
            (
                "Coordinator cache revision",
                "timeseries",
                "none",
                "The etcd revision each coordinator's cache holds; a flat line while others"
                " move means a stuck watch.",
                [q("hvplace_cache_revision", "{{instance}}")],
            ),
        ],
    ),
]


def panel(pid: int, x: int, y: int, spec: tuple[str, str, str, str, list[dict[str, str]]]) -> Any:
    title, kind, unit, description, targets = spec
    body: dict[str, Any] = {
        "id": pid,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"datasource": DS, "refId": chr(ord("A") + i), **t} for i, t in enumerate(targets)
        ],
    }
    if kind == "stat":
        body["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"}
    else:
        body["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}}
    return body


def dashboard() -> dict[str, Any]:
    panels: list[Any] = []
    y = 0
    pid = 1
    for row_title, specs in ROWS:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid += 1
        y += 1
        for i, spec in enumerate(specs):
            panels.append(panel(pid, (i % 3) * 8, y + (i // 3) * 8, spec))
            pid += 1
        y += ((len(specs) + 2) // 3) * 8
    return {
        "uid": "hvplace-overview",
        "title": "hvplace fleet overview",
        "description": "Hosts, VMs, placement, failover and fencing, rules, API and agents"
        " of one hvplace cluster. Generated by ops/grafana/dashboard.py.",
        "tags": ["hvplace"],
        "editable": True,
        "schemaVersion": 38,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "graphTooltip": 1,
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                }
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the JSON file is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python {Path(__file__)}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
