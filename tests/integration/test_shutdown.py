"""SIGTERM/SIGINT on the real server process: drain, 503s during the drain, a bounded exit with status 0.

Each test signals its own server, so each starts one. Bounds: a drain that ends by itself exits in
a few seconds; one that has to end requests exits within ``--drain-timeout-s`` + ``EXIT_SLACK_S``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.tiny_diffusion import build_tiny_digits
from tests.fixtures.tiny_models import build_tiny_llama
from tests.integration.server import RunningServer, parse_sse, read_until_closed, running_server, wait_for

EXIT_SLACK_S = 8.0  # after the drain: listener and connections closed (grace 2 s), core stopped, interpreter exit
AR_STREAM = {"model": "llama", "prompt": "def main():", "max_tokens": 400, "ignore_eos": True, "temperature": 0,
             "stream": True}
DIFFUSION_STREAM = {"model": "digits", "prompt": "three", "steps": 120, "stream": True}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shutdown-models")
    return {"llama": build_tiny_llama(root / "llama", seed=3, max_positions=8192),
            "digits": build_tiny_digits(root / "digits")}


def _wait_exit(server: RunningServer, timeout: float) -> tuple[int | None, float]:
    started = time.monotonic()
    try:
        code = server.process.wait(timeout=timeout)
    except Exception:
        return None, time.monotonic() - started
    return code, time.monotonic() - started


def _core_pid(server: RunningServer) -> int:
    match = re.search(r'"engine_core_ready".*?"pid": (\d+)', server.log())
    assert match, server.log()
    return int(match.group(1))


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie (exited, not yet reaped by its parent) counts as gone
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] == "Z"


class _Stream(threading.Thread):
    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.events: list[str] = []
        self.final: dict | None = None
        self.first_event = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.url}/generate", json=self.body, timeout=120) as response:
                assert response.status_code == 200, response.read()
                for event in parse_sse(response.iter_lines()):
                    self.events.append(event.event)
                    self.first_event.set()
                    if event.event in ("done", "error"):
                        self.final = {"event": event.event, **event.data}
        except Exception as error:  # recorded, asserted by the test
            self.error = repr(error)
        finally:
            self.first_event.set()


def _drain_ten_streams(server: RunningServer, send_signal: callable, drain_timeout_s: float) -> None:
    streams = [_Stream(server.url, AR_STREAM) for _ in range(6)] + [_Stream(server.url, DIFFUSION_STREAM)
                                                                     for _ in range(4)]
    for stream in streams:
        stream.start()
    for stream in streams:
        assert stream.first_event.wait(60) and stream.error is None, stream.error
    core_pid = _core_pid(server)
    signalled = time.monotonic()
    send_signal()
    with httpx.Client(base_url=server.url, timeout=10) as http:
        ready = http.get("/ready")
        assert ready.status_code == 503 and ready.json() == {"status": "draining"}
        assert http.get("/health").status_code == 200
        refused = http.post("/generate", json={"model": "llama", "prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "shutting_down"
        assert refused.headers["retry-after"] == "1"
    assert any(stream.is_alive() for stream in streams), "the streams ended before the drain could be observed"
    for stream in streams:
        stream.join(drain_timeout_s + 30)
    finals = [stream.final for stream in streams]
    assert all(final is not None and final["event"] == "done" for final in finals), finals
    assert [final["usage"]["completion_tokens"] for final in finals[:6]] == [400] * 6
    assert [final["steps"] for final in finals[6:]] == [120] * 4
    code, _ = _wait_exit(server, drain_timeout_s + EXIT_SLACK_S)
    elapsed = time.monotonic() - signalled
    assert code == 0, server.log()[-3000:]
    assert wait_for(lambda: _process_gone(core_pid), 5)
    print(f"drain with 10 streams: exit {elapsed:.2f} s after the signal")


def _metrics_dirs(tmpdir: Path) -> list[Path]:
    return list(tmpdir.glob("genserve-metrics-*"))


def test_sigterm_to_the_main_process_drains_ten_streams(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    with running_server(model_dirs, tmp_path, "--drain-timeout-s", "60", env={"TMPDIR": str(tmpdir)}) as server:
        assert len(_metrics_dirs(tmpdir)) == 1
        _drain_ten_streams(server, lambda: server.process.send_signal(signal.SIGTERM), 60)
    assert _metrics_dirs(tmpdir) == []  # the multiprocess metrics directory goes on a SIGTERM exit too
    log = server.log()
    assert '"signal": "SIGTERM"' in log and '"ended": 0' in log


def test_sigint_to_the_process_group_drains_ten_streams(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """What Ctrl-C does: every process of the group gets the signal; the engine core ignores it
    and keeps stepping until the front end has drained and stops it."""
    with running_server(model_dirs, tmp_path, "--drain-timeout-s", "60", new_session=True) as server:
        _drain_ten_streams(server, lambda: os.killpg(server.process.pid, signal.SIGINT), 60)


def test_sigterm_to_the_process_group_drains_ten_streams(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    with running_server(model_dirs, tmp_path, "--drain-timeout-s", "60", new_session=True) as server:
        _drain_ten_streams(server, lambda: os.killpg(server.process.pid, signal.SIGTERM), 60)



def test_half_sent_bodies_and_idle_clients_cannot_hold_the_shutdown(model_dirs: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    drain_timeout_s = 3.0
    with running_server(model_dirs, tmp_path, "--drain-timeout-s", str(drain_timeout_s),
                        "--body-read-timeout-s", "300") as server:
        host, port = "127.0.0.1", int(server.url.rsplit(":", 1)[1])
        half_bodies = []
        for _ in range(20):
            sock = socket.create_connection((host, port))
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"model\": ")
            half_bodies.append(sock)
        half_head = socket.create_connection((host, port))
        half_head.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Le")
        idle = socket.create_connection((host, port))
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in idle.recv(65536)  # now an idle keep-alive connection
        time.sleep(0.5)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        answers = [read_until_closed(sock, drain_timeout_s + EXIT_SLACK_S) for sock in half_bodies]
        code, _ = _wait_exit(server, drain_timeout_s + EXIT_SLACK_S)
        elapsed = time.monotonic() - signalled
        assert code == 0, server.log()[-3000:]
        assert elapsed < drain_timeout_s + EXIT_SLACK_S
        # each half-sent request was ended by the drain with the JSON 503, then its connection closed
        for answer in answers:
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503"), answer[:300]
            assert json.loads(body)["error"]["type"] == "shutting_down"
        assert '"ended": 20' in server.log()
        for sock in [*half_bodies, half_head, idle]:
            sock.close()
        print(f"20 half-sent bodies: exit {elapsed:.2f} s after SIGTERM (drain timeout {drain_timeout_s} s)")


def test_idle_server_exits_at_once(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    with running_server(model_dirs, tmp_path, "--drain-timeout-s", "60") as server:
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code, _ = _wait_exit(server, EXIT_SLACK_S)
        elapsed = time.monotonic() - signalled
        assert code == 0, server.log()[-3000:]
        print(f"idle server: exit {elapsed:.2f} s after SIGTERM")
