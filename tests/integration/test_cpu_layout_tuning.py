"""The CPU layout tuner in the real server: under load the engine core compares its two layouts, logs the
decision, and every thread of the core and of the front end ends up on the chosen layout's CPUs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from service import cpu_quota
from tests.fixtures.tiny_models import build_tiny_llama
from tests.integration.server import metric_samples, metric_value, running_server

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(cpu_quota.affinity_cpus()) < 2
                                or cpu_quota.usable_cpu_count() < 2, reason="needs two usable CPUs")


def _events(log: str, name: str) -> list[dict[str, object]]:
    events = []
    for line in log.splitlines():
        start = line.find('{"event": "' + name + '"')
        if start >= 0:
            events.append(json.loads(line[start:]))
    return events


def test_the_engine_core_settles_on_a_layout_and_moves_every_thread(tmp_path: Path) -> None:
    model = build_tiny_llama(tmp_path / "llama", seed=5)
    with running_server({"llama": model}, tmp_path, "--device", "cpu", "--cpu-layout-window-s", "0.02",
                        "--cpu-layout-retune-s", "1000", "--cpu-layout-first-retune-s", "1000") as server:
        with server.client() as http:
            deadline = time.monotonic() + 60
            while not _events(server.log(), "cpu_layout") and time.monotonic() < deadline:
                response = http.post("/generate", json={"model": "llama", "prompt": "tune", "max_tokens": 16,
                                                        "ignore_eos": True})
                assert response.status_code == 200, response.text
        log = server.log()
        decisions = _events(log, "cpu_layout")
        assert decisions, f"no cpu_layout decision within 60 s of load:\n{log[-3000:]}"
        decision = decisions[0]
        assert _events(log, "cpu_plan")[0]["tuned"] is True
        cpus = sorted(cpu_quota.affinity_cpus())
        expected = {"pinned": cpus[:-1], "all-cores": cpus}
        assert decision["cpus"] == expected[str(decision["layout"])]
        assert int(decision["steps_compared"]) > 0  # type: ignore[call-overload]
        assert decision["next_trial_after_s"] == 1000.0  # --cpu-layout-first-retune-s reached the core's tuner
        assert set(decision["step_ms_median"]) == {"pinned", "all-cores"}  # type: ignore[arg-type]
        core_pid = int(_events(log, "engine_core_ready")[0]["pid"])  # type: ignore[call-overload]
        for task in os.listdir(f"/proc/{core_pid}/task"):
            assert sorted(os.sched_getaffinity(int(task))) == decision["cpus"], f"core thread {task} was not moved"
        front_end_cpus = {"pinned": cpus[-1:], "all-cores": cpus}[str(decision["layout"])]
        deadline = time.monotonic() + 5  # the front end reads the switch from the pipe
        while time.monotonic() < deadline and sorted(os.sched_getaffinity(server.process.pid)) != front_end_cpus:
            time.sleep(0.05)
        for task in os.listdir(f"/proc/{server.process.pid}/task"):
            assert sorted(os.sched_getaffinity(int(task))) == front_end_cpus, f"front-end thread {task} was not moved"
        with server.client() as http:
            samples = metric_samples(http.get("/metrics").text)
        other = {"pinned": "all-cores", "all-cores": "pinned"}[str(decision["layout"])]
        assert metric_value(samples, "genserve_cpu_layout", layout=str(decision["layout"])) == 1
        assert metric_value(samples, "genserve_cpu_layout", layout=other) == 0
        assert metric_value(samples, "genserve_cpu_threads") == decision["threads"]
        assert metric_value(samples, "genserve_cpu_layout_switches_total") >= 6  # the trial's seven windows
