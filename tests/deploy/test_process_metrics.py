"""process_* metrics for the front end and the engine core, read from /proc and served at /metrics."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from service.runtime.process_metrics import ProcessMetricsCollector, process_metrics_text, read_process
from tests.deploy.conftest import LiveServer

FAMILIES = ("process_cpu_seconds", "process_resident_memory_bytes", "process_virtual_memory_bytes",
            "process_start_time_seconds", "process_threads", "process_open_fds", "process_max_fds")


def samples_by_role(text: str) -> dict[str, dict[str, float]]:
    values: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("process_"):
                values.setdefault(sample.labels["role"], {})[sample.name] = sample.value
    return values


def test_read_process_agrees_with_the_kernel_for_this_process() -> None:
    sample = read_process(os.getpid())
    times = os.times()
    assert abs(sample.cpu_seconds - (times.user + times.system)) < 0.5
    peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert 0 < sample.resident_bytes <= peak_rss_bytes * 1.05
    assert sample.open_fds == len(os.listdir("/proc/self/fd"))  # both count the descriptor listdir holds
    soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert sample.max_fds == (None if soft_limit == resource.RLIM_INFINITY else soft_limit)
    assert abs(sample.start_time_seconds - time.time()) < 24 * 3600
    assert sample.start_time_seconds <= time.time()


def test_a_busy_child_shows_its_cpu_and_a_gone_process_is_left_out() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 0.6\n"
                              "while time.process_time() < end: pass\nimport sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while read_process(child.pid).cpu_seconds < 0.5 and time.monotonic() < deadline:
            time.sleep(0.1)
        values = samples_by_role(process_metrics_text({"busy": child.pid, "self": os.getpid()}).decode())
        assert values["busy"]["process_cpu_seconds_total"] >= 0.5
        assert set(values) == {"busy", "self"}
    finally:
        child.communicate(b"")
    values = samples_by_role(process_metrics_text({"busy": child.pid, "absent": None, "self": os.getpid()}).decode())
    assert set(values) == {"self"}
    assert list(ProcessMetricsCollector({"gone": child.pid}).collect())[0].samples == []


def test_metrics_route_exports_both_processes(live_server: LiveServer) -> None:
    before = samples_by_role(live_server.metrics_text())
    assert set(before) == {"frontend", "engine_core"}
    for role in before:
        assert set(before[role]) == {name + ("_total" if name == "process_cpu_seconds" else "") for name in FAMILIES}
        assert before[role]["process_resident_memory_bytes"] > 20e6
        assert before[role]["process_open_fds"] > 0
        assert before[role]["process_threads"] >= 1
    assert before["frontend"]["process_start_time_seconds"] <= before["engine_core"]["process_start_time_seconds"]
    # The engine core holds the models and does the work: its CPU grows with a request.
    body = {"model": "tiny-digits", "prompt": "4", "steps": 60, "n": 4, "seed": 3}
    assert httpx.post(f"{live_server.url}/generate", json=body, timeout=120).status_code == 200
    after = samples_by_role(live_server.metrics_text())
    assert after["engine_core"]["process_cpu_seconds_total"] > before["engine_core"]["process_cpu_seconds_total"]
