"""The Kubernetes objects that carry ``k8s/monitoring/stowaway.rules.yml``, written from it.

The plain rules file is the one source of truth; the PrometheusRule (Prometheus
Operator) and the Rules object (GKE Managed Prometheus) wrap its groups unchanged.
After editing the rules file, write them again with::

    python -m tests.support.monitoring_rules

``tests/deploy/test_monitoring.py`` fails while a committed file differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "k8s" / "monitoring"
RULES_FILE = MONITORING / "stowaway.rules.yml"
#: each generated file: (apiVersion, kind) of the object that holds the groups
WRAPPERS: dict[Path, tuple[str, str]] = {
    MONITORING / "prometheus-operator" / "prometheusrule.yaml": (
        "monitoring.coreos.com/v1",
        "PrometheusRule",
    ),
    MONITORING / "gmp" / "rules.yaml": ("monitoring.googleapis.com/v1", "Rules"),
}
LABELS = {"app.kubernetes.io/name": "stowaway", "app.kubernetes.io/component": "monitoring"}
REGENERATE = "python -m tests.support.monitoring_rules"


def rule_groups() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    assert isinstance(groups, list)
    return groups


def wrapped(path: Path) -> dict[str, Any]:
    api_version, kind = WRAPPERS[path]
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"name": "stowaway", "labels": LABELS},
        "spec": {"groups": rule_groups()},
    }


def render(path: Path) -> str:
    header = f"# Written from ../stowaway.rules.yml by `{REGENERATE}`: do not edit.\n"
    return header + yaml.safe_dump(wrapped(path), sort_keys=False, width=100)


def main() -> None:
    for path in WRAPPERS:
        path.write_text(render(path))
        print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
