"""Shared by the deploy tests: one real server on the bundled models, some traffic, and the tools.

Each external tool (hadolint, promtool, prometheus, chromium, ...) is looked up beside this
interpreter first (pip installs console scripts there) and then on PATH. Missing, the test is
skipped on a developer's machine and fails under CI (``CI`` set), where ``.ci/run`` installs them.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.integration.server import REPO_ROOT, RunningServer, running_server

BUNDLED_MODELS = {"tiny-shakespeare": REPO_ROOT / "models" / "tiny-shakespeare",
                  "tiny-digits": REPO_ROOT / "models" / "tiny-digits"}


def find_tool(name: str) -> str:
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed (.ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def send_traffic(url: str, text_requests: int = 6, image_requests: int = 4) -> None:
    """Finished requests for both paradigms (streamed and not) and one 404, so that every
    histogram, counter and the rejection counter have series."""
    with httpx.Client(base_url=url, timeout=120) as http:
        for index in range(text_requests):
            body = {"model": "tiny-shakespeare", "prompt": f"ROMEO {index}:", "max_tokens": 12, "seed": index,
                    "stream": index % 2 == 0}
            assert http.post("/generate", json=body).status_code == 200
        for index in range(image_requests):
            body = {"model": "tiny-digits", "prompt": str(index % 10), "steps": 5, "seed": index}
            assert http.post("/generate", json=body).status_code == 200
        assert http.post("/generate", json={"model": "no-such-model", "prompt": "x"}).status_code == 404


@dataclass
class LiveServer:
    server: RunningServer

    @property
    def url(self) -> str:
        return self.server.url

    def metrics_text(self) -> str:
        response = httpx.get(f"{self.url}/metrics", timeout=30)
        assert response.status_code == 200
        return response.text


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """``python -m service`` on the bundled models, with traffic already sent."""
    log_dir = tmp_path_factory.mktemp("deploy-server")
    with running_server(BUNDLED_MODELS, log_dir, "--max-batch-size", "8") as server:
        send_traffic(server.url)
        yield LiveServer(server)
