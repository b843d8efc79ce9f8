"""The real server over HTTP: JSON and SSE responses, errors, overload, cancellation, metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.tiny_models import build_tiny_llama
from tests.integration.server import (RunningServer, check_full_queue_gets_503, metric_samples, metric_value,
                                      running_server, stream_events, wait_for)

AR = {"paradigm": "autoregressive"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("http-model") / "tiny-llama", seed=3,
                            max_positions=8192)


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server({"tiny": model_dir}, tmp_path_factory.mktemp("logs"), "--max-batch-size", "8",
                        "--kv-cache-tokens", "8192", "--max-body-bytes", "20000",
                        "--max-model-len", "4096") as running:
        yield running


@pytest.fixture()
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http


def test_health_ready_models(client: httpx.Client, server: RunningServer) -> None:
    health = client.get("/health").json()
    assert {key: health[key] for key in ("status", "engine_core", "restarts")} == {
        "status": "ok", "engine_core": "ready", "restarts": 0}
    assert health["engine_core_pid"] != server.process.pid
    assert client.get("/ready").status_code == 200
    models = client.get("/models").json()["models"]
    assert [(m["name"], m["paradigm"]) for m in models] == [("tiny", "autoregressive")]
    # what a client needs to build a request, and no filesystem path anywhere
    assert models[0]["max_model_len"] == 4096
    assert models[0]["chat_template"] is True
    assert models[0]["defaults"] == {"max_tokens": 128}
    assert str(server.url) not in str(models) and "/tmp" not in str(models) and "path" not in models[0]


def test_non_streamed_response_shape(client: httpx.Client) -> None:
    response = client.post("/generate", json={**AR, "prompt": "def main():", "max_tokens": 7, "temperature": 0,
                                              "ignore_eos": True})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "tiny" and body["paradigm"] == "autoregressive" and body["id"]
    assert body["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 7 and body["usage"]["prompt_tokens"] > 0
    timings = body["timings"]
    assert 0 <= timings["queue_s"] <= timings["ttft_s"] <= timings["total_s"]


def test_stream_deltas_concatenate_to_the_non_streamed_text(client: httpx.Client) -> None:
    body = {"model": "tiny", "prompt": "class Config:", "max_tokens": 40, "temperature": 0.9, "seed": 7,
            "ignore_eos": True}
    whole = client.post("/generate", json=body).json()
    events = stream_events(client, body)
    kinds = [event.event for event in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"token"}
    deltas = "".join(event.data["text"] for event in events[:-1])
    assert deltas == whole["text"] == events[-1].data["text"]
    assert events[-1].data["usage"] == whole["usage"]
    assert sum(len(event.data["token_ids"]) for event in events[:-1]) <= whole["usage"]["completion_tokens"]


def test_stop_string_is_never_emitted(client: httpx.Client) -> None:
    base = {**AR, "prompt": "import os\n", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    full = client.post("/generate", json=base).json()["text"]
    stop = full[12:15]
    assert len(stop) == 3
    cut = full[:full.find(stop)]
    events = stream_events(client, {**base, "stop": [stop, "never-appears-in-output"]})
    done = events[-1].data
    assert done["finish_reason"] == "stop" and done["text"] == cut
    streamed = "".join(event.data["text"] for event in events[:-1])
    assert streamed == cut


def test_logprobs_and_prompt_scoring(client: httpx.Client) -> None:
    scored = client.post("/generate", json={**AR, "prompt": "for item in items:", "max_tokens": 0,
                                            "prompt_logprobs": True}).json()
    entries = scored["prompt_logprobs"]
    assert entries[0]["logprob"] is None and len(entries) == scored["usage"]["prompt_tokens"]
    assert scored["usage"]["completion_tokens"] == 0
    generated = client.post("/generate", json={**AR, "prompt": "for item in items:", "max_tokens": 3, "logprobs": 2,
                                               "temperature": 0, "ignore_eos": True}).json()
    assert [entry["token_id"] for entry in generated["logprobs"]] == generated["token_ids"]
    for entry in generated["logprobs"]:  # greedy: the chosen token is the top alternative, with its logprob
        assert [top["logprob"] for top in entry["top_logprobs"]] == sorted(
            (top["logprob"] for top in entry["top_logprobs"]), reverse=True)
        assert entry["top_logprobs"][0]["token_id"] == entry["token_id"]
        assert entry["top_logprobs"][0]["logprob"] == entry["logprob"]
    # the first generated token's logprob equals scoring prompt + that token
    rescored = client.post("/generate", json={**AR, "prompt": "for item in items:", "max_tokens": 0,
                                              "prompt_logprobs": True}).json()
    assert [e["token_id"] for e in rescored["prompt_logprobs"]] == [e["token_id"] for e in entries]


def test_chat_messages_are_the_token_ids_transformers_templates(client: httpx.Client, model_dir: Path) -> None:
    import transformers

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    expected = transformers.AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True)
    expected_ids = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    response = client.post("/generate", json={**AR, "messages": messages, "max_tokens": 0, "prompt_logprobs": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [entry["token_id"] for entry in body["prompt_logprobs"]] == expected_ids
    assert body["usage"]["prompt_tokens"] == len(expected_ids)


@pytest.mark.parametrize("body, status", [
    ({"prompt": "x", "max_tokens": -1}, 422),
    ({"prompt": "x", "temperature": -0.5}, 422),
    ({"prompt": "x", "top_p": 0}, 422),
    ({"prompt": "x", "logprobs": 1000}, 422),
    ({"prompt": "x", "max_tokens": 10**9}, 422),
    ({"prompt": "x", "max_tokens": 0}, 422),
    ({"prompt": "x", "stop": [""]}, 422),
    ({"prompt": "x", "unknown_field": 1}, 422),
    ({"prompt": 5}, 422),
    ({}, 422),
    ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 422),
    ({"prompt": "x", "model": "no-such-model"}, 404),
    ({"prompt": "x", "model": "tiny", "paradigm": "diffusion"}, 422),
    ({"prompt": "x", "paradigm": "quantum"}, 422),
    ({"prompt": "x", "model": ["tiny"]}, 422),
    ({"prompt": "x", "seed": -1}, 422),
    ({"prompt": "x " * 5000, "max_tokens": 1}, 413),
    ({"prompt": "x", "max_tokens": 250, "ignore_eos": True, "stop": ["a"] * 17}, 422),
])
def test_bad_input_gets_a_json_4xx(client: httpx.Client, body: dict, status: int) -> None:
    response = client.post("/generate", json={**({"paradigm": "autoregressive"} if "paradigm" not in body
                                                 and "model" not in body and body else {}), **body})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    expected_type = {404: "model_not_found", 413: "prompt_too_long"}.get(status, "validation_error")
    assert error["type"] == expected_type and error["message"]
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("raw, status", [
    (b"{not json", 400),
    (b"[1, 2]", 422),
    (b'{"prompt": "x", "temperature": NaN}', 422),
    (b'{"prompt": "\xff\xfe"}', 400),
    (b'{"prompt": "' + b"a" * 30000 + b'"}', 413),
])
def test_malformed_bodies(client: httpx.Client, raw: bytes, status: int) -> None:
    response = client.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    expected_type = {400: "invalid_json", 413: "body_too_large"}.get(status, "validation_error")
    assert response.json()["error"]["type"] == expected_type
    assert client.post("/generate", json={**AR, "prompt": "still ok", "max_tokens": 2}).status_code == 200


def test_unknown_route_and_method_are_json(client: httpx.Client) -> None:
    wrong_method = client.get("/generate")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["type"] == "http_error"
    missing = client.get("/nope")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "http_error"


def test_client_disconnect_cancels_and_frees_blocks(client: httpx.Client) -> None:
    def samples() -> dict[str, float]:
        return metric_samples(client.get("/metrics").text)

    cancelled_before = metric_value(samples(), "genserve_requests_total", outcome="cancelled")
    long_request = {**AR, "prompt": "while True:", "max_tokens": 4000, "ignore_eos": True}
    with client.stream("POST", "/generate", json={**long_request, "stream": True}) as response:
        next(response.iter_lines())  # the first event arrived: the request is running
    # non-streamed: the client gives up while the server is still generating
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{client.base_url}/generate", json=long_request, timeout=0.3)

    def both_cancelled() -> bool:
        current = samples()
        return (metric_value(current, "genserve_requests_total", outcome="cancelled") >= cancelled_before + 2
                and metric_value(current, "genserve_requests_running") == 0
                and metric_value(current, "genserve_kv_cache_usage_ratio") == 0)

    assert wait_for(both_cancelled), client.get("/metrics").text


def test_metrics_after_traffic(client: httpx.Client) -> None:
    """Counts from before/after deltas on this module's shared server: exact for a known workload."""
    labels = {"paradigm": "autoregressive", "model": "tiny"}
    before = metric_samples(client.get("/metrics").text)
    shared_prefix = "def handler(request, response):\n    return request.body " * 6
    bodies = [client.post("/generate", json={**AR, "prompt": shared_prefix + suffix, "max_tokens": 4,
                                             "ignore_eos": True}).json() for suffix in ("a", "b")]
    events = stream_events(client, {**AR, "prompt": "y = 2", "max_tokens": 5, "ignore_eos": True})
    after = metric_samples(client.get("/metrics").text)

    def delta(name: str, **extra: str) -> float:
        return metric_value(after, name, **labels, **extra) - metric_value(before, name, **labels, **extra)

    assert delta("genserve_requests_total", outcome="length") == 3
    for histogram in ("genserve_request_duration_seconds", "genserve_queue_wait_seconds",
                      "genserve_time_to_first_token_seconds"):
        assert delta(f"{histogram}_count") == 3, histogram
    assert delta("genserve_inter_token_latency_seconds_count") == 3 + 3 + 4  # tokens - 1 per request
    assert delta("genserve_generated_tokens_total") == 4 + 4 + 5
    prompt_tokens = sum(body["usage"]["prompt_tokens"] for body in bodies) + events[-1].data["usage"]["prompt_tokens"]
    assert delta("genserve_prompt_tokens_total") == prompt_tokens
    # the second request found the first one's full prompt blocks in the prefix cache
    assert delta("genserve_prefix_cache_hit_tokens_total") == bodies[1]["cached_prompt_tokens"] > 0
    # every observation lands in some bucket: the +Inf bucket counts them all, the 0.5 ms ITL bucket fewer
    assert delta("genserve_inter_token_latency_seconds_bucket", le="+Inf") == 10
    assert delta("genserve_inter_token_latency_seconds_bucket", le="0.0005") < 10
    assert delta("genserve_request_duration_seconds_bucket", le="600.0") == 3


@pytest.fixture(scope="module")
def small_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server({"tiny": model_dir}, tmp_path_factory.mktemp("logs-small"), "--max-batch-size", "1",
                        "--max-queue", "1", "--retry-after-s", "2") as running:
        yield running


def test_full_queue_gets_503_with_retry_after(small_server: RunningServer) -> None:
    check_full_queue_gets_503(small_server, {"prompt": "x", "max_tokens": 4000, "ignore_eos": True}, {"prompt": "x", "max_tokens": 3, "ignore_eos": True})


def test_tiny_temperatures_are_greedy_and_overflowing_penalties_fail_loudly(client: httpx.Client) -> None:
    request = {**AR, "prompt": "def f(x):", "max_tokens": 6, "ignore_eos": True}
    greedy = client.post("/generate", json={**request, "temperature": 0}).json()
    tiny = client.post("/generate", json={**request, "temperature": 1e-38, "seed": 1}).json()
    assert tiny["token_ids"] == greedy["token_ids"] and tiny["finish_reason"] == "length"
    overflowing = client.post("/generate", json={**request, "repetition_penalty": 1e-300, "temperature": 0.7})
    assert overflowing.status_code == 422, overflowing.text  # never a silent token 0 with finish_reason "stop"
    assert overflowing.json()["error"]["type"] == "validation_error"
    assert "non-finite" in overflowing.json()["error"]["message"]
    assert client.get("/health").status_code == 200
