"""Every PromQL expression the repo ships (dashboard, recording and alert rules, KEDA triggers),
parsed with a real PromQL parser, and the metric and label names they select."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import promql_parser
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.server import REPO_ROOT

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "genserve.json"
RULE_FILES = (REPO_ROOT / "deploy" / "prometheus" / "recording_rules.yml",
              REPO_ROOT / "deploy" / "prometheus" / "alert_rules.yml")
SCALED_OBJECT = REPO_ROOT / "deploy" / "k8s" / "base" / "scaledobject.yaml"
# Grafana's template variables, replaced by values a query could take before parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$model": ".*", "$instance": ".*"}
# Labels Prometheus itself attaches to every scraped series (target labels).
TARGET_LABELS = {"job", "instance"}


@dataclass(frozen=True)
class Expression:
    where: str
    text: str


@dataclass(frozen=True)
class Selector:
    metric: str
    labels: frozenset[str]


def dashboard_expressions() -> list[Expression]:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expressions.append(Expression(f"dashboard panel {panel['title']!r} {target['refId']}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]["query"]
        # label_values(<selector>, <label>) is Grafana's, not PromQL: check its selector.
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
        assert match, query
        expressions.append(Expression(f"dashboard variable {variable['name']}", match.group(1)))
    return expressions


def rule_expressions() -> list[Expression]:
    expressions = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                name = rule.get("record") or rule.get("alert")
                expressions.append(Expression(f"{path.name} {name}", rule["expr"]))
    return expressions


def recorded_names() -> set[str]:
    return {rule["record"] for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if "record" in rule}


def keda_expressions() -> list[Expression]:
    scaled_object = yaml.safe_load(SCALED_OBJECT.read_text())
    return [Expression(f"ScaledObject trigger {trigger.get('name')}", trigger["metadata"]["query"])
            for trigger in scaled_object["spec"]["triggers"] if trigger["type"] == "prometheus"]


def all_expressions() -> list[Expression]:
    return dashboard_expressions() + rule_expressions() + keda_expressions()


def substitute_grafana_variables(text: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        text = text.replace(variable, value)
    assert "$" not in text.replace("$labels", "").replace("$value", ""), f"unknown variable in {text}"
    return text


def selectors(text: str) -> list[Selector]:
    """The vector selectors of one expression (raises ValueError when it does not parse)."""
    found: list[Selector] = []

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            labels = {matcher.name for matcher in node.matchers.matchers}
            metric = node.name
            if metric is None:  # {__name__="x"} form
                metric = next(matcher.value for matcher in node.matchers.matchers if matcher.name == "__name__")
            found.append(Selector(metric, frozenset(labels - {"__name__"})))

    promql_parser.walk(promql_parser.parse(substitute_grafana_variables(text)), visit)
    return found


def exported_series_labels(metrics_text: str) -> dict[str, set[str]]:
    """{sample name (with _bucket/_total/...): label names} from an exposition text."""
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def unknown_names(expression: Expression, exported: dict[str, set[str]], recorded: set[str]) -> list[str]:
    """Metric names the expression selects that nothing exports, and label names a metric lacks."""
    problems = []
    for selector in selectors(expression.text):
        if selector.metric == "up":
            allowed = TARGET_LABELS
        elif selector.metric in recorded:
            continue
        elif selector.metric in exported:
            allowed = exported[selector.metric] | TARGET_LABELS
        else:
            problems.append(f"{expression.where}: metric {selector.metric} is not exported")
            continue
        for label in sorted(selector.labels - allowed):
            problems.append(f"{expression.where}: {selector.metric} has no label {label}")
    return problems

