"""The Grafana dashboard's layout: a row per paradigm, one for the service and one for the engine core's CPU,
model and instance variables, panels that do not overlap, and every genserve metric the server exports on
some panel."""

from __future__ import annotations

import json

from tests.deploy import promql_names
from tests.deploy.conftest import LiveServer


def dashboard() -> dict:
    return json.loads(promql_names.DASHBOARD.read_text())


def test_rows_and_variables() -> None:
    board = dashboard()
    rows = [panel["title"] for panel in board["panels"] if panel["type"] == "row"]
    assert rows == ["Service", "Autoregressive (text)", "Diffusion (images)", "Engine core CPU (CPU device)"]
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert set(variables) == {"model", "instance"}
    assert all(variable["includeAll"] and variable["multi"] for variable in variables.values())
    assert board["uid"] == "genserve"


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = dashboard()["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    occupied: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in occupied, f"{panel['title']} overlaps {occupied[(x, y)]}"
                occupied[(x, y)] = panel["title"]


def test_every_exported_genserve_metric_is_on_the_dashboard(live_server: LiveServer) -> None:
    exported = promql_names.exported_series_labels(live_server.metrics_text())
    families = {name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
                for name in exported if name.startswith(("genserve_", "process_"))}
    shown = {selector.metric.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
             for expression in promql_names.dashboard_expressions()
             for selector in promql_names.selectors(expression.text)}
    # Not plotted on purpose: virtual memory, thread count and start time say little about a server.
    not_plotted = {"process_virtual_memory_bytes", "process_threads", "process_start_time_seconds"}
    assert families - shown == not_plotted
