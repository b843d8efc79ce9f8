"""The Prometheus side against the real tools: promtool on the config, rules, rule unit tests and the
live /metrics; a real Prometheus scraping a real server with the repo's own scrape config; every
PromQL expression the repo ships names only metrics and labels the server exports."""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy import promql_names
from tests.deploy.conftest import LiveServer, find_tool, send_traffic
from tests.integration.server import REPO_ROOT, free_port

PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
PARADIGMS = ("autoregressive", "diffusion")


def promtool(*args: str, stdin: str | None = None, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run([find_tool("promtool"), *args], input=stdin, capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_promtool_check_config() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", "recording_rules.yml", "alert_rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 10 rules found" in result.stdout and "SUCCESS: 5 rules found" in result.stdout


def test_promtool_test_rules_has_a_firing_and_a_quiet_case_per_alert() -> None:
    tests_file = PROMETHEUS_DIR / "tests" / "alert_rules_test.yml"
    result = promtool("test", "rules", tests_file.name, cwd=tests_file.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {rule["alert"] for group in yaml.safe_load((PROMETHEUS_DIR / "alert_rules.yml").read_text())["groups"]
              for rule in group["rules"] if "alert" in rule}
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(tests_file.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == alerts and quiet == alerts


def test_promtool_check_metrics_on_live_metrics(live_server: LiveServer) -> None:
    text = live_server.metrics_text()
    result = promtool("check", "metrics", stdin=text)
    assert result.returncode == 0 and result.stdout.strip() == "" and result.stderr.strip() == "", \
        result.stdout + result.stderr


def test_every_shipped_expression_names_exported_metrics(live_server: LiveServer) -> None:
    exported = promql_names.exported_series_labels(live_server.metrics_text())
    recorded = promql_names.recorded_names()
    expressions = promql_names.all_expressions()
    assert len(expressions) > 40
    problems = [problem for expression in expressions
                for problem in promql_names.unknown_names(expression, exported, recorded)]
    assert problems == []
    # The checker itself notices a misspelt metric and a label the metric does not have.
    typo = promql_names.Expression("typo", 'rate(genserve_request_duration_second_bucket[5m])')
    wrong_label = promql_names.Expression("label", 'genserve_requests_waiting{outcome="stop"}')
    assert promql_names.unknown_names(typo, exported, recorded)
    assert promql_names.unknown_names(wrong_label, exported, recorded)
    with pytest.raises(ValueError):
        promql_names.selectors("sum(rate(foo[5m])")


def query(prometheus_url: str, expression: str) -> list[dict]:
    response = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": expression}, timeout=10)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_until(condition, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture()
def prometheus(live_server: LiveServer, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus on localhost, running the repo's prometheus.yml with only the target (and the
    rule files' folder) rewritten to the test server."""
    binary = find_tool("prometheus")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    target = live_server.url.removeprefix("http://")
    config["scrape_configs"][0]["static_configs"] = [{"targets": [target]}]
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([binary, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'data'}",
                                    f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def scraped() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{log_path.read_text()}")
            try:
                return any(sample["value"][1] == "1" for sample in query(url, 'up{job="genserve"}'))
            except httpx.HTTPError:
                return False
        wait_until(scraped, 60, "the first successful scrape")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_real_prometheus_answers_p99_per_paradigm(live_server: LiveServer, prometheus: str) -> None:
    send_traffic(live_server.url)  # after the first scrape, so that rate() sees the counters grow
    p99 = ('histogram_quantile(0.99, sum by (le, paradigm) '
           '(rate(genserve_request_duration_seconds_bucket{job="genserve"}[1m])))')

    def p99_per_paradigm() -> dict[str, float]:
        values = {}
        for sample in query(prometheus, p99):
            value = float(sample["value"][1])
            if math.isfinite(value):
                values[sample["metric"]["paradigm"]] = value
        return values

    wait_until(lambda: set(p99_per_paradigm()) == set(PARADIGMS), 60, "a finite p99 for each paradigm")
    for paradigm, value in p99_per_paradigm().items():
        assert 0 < value < 600, (paradigm, value)
    # The recording rules run on the same data (group interval 15 s).
    recorded = "paradigm_model:genserve_request_duration_seconds:p99_5m"
    wait_until(lambda: {sample["metric"]["paradigm"] for sample in query(prometheus, recorded)
                        if math.isfinite(float(sample["value"][1]))} == set(PARADIGMS), 60, recorded)
    # Process metrics of both processes reach Prometheus too.
    roles = {sample["metric"]["role"] for sample in query(prometheus, 'process_resident_memory_bytes{job="genserve"}')}
    assert roles == {"frontend", "engine_core"}
    # No alert fires on a healthy, lightly loaded server.
    alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    assert [alert for alert in alerts if alert["state"] == "firing"] == []
    # Every rule evaluates cleanly; "unknown" only means its group has not run yet (interval 15 s).
    def rule_healths() -> set[str]:
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        return {rule["health"] for group in groups for rule in group["rules"]}

    wait_until(lambda: "unknown" not in rule_healths(), 60, "every recording and alerting rule evaluated")
    assert rule_healths() == {"ok"}
