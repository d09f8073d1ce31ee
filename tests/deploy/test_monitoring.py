"""k8s/monitoring: the alerting rules, the Grafana dashboard and the objects that ship them.

* the rules pass ``promtool check rules``, and ``promtool test rules`` shows every alert
  firing and resolving on synthetic series;
* the PrometheusRule and the GKE Managed Prometheus Rules object hold exactly the plain
  rules file (its one source of truth), and ``kubectl kustomize`` renders both variants;
* the scrape objects select the StatefulSet's pods and ports;
* the dashboard is templated (data source, namespace) and every name the rules and the
  dashboard use is exported by a real ``stowaway serve`` (so names cannot drift), and
  every query and rule evaluates without error on a real Prometheus scraping it.

A test needing promtool, prometheus or kubectl is skipped, saying so, where it is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import StowawayFactory
from tests.support.dicom_files import make_study
from tests.support.healthcare_stub import HealthcareStub
from tests.support.monitoring_rules import (
    MONITORING,
    REGENERATE,
    REPO,
    RULES_FILE,
    WRAPPERS,
    render,
    rule_groups,
)
from tests.support.processes import StowawayProcess, dcmsend, free_port, terminate
from tests.support.seeding import wait_until

pytestmark = pytest.mark.timeout(180)

RULES_TESTS = MONITORING / "tests" / "stowaway.rules.test.yml"
DASHBOARD = MONITORING / "dashboard" / "stowaway.json"
STATEFULSET = REPO / "k8s" / "base" / "statefulset.yaml"
DOCS = REPO / "docs" / "monitoring.md"

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
KUBECTL = shutil.which("kubectl")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)"
)
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus is not installed (Debian package prometheus)"
)
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed: k8s/monitoring cannot be rendered"
)

#: A metric name of ours in a PromQL expression.
OUR_NAME = re.compile(r"\bstowaway_[a-z0-9_]+\b")
#: One selector of one of our metrics: the name and what is between its braces.
OUR_SELECTOR = re.compile(r"\b(stowaway_[a-z0-9_]+)(\{[^}]*\})?")
FAST = ("--poll-interval", "50ms", "--backoff-initial", "200ms", "--backoff-max", "500ms")
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def alerts() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in panels(dashboard()) for t in p.get("targets", [])]


def dashboard_queries() -> list[str]:
    """Every PromQL text of the dashboard: the panels' and the variables'."""
    variables = [v["definition"] for v in dashboard()["templating"]["list"] if "definition" in v]
    return [*dashboard_exprs(), *variables]


def kustomize(directory: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {directory}: {result.stderr.strip()}"
    return [d for d in yaml.safe_load_all(result.stdout) if d is not None]


# ------------------------------------------------------------------------------ rules


@needs_promtool
def test_rules_pass_promtool_check() -> None:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES_FILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


@needs_promtool
def test_every_alert_fires_and_resolves_in_promtool_unit_tests() -> None:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(RULES_TESTS.relative_to(MONITORING))],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # ...and the tests cover every alert: each is seen firing, then seen silent later.
    cases = yaml.safe_load(RULES_TESTS.read_text())["tests"]
    for alert in alerts():
        name = alert["alert"]
        checks = [c for case in cases for c in case.get("alert_rule_test", [])]
        firing = [c for c in checks if c["alertname"] == name and c["exp_alerts"]]
        assert firing, f"no promtool test shows {name} firing"
        resolved = [
            case
            for case in cases
            for c in case.get("alert_rule_test", [])
            if c["alertname"] == name
            and c["exp_alerts"]
            and any(
                later["alertname"] == name
                and not later["exp_alerts"]
                and _minutes(later["eval_time"]) > _minutes(c["eval_time"])
                for later in case["alert_rule_test"]
            )
        ]
        assert resolved, f"no promtool test shows {name} resolving after it fired"


def _minutes(duration: str) -> int:
    match = re.fullmatch(r"(\d+)m", duration)
    assert match, f"eval_time {duration!r}: write it in minutes"
    return int(match.group(1))


def test_every_alert_is_documented_with_severity_summary_and_first_action() -> None:
    docs = DOCS.read_text()
    for alert in alerts():
        assert alert["labels"]["severity"] in {"critical", "warning"}, alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
        assert f"`{alert['alert']}`" in docs, f"{alert['alert']} is not in docs/monitoring.md"


def test_rule_objects_are_the_rules_file_unchanged() -> None:
    for path, (_api, kind) in WRAPPERS.items():
        assert path.read_text() == render(path), (
            f"{path.relative_to(REPO)} differs from {RULES_FILE.relative_to(REPO)}: "
            f"run `{REGENERATE}`"
        )
        (obj,) = yaml.safe_load_all(path.read_text())
        assert obj["kind"] == kind
        assert obj["spec"]["groups"] == rule_groups()


# -------------------------------------------------------------------------- manifests


@needs_kubectl
@pytest.mark.parametrize(
    ("directory", "kinds"),
    [
        ("", {"ConfigMap", "PodMonitor", "PrometheusRule"}),
        ("gmp", {"ConfigMap", "PodMonitoring", "Rules"}),
    ],
)
def test_kustomize_renders_the_dashboard_scrape_and_rules(directory: str, kinds: set[str]) -> None:
    objs = kustomize(MONITORING / directory)
    assert {o["kind"] for o in objs} == kinds
    assert len(objs) == len(kinds)
    for obj in objs:
        # No namespace of ours: `kubectl apply -n NAMESPACE -k ...` puts them in stowaway's.
        assert "namespace" not in obj["metadata"], obj["kind"]
    (configmap,) = [o for o in objs if o["kind"] == "ConfigMap"]
    assert configmap["metadata"]["name"] == "stowaway-dashboard"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["stowaway.json"]) == dashboard()
    (rules,) = [o for o in objs if o["kind"] in {"PrometheusRule", "Rules"}]
    assert rules["spec"]["groups"] == rule_groups()


def test_scrape_objects_select_the_statefulsets_pods_and_http_ports() -> None:
    sts = yaml.safe_load(STATEFULSET.read_text())
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    http_ports: set[str] = set()
    for container in sts["spec"]["template"]["spec"]["containers"]:
        # the port stowaway serves /metrics on: --http-port (8080 unless given)
        http_port = 8080
        for arg in container["args"]:
            if arg.startswith("--http-port="):
                http_port = int(arg.split("=", 1)[1])
        named = [p["name"] for p in container["ports"] if p["containerPort"] == http_port]
        assert named, f"{container['name']}: no named port for /metrics"
        http_ports.add(named[0])
    assert len(http_ports) == 2  # the receiver's and the forwarder's

    target_down = next(a for a in alerts() if a["alert"] == "StowawayTargetDown")
    job_pattern = re.search(r'job=~"([^"]+)"', target_down["expr"])
    assert job_pattern is not None
    for path, endpoints_key, job in (
        (MONITORING / "prometheus-operator" / "podmonitor.yaml", "podMetricsEndpoints", "ns/"),
        (MONITORING / "gmp" / "podmonitoring.yaml", "endpoints", ""),
    ):
        monitor = yaml.safe_load(path.read_text())
        assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), path
        endpoints = monitor["spec"][endpoints_key]
        assert {e["port"] for e in endpoints} == http_ports, path
        assert {e.get("path", "/metrics") for e in endpoints} == {"/metrics"}, path
        # The job label each one gives its targets is the one the alert looks for.
        assert re.fullmatch(job_pattern.group(1), job + monitor["metadata"]["name"]), path


# -------------------------------------------------------------------------- dashboard


def test_dashboard_is_templated_by_data_source_and_namespace() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    namespace = variables["namespace"]
    assert namespace["includeAll"] and namespace["allValue"] == ".*"
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))
    drawn = [p for p in panels(board) if p["type"] != "row"]
    assert len(drawn) >= 15
    for panel in drawn:
        where = f"panel {panel['title']!r}"
        assert panel["targets"], where
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, where
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", where
            selectors = OUR_SELECTOR.findall(t["expr"])
            assert selectors, f"{where}: {t['expr']} reads none of our metrics"
            for name, braces in selectors:
                assert 'namespace=~"$namespace"' in braces, f"{where}: {name} not by namespace"
    # what the issue asks to see
    text = json.dumps(board)
    for name in (
        "stowaway_instances_received_total",
        "stowaway_instances_forwarded_total",
        "stowaway_queue_instances",
        "stowaway_queue_oldest_pending_age_seconds",
        "stowaway_destination_blocked",
        "stowaway_instances_failed_total",
        "stowaway_deliveries_failed_total",
        "stowaway_spool_free_bytes",
    ):
        assert name in text, name


# ------------------------------------------------------------- against a real stowaway


def forwarding_serve(stowaway: StowawayFactory, stub: HealthcareStub) -> StowawayProcess:
    return stowaway("serve", "--dicomweb-url", stub.base_url, *FAST)


def forward_one(proc: StowawayProcess, stub: HealthcareStub, tmp_path: Path) -> None:
    """Receive and forward one instance, so that every series has been created."""
    files = make_study(tmp_path / "study", 1, rows=32, cols=32, seed=71)
    assert dcmsend(proc.port, files).returncode == 0
    wait_until(lambda: len(stub.stored) == 1, 30)
    wait_until(lambda: "stowaway_upload_duration_seconds_bucket" in scrape_names(proc), 10)


def scrape_names(proc: StowawayProcess) -> set[str]:
    response = requests.get(f"http://127.0.0.1:{proc.http_port}/metrics", timeout=10)
    assert response.status_code == 200
    return {
        sample.name
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


@SQLITE_ONLY
def test_every_metric_the_rules_and_dashboard_use_is_exported_by_serve(
    stowaway: StowawayFactory, tmp_path: Path
) -> None:
    with HealthcareStub() as stub:
        proc = forwarding_serve(stowaway, stub)
        forward_one(proc, stub, tmp_path)
        exported = scrape_names(proc)
        assert proc.stop() == 0
    used = {
        "rules": {n for a in alerts() for n in OUR_NAME.findall(a["expr"])},
        "dashboard": {n for q in dashboard_queries() for n in OUR_NAME.findall(q)},
    }
    for where, names in used.items():
        assert len(names) >= 5, where
        assert names <= exported, f"the {where} use metrics /metrics lacks: {names - exported}"
    # ...and every metric of ours is in docs/monitoring.md's table.
    docs = DOCS.read_text()
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in exported}
    undocumented = {
        n for n in families if n.startswith("stowaway_") and not re.search(rf"`{n}[`_]", docs)
    }
    assert not undocumented, f"docs/monitoring.md does not list {undocumented}"


class Prometheus:
    """A real Prometheus on loopback scraping one target every second, with our rules."""

    def __init__(self, tmp_path: Path, target_port: int) -> None:
        assert PROMETHEUS is not None
        self.port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(RULES_FILE)],
                    "scrape_configs": [
                        {
                            "job_name": "stowaway",
                            "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
                        }
                    ],
                }
            )
        )
        self.log = (tmp_path / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.http = requests.Session()
        self.http.trust_env = False

    def api(self, path: str, **params: str) -> Any:
        response = self.http.get(f"http://127.0.0.1:{self.port}{path}", params=params, timeout=10)
        body = response.json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    def ready(self) -> bool:
        try:
            return self.http.get(f"http://127.0.0.1:{self.port}/-/ready", timeout=2).ok
        except requests.ConnectionError:
            return False

    def query(self, expr: str) -> list[Any]:
        result = self.api("/api/v1/query", query=expr)["result"]
        assert isinstance(result, list)
        return result

    def close(self) -> None:
        terminate(self.proc, 10)
        self.http.close()
        self.log.close()


@needs_prometheus
@SQLITE_ONLY
def test_every_dashboard_query_and_rule_evaluates_on_a_real_prometheus(
    stowaway: StowawayFactory, tmp_path: Path
) -> None:
    with HealthcareStub() as stub:
        proc = forwarding_serve(stowaway, stub)
        # Prometheus first: it takes a few seconds to start scraping a new target.
        prometheus = Prometheus(tmp_path, proc.http_port)
        try:
            forward_one(proc, stub, tmp_path)
            wait_until(prometheus.ready, 30)
            # rates need a few samples in their window
            wait_until(lambda: prometheus.query('count_over_time(up{job="stowaway"}[1m]) >= 3'), 30)
            for expr in dashboard_queries():
                if expr.startswith("label_values("):
                    metric = expr.removeprefix("label_values(").split(",")[0]
                    assert prometheus.query(metric), expr
                    continue
                concrete = expr.replace("$namespace", ".*").replace("$__rate_interval", "1m")
                assert prometheus.query(concrete), f"no series for the panel query {expr}"

            def evaluated() -> list[dict[str, Any]]:
                rules = [r for g in prometheus.api("/api/v1/rules")["groups"] for r in g["rules"]]
                return rules if all(r["health"] != "unknown" for r in rules) else []

            wait_until(evaluated, 30)
            rules = evaluated()
            assert {r["name"] for r in rules} == {a["alert"] for a in alerts()}
            for rule in rules:
                assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
            # a healthy gateway: nothing fires, nothing is pending
            assert prometheus.query("ALERTS") == []
        finally:
            prometheus.close()
        assert proc.stop() == 0
