"""Text by masked diffusion through the real server: JSON and SSE, step-level batching invariance,
cancellation, the ELBO bound, bad input, and the modality label on the metrics."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tokenizers import Tokenizer

from tests.fixtures.tiny_text_diffusion import AR_TOKENIZER
from tests.integration.server import (RunningServer, metric_samples, metric_value, running_server, stream_events,
                                      wait_for)

MAX_STEPS = 1000
TEXT = {"model": "mdlm", "prompt": "ROMEO:", "max_tokens": 16, "steps": 4, "seed": 1, "temperature": 0.8}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_mdlm_dir: Path, tiny_llama_dir: Path) -> Iterator[RunningServer]:
    models = {"mdlm": tiny_mdlm_dir, "tiny": tiny_llama_dir}
    with running_server(models, tmp_path_factory.mktemp("mdlm-logs"), "--max-denoise-steps", str(MAX_STEPS)) as running:
        yield running


@pytest.fixture()
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http


def test_models_lists_it_as_diffusion_text(client: httpx.Client) -> None:
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert models["mdlm"]["paradigm"] == "diffusion" and models["mdlm"]["modality"] == "text"
    assert models["tiny"]["paradigm"] == "autoregressive" and models["tiny"]["modality"] == "text"
    assert models["mdlm"]["remasking"] == ["random", "low_confidence"]


def test_json_and_sse_give_the_same_text_and_the_text_crystallises(client: httpx.Client) -> None:
    body = client.post("/generate", json=TEXT).json()
    assert body["paradigm"] == "diffusion" and body["modality"] == "text" and body["steps"] == 4
    prompt_tokens = len(Tokenizer.from_file(str(AR_TOKENIZER)).encode("ROMEO:").ids)
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": len(body["token_ids"])}
    assert body["timings"]["total_s"] >= body["timings"]["queue_s"] >= 0
    events = stream_events(client, TEXT)
    progress = [event.data for event in events if event.event == "progress"]
    assert [p["step"] for p in progress] == [1, 2, 3, 4] and {p["steps"] for p in progress} == {4}
    masks = [p["text"].count("\u2591") for p in progress]
    assert masks[0] > masks[1] > masks[2] > 0 and masks[3] == 0  # each step reveals more, the last reveals all
    assert events[-1].event == "done" and events[-1].data["text"] == body["text"]
    assert events[-1].data["token_ids"] == body["token_ids"]


def test_a_request_gives_the_same_text_alone_and_amid_others(client: httpx.Client, server: RunningServer) -> None:
    alone = client.post("/generate", json={**TEXT, "steps": 8}).json()
    results: dict[str, dict] = {}

    def post(name: str, body: dict) -> None:
        results[name] = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()

    others = {"long": {**TEXT, "prompt": "KING LEAR: Blow, winds", "max_tokens": 40, "steps": 20, "seed": 9},
              "short": {**TEXT, "max_tokens": 5, "steps": 5, "seed": 3, "remasking": "random"},
              "target": {**TEXT, "steps": 8}}
    threads = [threading.Thread(target=post, args=item) for item in others.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results["target"]["token_ids"] == alone["token_ids"]
    assert results["long"]["steps"] == 20 and results["short"]["steps"] == 5


def test_the_prompt_elbo_is_a_seeded_bound(client: httpx.Client) -> None:
    request = {"model": "mdlm", "prompt": "To be, or not to be", "max_tokens": 0, "prompt_elbo": True,
               "elbo_samples": 8, "seed": 4}
    first = client.post("/generate", json=request).json()
    again = client.post("/generate", json=request).json()
    bound = first["prompt_elbo"]
    assert bound == again["prompt_elbo"] and bound["samples"] == 8 and bound["characters"] == 19
    assert bound["nats"] > 0 and bound["bits_per_character"] == pytest.approx(bound["nats"] / 0.693147 / 19, rel=1e-4)
    assert "upper bound" in bound["kind"] and first["token_ids"] == [] and first["usage"]["completion_tokens"] == 0


def test_cancelling_frees_the_slot(client: httpx.Client) -> None:
    with client.stream("POST", "/generate", json={**TEXT, "max_tokens": 240, "steps": 240, "stream": True}) as response:
        next(response.iter_lines())

    def freed() -> bool:
        samples = metric_samples(client.get("/metrics").text)
        return metric_value(samples, "genserve_requests_running", paradigm="diffusion", modality="text") == 0 and \
            metric_value(samples, "genserve_requests_total", modality="text", outcome="cancelled") >= 1

    assert wait_for(freed)


@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "steps"),
    ({"steps": MAX_STEPS + 1}, "limit"),
    ({"max_tokens": 0}, "prompt_elbo"),
    ({"remasking": "confident_first"}, "remasking"),
    ({"block_length": 0}, "block_length"),
    ({"max_tokens": 300}, "exceeds"),
    ({"temperature": -1}, "temperature"),
])
def test_bad_input_is_a_json_4xx(client: httpx.Client, change: dict, message: str) -> None:
    response = client.post("/generate", json={**TEXT, **change})
    status = 413 if message == "exceeds" else 422
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == ("prompt_too_long" if status == 413 else "validation_error") and message in error["message"]
    assert client.get("/health").status_code == 200


def test_metrics_carry_the_modality(client: httpx.Client) -> None:
    before = metric_samples(client.get("/metrics").text)
    body = client.post("/generate", json=TEXT).json()
    after = metric_samples(client.get("/metrics").text)

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    labels = {"paradigm": "diffusion", "modality": "text", "model": "mdlm"}
    assert delta("genserve_requests_total", **labels) == 1
    assert delta("genserve_generated_tokens_total", **labels) == body["usage"]["completion_tokens"]
    assert delta("genserve_denoise_step_seconds_count", **labels) == 4
    assert delta("genserve_requests_total", paradigm="diffusion", modality="image") == 0


def test_openai_routes_pick_models_of_their_modality(client: httpx.Client) -> None:
    image_request = client.post("/v1/images/generations", json={"model": "mdlm", "prompt": "a cat"})
    assert image_request.status_code == 422 and "not image" in image_request.json()["error"]["message"]
    completion = client.post("/v1/completions", json={"model": "mdlm", "prompt": "x", "max_tokens": 2})
    assert completion.status_code == 422 and completion.json()["error"]["code"] == "validation_error"
    served = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})  # the AR model, unnamed
    assert served.status_code == 200 and served.json()["model"] == "tiny"
