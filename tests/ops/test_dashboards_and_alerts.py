"""ops/: the alert rules pass `promtool check rules` and their unit tests; the dashboard
JSON is what its generator writes; and a real Prometheus (Debian's), scraping a real
test:/// lab through a failover and a fence, answers every dashboard panel's query with
data and evaluates every alert rule without error."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hvplace.lab import observe, secure, workload
from hvplace.lab.control import Lab, scratch_settings
from support.etcd import free_port
from support.processes import stop

OPS = Path(__file__).resolve().parents[2] / "ops"
RULES = OPS / "prometheus" / "hvplace-alerts.yml"
DASHBOARD = OPS / "grafana" / "hvplace-overview.json"
# Grafana's interval variables, as the test's whole history fits in them.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "5m"}
# Panels about the events the test makes: they must show them, not only a zero.
EVENT_PANELS = (
    "Pending VMs by reason [A]",
    "Placement latency [B]",
    "Failover duration [B]",
    "Fence duration (agents) [B]",
    "Fence events [A]",
    "API errors [A]",
)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: lab/install.sh installs Debian's prometheus package")
    return path


def promtool(*args: str, cwd: Path) -> str:
    out = subprocess.run(
        [tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    checked = promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert "SUCCESS: 10 rules found" in checked
    promtool("test", "rules", "hvplace-alerts.test.yml", cwd=RULES.parent)
    promtool("check", "config", "prometheus.yml", cwd=RULES.parent)


def test_dashboard_json_is_what_its_generator_writes() -> None:
    out = subprocess.run(
        [sys.executable, str(OPS / "grafana" / "dashboard.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables filled in) for every panel target."""
    board = json.loads(DASHBOARD.read_text())
    found = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            found.append((f"{panel['title']} [{target['refId']}]", expr))
    return found


class Prometheus:
    """Debian's prometheus on a loopback port with its own data dir; stopped by PID."""

    def __init__(self, tmp: Path, lab: Lab) -> None:
        state = lab.state()
        coordinators = [c.metrics_address for c in state.coordinators]
        agents = [h.metrics_address for h in state.hosts.values() if h.metrics_address]
        etcd = urllib.parse.urlsplit(state.etcd_endpoints[-1]).netloc
        tls_ca = str(secure.Secrets(state.secrets_dir).ca)
        jobs = {"hvplace-coordinator": coordinators, "hvplace-agent": agents, "etcd": [etcd]}
        config = {
            "global": {
                "scrape_interval": "2s",
                "scrape_timeout": "2s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": targets}]}
                # The lab's etcd speaks TLS only (its /metrics needs no etcd user).
                | ({"scheme": "https", "tls_config": {"ca_file": tls_ca}} if job == "etcd" else {})
                for job, targets in jobs.items()
            ],
        }
        self.targets = sum(len(t) for t in jobs.values())
        (tmp / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = tmp / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    tool("prometheus"),
                    f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    def finite(self, expr: str, positive: bool = False) -> bool:
        """At least one series with a number (a quantile of no events is NaN)."""
        values = [float(s["value"][1]) for s in self.query(expr)]
        return any(math.isfinite(v) and (v > 0 or not positive) for v in values)

    def wait(self, what: str, check: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited: {self.log.read_text()[-2000:]}")
            try:
                if check():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.2)

    def firing(self, alert: str) -> bool:
        alerts = self.get("/api/v1/alerts")["alerts"]
        return any(a["labels"]["alertname"] == alert and a["state"] == "firing" for a in alerts)

    def close(self) -> None:
        stop(self.proc)


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    """A test:/// lab of three hosts (TTL 2 s) whose coordinators resync and sample rule
    compliance every second, so the slow-moving panels fill within the test."""
    monkeypatch.setenv("HVPLACE_RESYNC_S", "1")
    lab = Lab(scratch_settings(tmp_path / "lab", prefix="hvo"))
    try:
        lab.up(3, "test", lease_ttl=2.0)
        yield lab
    finally:
        assert lab.down() == []


def test_every_dashboard_panel_returns_data_from_a_real_prometheus(
    lab: Lab, tmp_path: Path
) -> None:
    started = time.monotonic()
    prom = Prometheus(tmp_path, lab)
    try:
        prom.wait("prometheus ready", lambda: urllib.request.urlopen(prom.url + "/-/ready"))

        down: list[str] = []

        def all_up() -> bool:
            active = prom.get("/api/v1/targets")["activeTargets"]
            down[:] = [f"{t['scrapeUrl']}: {t['lastError']}" for t in active if t["health"] != "up"]
            return len(active) == prom.targets and not down

        try:
            prom.wait("every target scraped", all_up, timeout=60)
        except pytest.fail.Exception:
            pytest.fail("targets not up:\n" + "\n".join(down))

        # Events for the panels: placements, a pending VM, an API error, a failover, a fence.
        image = workload.image_args(lab.state())
        workload.hvplace(lab, "rule", "create", "apart", "--kind", "anti-affinity",
                         "--selector", "app=web")  # fmt: skip
        workload.hvplace(lab, "vm", "create", "web", "--count", "2", "--label", "app=web", *image)
        workload.hvplace(lab, "vm", "create", "batch", "--count", "3", *image)
        workload.hvplace(lab, "vm", "create", "huge", "--memory", "1000000", *image, check=False)
        # Twice, a scrape apart: a counter's first sample (its birth at 1) shows no rate.
        workload.hvplace(lab, "vm", "get", "default/absent", check=False)
        prom.wait(
            "the first error scraped",
            lambda: prom.finite('hvplace_api_requests_total{code="NOT_FOUND"}'),
        )
        workload.hvplace(lab, "vm", "get", "default/absent", check=False)
        etcd = lab.etcd_endpoint()
        keys = ["default/web-1", "default/web-2", *(f"default/batch-{i}" for i in (1, 2, 3))]
        before = observe.wait_for(etcd, workload.all_running(keys), 30, "VMs running")
        victim = before.host_of("default/web-1")
        assert victim is not None
        # A partitioned agent stops renewing: the coordinator fails its VMs over; healed,
        # the agent finds its lease gone and fences before anything else.
        lab.partition(victim)
        observe.wait_for(
            etcd,
            lambda s: s.lost(victim) and workload.all_running(keys)(s),
            30,
            f"{victim} lost and its VMs running elsewhere",
        )
        prom.wait("HvplaceHostLost firing", lambda: prom.firing("HvplaceHostLost"))
        lab.heal(victim)
        prom.wait(
            "a fence observed",
            lambda: prom.finite("sum(hvplace_agent_fence_duration_seconds_count) > 0"),
        )
        prom.wait("HvplaceAgentFenced firing", lambda: prom.firing("HvplaceAgentFenced"))

        queries = panel_queries()
        assert len(queries) >= 25
        assert set(EVENT_PANELS) <= {title for title, _ in queries}
        empty: list[str] = []

        def every_panel_has_data() -> bool:
            empty[:] = [
                f"{title}: {expr}"
                for title, expr in queries
                if not prom.finite(expr, positive=title in EVENT_PANELS)
            ]
            return not empty

        try:
            prom.wait("every panel's data", every_panel_has_data, timeout=30)
        except pytest.fail.Exception:
            pytest.fail("panels without data:\n" + "\n".join(empty))

        # Every alert rule evaluates against the real series without an error.
        groups = prom.get("/api/v1/rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == 10
        assert [r["name"] for r in rules if r["health"] != "ok"] == []
        print(f"all {len(queries)} panel queries answered in {time.monotonic() - started:.1f}s")
    finally:
        prom.close()
