"""The engine core under supervision, on a real server: a killed or frozen core is detected, its
requests fail at once, it comes back, and past the restart limit the server exits non-zero. Also
the per-request deadline, the queue-wait bound, SSE keep-alive pings and fault isolation."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.tiny_models import build_tiny_llama
from tests.integration.server import (RunningServer, metric_samples, metric_value, parse_sse, running_server,
                                      stream_events, wait_for)

AR = {"paradigm": "autoregressive"}
LONG = {**AR, "prompt": "while True:", "max_tokens": 3000, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("supervised-model") / "tiny", seed=4, max_positions=4096)


def core_pid(server: RunningServer) -> int:
    return int(httpx.get(f"{server.url}/health", timeout=5).json()["engine_core_pid"])


def gauges_are_zero(server: RunningServer) -> bool:
    samples = metric_samples(httpx.get(f"{server.url}/metrics", timeout=5).text)
    return (metric_value(samples, "genserve_requests_running") == 0
            and metric_value(samples, "genserve_requests_waiting") == 0
            and metric_value(samples, "genserve_kv_cache_usage_ratio") == 0)


def start_long_streams(server: RunningServer, count: int) -> list[tuple[httpx.Client, httpx.Response]]:
    streams = []
    for _ in range(count):
        http = server.client(timeout=30)
        response = http.send(http.build_request("POST", "/generate", json={**LONG, "stream": True}), stream=True)
        assert response.status_code == 200
        streams.append((http, response))
    return streams


def last_event(response: httpx.Response) -> str:
    events = list(parse_sse(response.iter_lines()))
    return events[-1].event


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_frozen_core_is_detected_restarted_and_serves_again(model_dir: Path, tmp_path: Path,
                                                                       how: str) -> None:
    with running_server({"tiny": model_dir}, tmp_path, "--stall-timeout-s", "2", "--core-restart-backoff-s",
                        "0.2") as server:
        first_pid = core_pid(server)
        streams = start_long_streams(server, 4)
        os.kill(first_pid, getattr(signal, how))
        signalled = time.monotonic()
        try:
            # every in-flight stream ends with an error event, well before its 3000 tokens
            assert [last_event(response) for _, response in streams] == ["error"] * 4
            assert time.monotonic() - signalled < 10
            assert wait_for(lambda: httpx.get(f"{server.url}/health").status_code == 503, timeout=5)
            assert wait_for(lambda: httpx.get(f"{server.url}/ready").status_code == 200, timeout=90)
        finally:
            if how == "SIGSTOP":
                try:
                    os.kill(first_pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            for http, response in streams:
                response.close()
                http.close()
        assert core_pid(server) != first_pid
        health = httpx.get(f"{server.url}/health").json()
        assert health["status"] == "ok" and health["restarts"] == 1
        answer = httpx.post(f"{server.url}/generate", json={**AR, "prompt": "x = 1", "max_tokens": 3, "ignore_eos": True}, timeout=30)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
        assert wait_for(lambda: gauges_are_zero(server))


def test_past_the_restart_limit_the_server_exits_non_zero(model_dir: Path, tmp_path: Path) -> None:
    with running_server({"tiny": model_dir}, tmp_path, "--max-core-restarts", "0") as server:
        os.kill(core_pid(server), signal.SIGKILL)
        assert server.process.wait(timeout=20) == 70


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    with running_server({"tiny": model_dir}, tmp_path_factory.mktemp("deadline-logs"), "--max-batch-size", "1",
                        "--max-queue-wait-s", "1", "--sse-ping-s", "0.3", "--retry-after-s", "3",
                        "--inject-step-failures", "tiny@40") as running:
        # the 40th step fails: run it out of the way with a request of known length, checked below
        yield running  # type: ignore[misc]


def test_an_injected_step_failure_ends_the_running_request_with_an_sse_error(server: RunningServer) -> None:
    with server.client() as http:
        before = metric_samples(http.get("/metrics").text)
        events = stream_events(http, {**LONG, "max_tokens": 100})
        assert [event.event for event in events][-1] == "error"
        assert events[-1].data == {"error": {"type": "engine_error",
                                             "message": "the engine step failed while this request was running"}}
        assert "done" not in [event.event for event in events]
        after = metric_samples(http.get("/metrics").text)
        assert metric_value(after, "genserve_requests_total", outcome="error") == \
            metric_value(before, "genserve_requests_total", outcome="error") + 1
        assert gauges_are_zero(server)  # its KV blocks were freed
        # the loop goes on
        again = http.post("/generate", json={**AR, "prompt": "x = 1", "max_tokens": 4, "ignore_eos": True})
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 4


def test_a_request_past_its_deadline_ends_with_timeout_and_its_partial_text(server: RunningServer) -> None:
    with server.client() as http:
        answer = http.post("/generate", json={**LONG, "timeout_s": 0.5})
        body = answer.json()
        assert answer.status_code == 200 and body["finish_reason"] == "timeout"
        assert 0 < body["usage"]["completion_tokens"] < 3000 and len(body["token_ids"]) == body["usage"]["completion_tokens"]
        assert 0.5 <= body["timings"]["total_s"] < 3
        assert wait_for(lambda: gauges_are_zero(server))


def test_a_request_that_cannot_start_in_time_gets_503_and_idle_streams_get_pings(server: RunningServer) -> None:
    with server.client() as http:
        with http.stream("POST", "/generate", json={**LONG, "timeout_s": 3, "stream": True}) as running:
            lines = running.iter_lines()
            next(lines)  # it holds the only batch slot
            with http.stream("POST", "/generate", json={**AR, "prompt": "y", "max_tokens": 2, "stream": True}) as queued:
                assert queued.status_code == 200
                raw = [line for line in queued.iter_lines()]
            refused = http.post("/generate", json={**AR, "prompt": "y", "max_tokens": 2})
        assert ": ping" in raw  # the queued stream was idle for a second: pings kept it alive
        events = list(parse_sse(iter(raw)))
        assert [event.event for event in events] == ["error"]
        assert events[0].data["error"]["type"] == "queue_timeout"
        assert refused.status_code == 503 and refused.headers["retry-after"] == "3"
        assert refused.json()["error"]["type"] == "queue_timeout"


def test_openai_text_routes_keep_the_servers_queue_wait(model_dir: Path, tmp_path: Path) -> None:
    with running_server({"tiny": model_dir}, tmp_path, "--max-batch-size", "1", "--max-queue-wait-s", "1",
                        "--retry-after-s", "3") as server, server.client() as http:
        with http.stream("POST", "/generate", json={**LONG, "timeout_s": 5, "stream": True}) as running:
            lines = running.iter_lines()  # kept: a dropped line iterator closes the stream, freeing the slot
            next(lines)  # it holds the only batch slot
            started = time.monotonic()
            refused = http.post("/v1/completions", json={"model": "tiny", "prompt": "y", "max_tokens": 2})
            waited = time.monotonic() - started
        assert refused.status_code == 503 and refused.headers["retry-after"] == "3"
        assert refused.json()["error"]["code"] == "queue_timeout"  # OpenAI's error shape
        assert 1 <= waited < 4  # refused after --max-queue-wait-s, not answered once the slot frees
        assert wait_for(lambda: gauges_are_zero(server))
