"""Metric values, not just their presence, on a fresh server: counts from a known workload and
histogram sums against the request's own timings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fixtures.tiny_models import build_tiny_llama
from tests.integration.server import RunningServer, metric_samples, metric_value, running_server

AR = {"paradigm": "autoregressive"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    model = build_tiny_llama(tmp_path_factory.mktemp("metrics-model") / "tiny", seed=5)
    with running_server({"tiny": model}, tmp_path_factory.mktemp("metrics-logs")) as running:
        yield running


def samples(server: RunningServer) -> dict[str, float]:
    with server.client() as http:
        return metric_samples(http.get("/metrics").text)


def test_warm_up_is_not_counted(server: RunningServer) -> None:
    fresh = samples(server)
    assert metric_value(fresh, "genserve_requests_total") == 0
    assert metric_value(fresh, "genserve_generated_tokens_total") == 0
    assert metric_value(fresh, "genserve_time_to_first_token_seconds_count") == 0


def test_latency_histograms_match_the_requests_own_timings(server: RunningServer) -> None:
    tokens = 40
    before = samples(server)
    with server.client() as http:
        body = http.post("/generate", json={**AR, "prompt": "def f(x):", "max_tokens": tokens,
                                            "ignore_eos": True}).json()
    after = samples(server)

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    timings = body["timings"]
    assert body["usage"]["completion_tokens"] == tokens
    assert delta("genserve_requests_total", outcome="length") == 1
    assert delta("genserve_generated_tokens_total") == tokens
    assert delta("genserve_prompt_tokens_total") == body["usage"]["prompt_tokens"]
    assert delta("genserve_time_to_first_token_seconds_count") == 1
    assert delta("genserve_time_to_first_token_seconds_sum") == pytest.approx(timings["ttft_s"], abs=2e-3)
    # one gap between each two consecutive tokens, and the gaps add up to first token -> last token
    assert delta("genserve_inter_token_latency_seconds_count") == tokens - 1
    gaps = delta("genserve_inter_token_latency_seconds_sum")
    assert gaps == pytest.approx(timings["total_s"] - timings["ttft_s"], abs=2e-3)
    assert delta("genserve_request_duration_seconds_count", outcome="length") == 1
    assert delta("genserve_request_duration_seconds_sum", outcome="length") == pytest.approx(timings["total_s"],
                                                                                           abs=2e-3)
    assert delta("genserve_queue_wait_seconds_count") == 1
    assert delta("genserve_queue_wait_seconds_sum") == pytest.approx(timings["queue_s"], abs=2e-3)
