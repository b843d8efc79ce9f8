"""Bad input on every generation route other than /generate (tests/integration/test_hardening.py has
/generate's corpus): each case is a 4xx with the route's JSON error shape, and the server stays healthy."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fixtures.tiny_diffusion import build_tiny_digits
from tests.fixtures.tiny_models import build_tiny_llama
from tests.fixtures.tiny_text_diffusion import build_tiny_mdlm
from tests.integration.server import RunningServer, running_server

DEEP = "[" * 200_000 + "]" * 200_000
HUGE_INT = "9" * 4400

CASES: list[tuple[str, object, int]] = [
    # /v1/completions
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -1}, 422),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}, 422),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 0}, 422),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "surprise": True}, 422),
    ("/v1/completions", {"model": "tiny", "prompt": 5}, 422),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 100}, 422),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": [""]}, 422),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"abc": 1}}, 422),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"99999999": 1}}, 422),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 10**9}, 422),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 0}, 422),
    ("/v1/completions", {"model": "digits", "prompt": "x"}, 422),
    ("/v1/completions", '{"model": "tiny", "prompt": "\\ud800"}', 422),
    ("/v1/completions", '{"model": "tiny", "prompt": "x", "max_tokens": ' + HUGE_INT + "}", 422),
    ("/v1/completions", DEEP, 422),
    ("/v1/completions", "{not json", 400),
    # /v1/chat/completions
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 422),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 422),
    ("/v1/chat/completions", {"model": "tiny"}, 422),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 422),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -2}, 422),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', 422),
    ("/v1/chat/completions", [1, 2], 422),
    # /v1/images/generations
    ("/v1/images/generations", {"model": "digits", "prompt": "one", "size": "big"}, 422),
    ("/v1/images/generations", {"model": "digits", "prompt": "one", "n": 0}, 422),
    ("/v1/images/generations", {"model": "digits", "prompt": "one", "response_format": "url"}, 400),
    ("/v1/images/generations", {"model": "digits", "prompt": "one", "partial_images": 5}, 422),
    ("/v1/images/generations", {"model": "tiny", "prompt": "one"}, 422),
    ("/v1/images/generations", {"model": "digits", "prompt": "one", "steps": 0}, 422),
    ("/v1/images/generations", {"model": "digits", "prompt": "eleven"}, 422),
    ("/v1/images/generations", {"model": "digits", "prompt": "one", "size": "32x32"}, 422),
    # /jobs
    ("/jobs", {}, 422),
    ("/jobs", {"model": "digits", "prompt": "one", "steps": 0}, 422),
    ("/jobs", {"model": "tiny", "prompt": "x", "max_tokens": -1}, 422),
    ("/jobs", {"model": "mdlm", "prompt": "x", "remasking": "whatever"}, 422),
    ("/jobs", '{"model": "tiny", "prompt": "\\udfff"}', 422),
    ("/jobs", DEEP, 422),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("bad-input-models")
    models = {"tiny": build_tiny_llama(root / "tiny", seed=8), "digits": build_tiny_digits(root / "digits"),
              "mdlm": build_tiny_mdlm(root / "mdlm")}
    with running_server(models, tmp_path_factory.mktemp("bad-input-logs"), "--max-body-bytes", "2000000") as running:
        yield running


@pytest.mark.parametrize("route, body, status", CASES, ids=[f"{i}-{route}" for i, (route, _, _) in enumerate(CASES)])
def test_bad_input_is_a_json_4xx(server: RunningServer, route: str, body: object, status: int) -> None:
    with server.client() as http:
        if isinstance(body, str):
            response = http.post(route, content=body.encode(), headers={"content-type": "application/json"})
        else:
            response = http.post(route, json=body)
        assert response.status_code == status, response.text[:500]
        error = response.json()["error"]
        assert error["message"] and len(response.text) < 5000
        if route.startswith("/v1/"):
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "invalid_request_error"
        else:
            assert set(error) == {"type", "message"}
        assert http.get("/health").status_code == 200
