"""Start the real service (``python -m service``) on 127.0.0.1 and a free port, and talk to it over HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)


@contextmanager
def running_server(models: dict[str, Path], log_dir: Path, *extra_args: str,
                   ready_timeout: float = 120.0, new_session: bool = False,
                   env: dict[str, str] | None = None) -> Iterator[RunningServer]:
    """``new_session``: the server leads its own process group (to signal the group);
    ``env``: extra environment variables."""
    port = free_port()
    args = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
    for name, path in models.items():
        args += ["--model", f"{name}={path}"]
    args += list(extra_args)
    log_path = log_dir / f"server-{port}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(args, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=full_env,
                                   start_new_session=new_session)
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
            try:
                if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {ready_timeout} s:\n{server.log()}")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class SseEvent:
    event: str
    data: dict


def parse_sse(lines: Iterator[str]) -> Iterator[SseEvent]:
    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield SseEvent(event, json.loads("\n".join(data)))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


def stream_events(client: httpx.Client, body: dict) -> list[SseEvent]:
    with client.stream("POST", "/generate", json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(parse_sse(response.iter_lines()))


def metric_samples(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def metric_value(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in samples.items():
        metric, _, label_text = key.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += value
    return total


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def check_full_queue_gets_503(server: RunningServer, long_request: dict, short_request: dict) -> None:
    """With one batch slot and a queue of one: a long streamed request runs, a second waits,
    a third gets 503 with Retry-After (the server runs --max-queue 1 --retry-after-s 2), and the
    waiting one is still answered afterwards."""
    with server.client() as http:
        with http.stream("POST", "/generate", json={**long_request, "stream": True}) as running:
            assert running.status_code == 200
            lines = running.iter_lines()  # keep a reference: a collected iterator closes the stream
            next(lines)  # occupies the only batch slot
            waiting_result: list[int] = []
            waiter = threading.Thread(target=lambda: waiting_result.append(
                httpx.post(f"{server.url}/generate", json=short_request, timeout=60).status_code))
            waiter.start()
            assert wait_for(lambda: metric_value(metric_samples(http.get("/metrics").text),
                                                 "genserve_requests_waiting") == 1)
            rejected = http.post("/generate", json=long_request)
            assert rejected.status_code == 503
            assert rejected.headers["retry-after"] == "2"
            assert rejected.json()["error"]["type"] == "overloaded"
        waiter.join(60)
        assert waiting_result == [200]
        assert http.get("/health").status_code == 200


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends on a raw socket until it closes the connection or ``timeout`` passes."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except OSError:
        pass
    return data
