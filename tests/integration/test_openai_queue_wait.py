"""The OpenAI text routes queue under the server's own bounds, as /generate does: a request that cannot start
within --max-queue-wait-s gets 503 with Retry-After, in OpenAI's error shape."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.fixtures.tiny_models import build_tiny_llama
from tests.integration.server import metric_samples, metric_value, running_server, wait_for

LONG = {"paradigm": "autoregressive", "prompt": "while True:", "max_tokens": 3000, "ignore_eos": True}


def nothing_running(url: str) -> bool:
    samples = metric_samples(httpx.get(f"{url}/metrics", timeout=5).text)
    return (metric_value(samples, "genserve_requests_running") == 0
            and metric_value(samples, "genserve_requests_waiting") == 0)


def test_openai_text_routes_keep_the_servers_queue_wait(tmp_path: Path) -> None:
    model_dir = build_tiny_llama(tmp_path / "tiny", seed=4, max_positions=4096)
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
        assert wait_for(lambda: nothing_running(server.url))
