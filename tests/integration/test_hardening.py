"""Hostile input against the real server: a corpus of bad bodies for both paradigms (every one a 4xx
JSON error, the server healthy after each), a 64 MB header (431), slow bodies (408), abandoned
uploads (499, one log line each), schemathesis over /openapi.json (no 5xx), and 500s without
exception names."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.body import MAX_NUMBER_CHARS, nesting_depth
from service.api.errors import MESSAGE_LIMIT, error_response
from service.app import create_app
from service.settings import Settings
from tests.fixtures.tiny_diffusion import build_tiny_digits
from tests.fixtures.tiny_models import build_tiny_llama
from tests.integration.server import (RunningServer, metric_samples, metric_value, read_until_closed, running_server,
                                      wait_for)

AR = {"model": "llama", "prompt": "hello", "max_tokens": 2}
IMAGE = {"model": "digits", "prompt": "three", "steps": 2}
BODY_LIMIT = 400_000
HEADER_LIMIT = 16384


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("hardening-models")
    models = {"llama": build_tiny_llama(root / "llama", seed=3), "digits": build_tiny_digits(root / "digits")}
    with running_server(models, tmp_path_factory.mktemp("logs"), "--max-body-bytes", str(BODY_LIMIT),
                        "--max-header-bytes", str(HEADER_LIMIT), "--body-read-timeout-s", "1.5",
                        "--max-tokens-limit", "16", "--max-model-len", "256", "--max-denoise-steps", "4",
                        "--max-images-per-request", "2", "--max-stop-strings", "4", "--max-logprobs", "2") as running:
        yield running


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


def _with(base: dict, **fields: object) -> bytes:
    return _json({**base, **fields})


def _raw(base: dict, field: str, literal: str) -> bytes:
    """``base`` with ``field`` set to a raw JSON literal (for what json.dumps would not write)."""
    return _json(base)[:-1] + f', "{field}": {literal}}}'.encode()


DEEP = 200_000
HUGE_NAME = "x" * 300_000

# (case id, body bytes, expected status or None for any 4xx, expected error type or None)
CORPUS: list[tuple[str, bytes, int | None, str | None]] = [
    # the five 500s of issue 9
    ("ar-prompt-lone-surrogate", _raw(AR, "prompt", '"a\\ud800b"'), 422, "invalid_unicode"),
    ("ar-messages-content-surrogate", _raw({"model": "llama", "max_tokens": 2}, "messages",
                                           '[{"role": "user", "content": "\\ud800"}]'), 422, "invalid_unicode"),
    ("json-200000-deep", b"[" * DEEP + b"]" * DEEP, 422, "json_too_deep"),
    ("ar-seed-4400-digits", _raw(AR, "seed", "9" * 4400), 422, "number_too_large"),
    ("ar-deeply-nested-objects", _raw(AR, "stop", '{"a": ' * 5000 + "1" + "}" * 5000), 422, "json_too_deep"),
    # Unicode
    ("ar-low-surrogate-in-stop", _raw(AR, "stop", '["\\udfff"]'), 422, "invalid_unicode"),
    ("surrogate-in-a-key", _raw(AR, "\\ud800", "1"), 422, "invalid_unicode"),
    ("ar-surrogate-in-deep-list", _raw(AR, "stop", '[[[["\\ud83d"]]]]'), 422, "invalid_unicode"),
    ("not-utf8", b'{"model": "llama", "prompt": "\xff\xfe"}', 400, "invalid_json"),
    # JSON shape and syntax
    ("not-json", b"{", 400, "invalid_json"),
    ("empty-body", b"", 400, "invalid_json"),
    ("trailing-garbage", _json(AR) + b"}", 400, "invalid_json"),
    ("body-is-a-list", b"[]", 422, None),
    ("body-is-a-string", b'"generate"', 422, None),
    ("body-is-null", b"null", 422, None),
    ("json-65-deep", b"[" * 65 + b"]" * 65, 422, "json_too_deep"),
    ("deep-inside-prompt", _raw(AR, "prompt", "[" * 150_000 + "]" * 150_000), 422, "json_too_deep"),
    ("nan", _raw(AR, "temperature", "NaN"), 422, None),
    ("infinity", _raw(AR, "temperature", "Infinity"), 422, None),
    ("minus-infinity", _raw(AR, "top_p", "-Infinity"), 422, None),
    ("float-overflow", _raw(AR, "temperature", "1e999"), 422, None),
    ("float-5000-digits", _raw(AR, "temperature", "0." + "1" * 5000), 422, "number_too_large"),
    ("ar-max-tokens-4400-digits", _raw(AR, "max_tokens", "1" * 4400), 422, "number_too_large"),
    # sizes
    ("body-over-limit", _with(AR, prompt="a" * (BODY_LIMIT + 10)), 413, "body_too_large"),
    ("prompt-far-above-context", _with(AR, prompt="a " * 120_000), 413, None),
    # AR fields
    ("ar-prompt-number", _with(AR, prompt=5), 422, None),
    ("ar-prompt-object", _with(AR, prompt={"text": "x"}), 422, None),
    ("ar-max-tokens-negative", _with(AR, max_tokens=-1), 422, None),
    ("ar-max-tokens-above-limit", _with(AR, max_tokens=10**6), 422, None),
    ("ar-temperature-string", _with(AR, temperature="hot"), 422, None),
    ("ar-top-p-zero", _with(AR, top_p=0), 422, None),
    ("ar-seed-2-64", _with(AR, seed=2**64), 422, None),
    ("ar-logprobs-above-limit", _with(AR, logprobs=1000), 422, None),
    ("ar-too-many-stops", _with(AR, stop=[f"s{i}" for i in range(100)]), 422, None),
    ("ar-empty-stop", _with(AR, stop=[""]), 422, None),
    ("ar-unknown-field", _with(AR, prompt_template="x"), 422, None),
    ("ar-prompt-and-messages", _with(AR, messages=[{"role": "user", "content": "x"}]), 422, None),
    ("ar-no-prompt", _json({"model": "llama"}), 422, None),
    ("ar-empty-messages", _json({"model": "llama", "messages": []}), 422, None),
    ("ar-bad-role", _json({"model": "llama", "messages": [{"role": "root", "content": "x"}]}), 422, None),
    ("ar-content-list", _json({"model": "llama", "messages": [{"role": "user", "content": ["x"]}]}), 422, None),
    ("ar-zero-tokens-without-logprobs", _with(AR, max_tokens=0), 422, None),
    ("huge-unknown-field-name", _raw(AR, HUGE_NAME, "1"), 422, None),
    ("huge-model-name", _with(AR, model=HUGE_NAME), 404, "model_not_found"),
    ("model-object", _with(AR, model={"name": "llama"}), 422, None),
    ("paradigm-video", _json({"paradigm": "video", "prompt": "x"}), 422, None),
    ("unknown-model", _with(AR, model="gpt-9"), 404, "model_not_found"),
    # diffusion fields
    ("image-prompt-surrogate", _raw({"model": "digits", "steps": 2}, "prompt", '"\\ud800"'), 422, "invalid_unicode"),
    ("image-negative-prompt-surrogate", _raw(IMAGE, "negative_prompt", '"x\\udc00"'), 422, "invalid_unicode"),
    ("image-huge-unknown-label", _with(IMAGE, prompt=HUGE_NAME), 422, "unknown_label"),
    ("image-steps-zero", _with(IMAGE, steps=0), 422, None),
    ("image-steps-above-limit", _with(IMAGE, steps=10**9), 422, None),
    ("image-steps-4400-digits", _raw({"model": "digits", "prompt": "three"}, "steps", "7" * 4400), 422,
     "number_too_large"),
    ("image-n-zero", _with(IMAGE, n=0), 422, None),
    ("image-n-above-limit", _with(IMAGE, n=100), 422, None),
    ("image-width-not-multiple-of-8", _with(IMAGE, width=12), 422, None),
    ("image-width-huge", _with(IMAGE, width=8 * 10**6, height=8 * 10**6), 422, None),
    ("image-guidance-nan", _raw(IMAGE, "guidance_scale", "NaN"), 422, None),
    ("image-guidance-overflow", _raw(IMAGE, "guidance_scale", "1e400"), 422, None),
    ("image-unknown-scheduler", _with(IMAGE, scheduler="plms"), 422, None),
    ("image-eta-above-one", _with(IMAGE, eta=2), 422, None),
    ("image-seed-negative", _with(IMAGE, seed=-1), 422, None),
    ("image-preview-every-zero", _with(IMAGE, preview_every=0), 422, None),
    ("image-prompt-list", _with(IMAGE, prompt=["three"]), 422, None),
    ("image-deep-prompt", _raw(IMAGE, "prompt", '{"a": ' * 70 + "1" + "}" * 70), 422, "json_too_deep"),
    ("image-ar-only-field", _with(IMAGE, max_tokens=3), 422, None),
]


def test_the_corpus_is_large_and_covers_both_paradigms() -> None:
    assert len(CORPUS) >= 60
    assert len({case[0] for case in CORPUS}) == len(CORPUS)
    assert sum(case[0].startswith("image-") for case in CORPUS) >= 15


@pytest.mark.parametrize(("body", "status", "error_type"), [case[1:] for case in CORPUS],
                         ids=[case[0] for case in CORPUS])
def test_bad_input_is_a_4xx_json_error_and_the_server_stays_healthy(
        server: RunningServer, body: bytes, status: int | None, error_type: str | None) -> None:
    with server.client() as http:
        response = http.post("/generate", content=body, headers={"Content-Type": "application/json"})
        assert 400 <= response.status_code < 500, response.text[:500]
        if status is not None:
            assert response.status_code == status, response.text[:500]
        error = response.json()["error"]
        assert isinstance(error["type"], str) and isinstance(error["message"], str)
        if error_type is not None:
            assert error["type"] == error_type, error
        assert len(error["message"]) <= MESSAGE_LIMIT + 100  # echoes are clipped
        assert http.get("/health").status_code == 200
        assert http.post("/generate", json=AR).status_code == 200


def test_invalid_unicode_errors_name_the_field(server: RunningServer) -> None:
    with server.client() as http:
        body = _raw({"model": "llama", "max_tokens": 2}, "messages",
                    '[{"role": "user", "content": "ok"}, {"role": "user", "content": "\\ud800"}]')
        message = http.post("/generate", content=body).json()["error"]["message"]
        assert message.startswith("messages[1].content:"), message


def test_a_huge_unknown_label_is_clipped_but_the_valid_labels_are_listed(server: RunningServer) -> None:
    with server.client() as http:
        message = http.post("/generate", json={**IMAGE, "prompt": "q" * 300_000}).json()["error"]["message"]
    assert len(message) < 1000 and "more characters" in message and "'three'" in message, message


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))


def test_a_64_mb_header_gets_431_without_growing_the_front_end(server: RunningServer) -> None:
    rss_before = _rss_kib(server.process.pid)
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))

    def send_header() -> None:
        try:
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nX-Padding: ")
            chunk = b"a" * 65536
            for _ in range(1024):  # 64 MiB
                sock.sendall(chunk)
            sock.sendall(b"\r\n\r\n")
        except OSError:
            pass  # the server closed the connection after its answer

    sender = threading.Thread(target=send_header, daemon=True)
    sender.start()
    sock.settimeout(15)
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except OSError:
        pass
    sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431"), answer[:300]
    assert json.loads(body)["error"]["type"] == "headers_too_large"
    assert _rss_kib(server.process.pid) - rss_before < 20_000
    with server.client() as http:
        assert http.get("/health").status_code == 200
        # a head just under the limit is served; one just over it is refused
        assert http.get("/health", headers={"X-Padding": "a" * (HEADER_LIMIT - 200)}).status_code == 200
        assert http.get("/health", headers={"X-Padding": "a" * (HEADER_LIMIT + 10)}).status_code == 431
        assert metric_value(metric_samples(http.get("/metrics").text), "genserve_http_rejections_total",
                            status="431") >= 2


def _half_sent(server: RunningServer, declared: int, sent: bytes) -> socket.socket:
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(declared).encode() + b"\r\n\r\n" + sent)
    return sock



def test_a_slow_body_gets_408_within_the_read_timeout(server: RunningServer) -> None:
    started = time.monotonic()
    sock = _half_sent(server, 100, b'{"model": ')
    answer = read_until_closed(sock, 10)
    elapsed = time.monotonic() - started
    sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:300]
    assert json.loads(body)["error"]["type"] == "body_timeout"
    assert 1.4 < elapsed < 4, elapsed


def test_a_dripping_body_cannot_extend_the_read_timeout(server: RunningServer) -> None:
    """The timeout bounds the whole body, not the gap between two bytes (slowloris)."""
    started = time.monotonic()
    sock = _half_sent(server, 1000, b"{")
    answer = b""
    sock.settimeout(0.2)
    while time.monotonic() - started < 8 and not answer:
        try:
            sock.sendall(b" ")
            answer = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert time.monotonic() - started < 4


def test_a_dripping_head_gets_408(server: RunningServer) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    started = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")
    answer = b""
    sock.settimeout(0.2)
    while time.monotonic() - started < 8 and not answer:
        try:
            sock.sendall(b"X")  # one header name, forever
            answer = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
    sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:300]
    assert json.loads(body)["error"]["type"] == "head_timeout"
    assert 1.4 < time.monotonic() - started < 4


def test_abandoned_uploads_are_499s_logged_once_without_tracebacks(server: RunningServer) -> None:
    with server.client() as http:
        before = metric_samples(http.get("/metrics").text)
        log_lines_before = server.log().count("client disconnected during the body upload")
        for _ in range(10):
            sock = _half_sent(server, 5000, b'{"model": "llama", "prompt": "')
            time.sleep(0.05)
            sock.close()

        def rejections(status: str) -> float:
            return metric_value(metric_samples(http.get("/metrics").text), "genserve_http_rejections_total",
                                status=status)

        assert wait_for(lambda: rejections("499") - metric_value(before, "genserve_http_rejections_total",
                                                                 status="499") == 10)
        assert rejections("500") == metric_value(before, "genserve_http_rejections_total", status="500")
    log = server.log()
    assert log.count("client disconnected during the body upload") - log_lines_before == 10
    assert "Traceback" not in log


def test_schemathesis_finds_no_server_error(server: RunningServer, tmp_path: Path) -> None:
    """Positive and negative cases from the served OpenAPI document; the ``model`` field is pinned to
    the loaded models (as any real client does) so generated bodies reach the engines."""
    with server.client() as http:
        schema = http.get("/openapi.json").json()
    for name, model in (("TextGenerateRequest", "llama"), ("ImageGenerateRequest", "digits")):
        component = schema["components"]["schemas"][name]
        component["properties"]["model"] = {"type": "string", "enum": [model]}
        component["required"] = [*component.get("required", []), "model"]
    schema_path = tmp_path / "openapi.json"
    schema_path.write_text(json.dumps(schema))
    command = [sys.executable, "-m", "schemathesis.cli", "run", str(schema_path), "--url", server.url,
               "--checks", "not_a_server_error", "--max-examples", "25", "--phases", "examples,coverage,fuzzing",
               "--max-time", "40", "--seed", "1", "--workers", "2", "--request-timeout", "30", "--no-color",
               "--generation-database", "none"]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "POST /generate" in output or "5 passed" in output, output[-3000:]
    print(f"schemathesis: {time.monotonic() - started:.1f} s\n{output[-1500:]}")
    with server.client() as http:
        assert http.get("/health").status_code == 200
        assert http.post("/generate", json=AR).status_code == 200
        samples = metric_samples(http.get("/metrics").text)
    assert metric_value(samples, "genserve_requests_total", outcome="length") + metric_value(
        samples, "genserve_requests_total", outcome="stop") > 10  # generated bodies did run


def test_depth_is_measured_outside_strings() -> None:
    assert nesting_depth(b'{"a": [1, {"b": "[[[[{{{{"}]}') == 3
    assert nesting_depth(b'"\\"[[["') == 0
    assert nesting_depth(b"[" * 100) == 100
    assert MAX_NUMBER_CHARS < 4300  # Python's int-string limit


def test_a_500_names_no_exception_and_its_id_is_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    response = error_response(500, "internal_error", "KeyError: 'secret_internal_name'")
    body = json.loads(response.body)
    assert "KeyError" not in body["error"]["message"] and "secret_internal_name" not in body["error"]["message"]
    error_id = response.headers["x-error-id"]
    assert error_id in body["error"]["message"]
    assert any(error_id in record.getMessage() and "KeyError" in record.getMessage() for record in caplog.records)


def test_an_unhandled_exception_is_one_logged_500_with_an_id(caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(Settings(models={}))

    @app.get("/raises")
    async def raises() -> None:
        raise ZeroDivisionError("division by zero in a place the client must not see")

    with caplog.at_level(logging.ERROR):
        response = TestClient(app, raise_server_exceptions=False).get("/raises")
    assert response.status_code == 500
    message = response.json()["error"]["message"]
    assert "ZeroDivisionError" not in message and "division" not in message
    error_id = response.headers["x-error-id"]
    records = [record for record in caplog.records if record.exc_info]
    assert len(records) == 1 and error_id in records[0].getMessage()
