"""The real server with diffusion models over HTTP: JSON and SSE answers, class-label and text
paths, bad inputs, overload, cancellation, metrics, and an AR model sharing the device."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.diffusion.images import decode_png_base64
from tests.fixtures.tiny_diffusion import build_tiny_digits, build_tiny_stable_diffusion
from tests.fixtures.tiny_models import build_tiny_llama
from tests.integration.server import (RunningServer, check_full_queue_gets_503, metric_samples, metric_value,
                                      parse_sse, running_server, stream_events, wait_for)

DIGITS = {"model": "digits"}
MAX_STEPS = 250
RESPONSE_KEYS = {"id", "model", "paradigm", "images", "steps", "scheduler", "finish_reason", "timings"}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diffusion-http-models")
    return {"digits": build_tiny_digits(root / "digits"), "sd": build_tiny_stable_diffusion(root / "sd"),
            "llama": build_tiny_llama(root / "llama", seed=3)}


@pytest.fixture(scope="module")
def server(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(model_dirs, tmp_path_factory.mktemp("logs"), "--max-denoise-steps", str(MAX_STEPS),
                        "--default-denoise-steps", "6", "--max-images-per-request", "4",
                        "--preview-max-side", "8") as running:
        yield running


@pytest.fixture()
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http


def images_of(body: dict) -> list[np.ndarray]:
    return [decode_png_base64(image["png_base64"]) for image in body["images"]]


def test_non_streamed_response_shape(client: httpx.Client) -> None:
    request = {**DIGITS, "prompt": "three", "steps": 5, "seed": 3, "n": 2, "guidance_scale": 2.0}
    response = client.post("/generate", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == RESPONSE_KEYS
    assert body["model"] == "digits" and body["paradigm"] == "diffusion" and body["id"]
    assert body["steps"] == 5 and body["scheduler"] == "ddpm" and body["finish_reason"] == "stop"
    assert [image["seed"] for image in body["images"]] == [3, 4]
    assert [image.shape for image in images_of(body)] == [(16, 16, 1)] * 2
    assert 0 <= body["timings"]["queue_s"] <= body["timings"]["total_s"]
    again = client.post("/generate", json=request).json()
    assert [i["png_base64"] for i in again["images"]] == [i["png_base64"] for i in body["images"]]


def test_defaults_come_from_settings_and_the_model(client: httpx.Client) -> None:
    body = client.post("/generate", json={"paradigm": "diffusion", "prompt": "seven"}).json()
    assert body["model"] == "digits" and body["steps"] == 6 and body["scheduler"] == "ddpm"
    other = client.post("/generate", json={"paradigm": "diffusion", "prompt": "seven"}).json()
    seeds = (body["images"][0]["seed"], other["images"][0]["seed"])
    assert seeds[0] != seeds[1] and all(0 <= seed < 2**63 for seed in seeds)  # a fresh random seed each time
    again = client.post("/generate", json={"paradigm": "diffusion", "prompt": "seven", "seed": seeds[0]}).json()
    assert again["images"] == body["images"]  # and it is the seed that was used


def test_stream_sends_progress_after_every_step_then_done(client: httpx.Client) -> None:
    request = {**DIGITS, "prompt": "five", "steps": 7, "scheduler": "euler", "seed": 21, "preview_every": 3}
    events = stream_events(client, request)
    assert [event.event for event in events] == ["progress"] * 7 + ["done"]
    assert [(e.data["step"], e.data["steps"]) for e in events[:-1]] == [(step, 7) for step in range(1, 8)]
    with_preview = [e.data["step"] for e in events[:-1] if "preview_png_base64" in e.data]
    assert with_preview == [3, 6]
    assert decode_png_base64(events[2].data["preview_png_base64"]).shape == (8, 8, 1)
    done = events[-1].data
    assert set(done) == RESPONSE_KEYS and done["scheduler"] == "euler"
    whole = client.post("/generate", json=request).json()
    assert done["images"] == whole["images"]


def test_text_to_image_with_negative_prompt(client: httpx.Client) -> None:
    request = {"model": "sd", "prompt": "a photo of a cat", "negative_prompt": "blurry", "guidance_scale": 5.0,
               "steps": 4, "scheduler": "ddim", "eta": 0.5, "width": 48, "height": 32, "seed": 1}
    body = client.post("/generate", json=request).json()
    assert body["paradigm"] == "diffusion" and body["scheduler"] == "ddim"
    assert images_of(body)[0].shape == (32, 48, 3)
    other = client.post("/generate", json={**request, "prompt": "a red dog"}).json()
    assert other["images"][0]["png_base64"] != body["images"][0]["png_base64"]


@pytest.mark.parametrize("body, status, text", [
    ({**DIGITS, "prompt": "one", "steps": 0}, 422, "steps"),
    ({**DIGITS, "prompt": "one", "steps": MAX_STEPS + 1}, 422, "limit"),
    ({**DIGITS, "prompt": "one", "width": 20}, 422, "16x16 images only"),
    ({**DIGITS, "prompt": "one", "width": 32, "height": 32}, 422, "16x16"),
    ({"model": "sd", "prompt": "a cat", "width": 36}, 422, "multiple of 8"),
    ({**DIGITS, "prompt": "one", "scheduler": "plms"}, 422, "scheduler"),
    ({**DIGITS, "prompt": "eleven"}, 422, "valid labels: ['zero', 'one', 'two'"),
    ({**DIGITS, "prompt": "one", "scheduler": "euler", "eta": 0.5}, 422, "eta"),
    ({**DIGITS, "prompt": "one", "n": 5}, 422, "limit"),
    ({**DIGITS, "prompt": "one", "n": 0}, 422, "n"),
    ({**DIGITS, "prompt": "one", "guidance_scale": -1}, 422, "guidance_scale"),
    ({**DIGITS, "prompt": "one", "max_tokens": 5}, 422, "max_tokens"),
    ({**DIGITS, "prompt": 3}, 422, "prompt"),
    ({"model": "digits", "paradigm": "autoregressive", "prompt": "one"}, 422, "diffusion"),
    ({"model": "nope", "prompt": "one"}, 404, "nope"),
])
def test_bad_input_gets_a_json_4xx(client: httpx.Client, body: dict, status: int, text: str) -> None:
    response = client.post("/generate", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    expected_type = {404: "model_not_found"}.get(status, "unknown_label" if "valid labels" in text else "validation_error")
    assert error["type"] == expected_type and text in error["message"]
    assert client.get("/health").status_code == 200


def test_nan_guidance_is_rejected(client: httpx.Client) -> None:
    response = client.post("/generate", content=b'{"model": "digits", "prompt": "one", "guidance_scale": NaN}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 422 and "guidance_scale" in response.json()["error"]["message"]


def _diffusion_samples(client: httpx.Client) -> dict[str, float]:
    return metric_samples(client.get("/metrics").text)


def test_client_disconnect_cancels_the_request(client: httpx.Client) -> None:
    cancelled_before = metric_value(_diffusion_samples(client), "genserve_requests_total", paradigm="diffusion",
                                    outcome="cancelled")
    long_request = {**DIGITS, "prompt": "two", "steps": MAX_STEPS, "n": 4, "stream": True}
    with client.stream("POST", "/generate", json=long_request) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("event: progress")  # running

    def cancelled() -> bool:
        samples = _diffusion_samples(client)
        return (metric_value(samples, "genserve_requests_total", paradigm="diffusion", outcome="cancelled")
                == cancelled_before + 1
                and metric_value(samples, "genserve_requests_running", paradigm="diffusion") == 0)

    assert wait_for(cancelled, timeout=20.0), client.get("/metrics").text


def test_metrics_after_traffic(client: httpx.Client) -> None:
    labels = {"paradigm": "diffusion", "model": "digits"}
    before = _diffusion_samples(client)
    assert client.post("/generate", json={**DIGITS, "prompt": "nine", "steps": 3, "n": 2}).status_code == 200
    after = _diffusion_samples(client)

    def delta(name: str, **extra: str) -> float:
        return metric_value(after, name, **labels, **extra) - metric_value(before, name, **labels, **extra)

    assert delta("genserve_requests_total", outcome="stop") == 1
    assert delta("genserve_request_duration_seconds_count", outcome="stop") == 1
    assert delta("genserve_queue_wait_seconds_count") == 1
    assert delta("genserve_denoise_step_seconds_count") == 3  # alone in the batch: one forward per step
    assert delta("genserve_denoise_steps_total") == 6  # two images x three steps
    assert delta("genserve_images_total") == 2
    assert delta("genserve_batch_size_count") == 3 and delta("genserve_batch_size_sum") == 6
    for gauge in ("genserve_requests_running", "genserve_requests_waiting"):
        assert metric_value(after, gauge, **labels) == 0, gauge


def test_ar_and_diffusion_share_the_device(client: httpx.Client, server: RunningServer) -> None:
    """An AR request answers while a long diffusion batch runs: the worker interleaves their steps."""
    diffusion_events: list[str] = []

    def long_diffusion() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as own:
            with own.stream("POST", "/generate", json={**DIGITS, "prompt": "four", "steps": MAX_STEPS, "n": 4,
                                                       "stream": True}) as response:
                diffusion_events.extend(event.event for event in parse_sse(response.iter_lines()))

    runner = threading.Thread(target=long_diffusion)
    runner.start()
    assert wait_for(lambda: len(diffusion_events) > 0 or metric_value(
        _diffusion_samples(client), "genserve_requests_running", paradigm="diffusion") > 0)
    text = client.post("/generate", json={"model": "llama", "prompt": "def main():", "max_tokens": 8,
                                          "temperature": 0, "ignore_eos": True})
    assert text.status_code == 200 and text.json()["usage"]["completion_tokens"] == 8
    assert "done" not in diffusion_events  # the AR answer did not wait for the diffusion batch
    runner.join(120)
    assert diffusion_events.count("progress") == MAX_STEPS and diffusion_events[-1] == "done"


@pytest.fixture(scope="module")
def small_server(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server({"digits": model_dirs["digits"]}, tmp_path_factory.mktemp("logs-small"),
                        "--diffusion-max-batch-size", "1", "--max-queue", "1", "--retry-after-s", "2",
                        "--max-denoise-steps", "1000") as running:
        yield running


def test_full_queue_gets_503_with_retry_after(small_server: RunningServer) -> None:
    check_full_queue_gets_503(small_server, {"prompt": "one", "steps": 1000}, {"prompt": "one", "steps": 3})
