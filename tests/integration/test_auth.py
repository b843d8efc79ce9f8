"""API keys on the real server: 401s with WWW-Authenticate, the right keys work (env and file),
/health and /ready stay open, /metrics protected on request, docs off, keys never in logs or help."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.app import create_app
from service.settings import REPO_ROOT, Settings
from tests.fixtures.tiny_models import build_tiny_llama
from tests.integration.server import RunningServer, running_server

ENV_KEYS = ("env-key-one-5f1c9a", "env-key-two-a83b07")
FILE_KEY = "file-key-77d2e4"
# ignore_eos: the random tiny model may sample its EOS first, and the test counts the tokens
REQUEST = {"model": "llama", "prompt": "hello", "max_tokens": 2, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("auth")
    key_file = root / "keys.txt"
    key_file.write_text(f"# one key per line\n\n{FILE_KEY}\n")
    with running_server({"llama": build_tiny_llama(root / "llama", seed=3)}, root, "--api-key-file", str(key_file),
                        "--metrics-require-key", "--no-enable-docs",
                        env={"GENSERVE_API_KEYS": ",".join(ENV_KEYS)}) as running:
        yield running


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("headers", [{}, _bearer("wrong-key"), _bearer(ENV_KEYS[0][:-1]), _bearer(ENV_KEYS[0] + "x"),
                                     {"Authorization": f"Basic {ENV_KEYS[0]}"}, {"Authorization": ENV_KEYS[0]},
                                     {"Authorization": "Bearer"}, {"X-Api-Key": ENV_KEYS[0]}],
                         ids=["missing", "wrong", "prefix", "longer", "basic-scheme", "no-scheme", "empty",
                              "other-header"])
def test_generation_without_a_valid_key_is_401(server: RunningServer, headers: dict[str, str]) -> None:
    with server.client() as http:
        for stream in (False, True):
            response = http.post("/generate", json={**REQUEST, "stream": stream}, headers=headers)
            assert response.status_code == 401, response.text
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert response.json()["error"]["type"] == "unauthorized"


@pytest.mark.parametrize("key", [*ENV_KEYS, FILE_KEY])
def test_each_configured_key_works(server: RunningServer, key: str) -> None:
    with server.client() as http:
        response = http.post("/generate", json=REQUEST, headers=_bearer(key))
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 2
        assert http.post("/generate", json=REQUEST, headers={"Authorization": f"bearer {key}"}).status_code == 200


def test_health_and_ready_stay_open(server: RunningServer) -> None:
    with server.client() as http:
        assert http.get("/health").status_code == 200
        assert http.get("/ready").status_code == 200


def test_metrics_need_a_key_when_asked_to(server: RunningServer) -> None:
    with server.client() as http:
        assert http.get("/metrics").status_code == 401
        assert http.get("/metrics", headers=_bearer("wrong")).status_code == 401
        response = http.get("/metrics", headers=_bearer(ENV_KEYS[1]))
        assert response.status_code == 200 and "genserve_http_rejections_total" in response.text


def test_docs_are_off(server: RunningServer) -> None:
    with server.client() as http:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert http.get(path).status_code == 404, path


def test_keys_are_never_logged(server: RunningServer) -> None:
    with server.client() as http:
        http.post("/generate", json=REQUEST, headers=_bearer(ENV_KEYS[0]))
        http.post("/generate", json=REQUEST, headers=_bearer("wrong-key-attempt"))
    log = server.log()
    assert "engine_core_ready" in log
    for secret in (*ENV_KEYS, FILE_KEY, "wrong-key-attempt"):
        assert secret not in log


def test_keys_are_not_in_help_or_the_settings_repr() -> None:
    env = {**os.environ, "GENSERVE_API_KEYS": ",".join(ENV_KEYS)}
    help_text = subprocess.run([sys.executable, "-m", "service", "--help"], capture_output=True, text=True,
                               cwd=REPO_ROOT, env=env, check=True).stdout
    assert "--api-keys" in help_text and "--api-key-file" in help_text
    settings = Settings(models={}, api_keys=",".join(ENV_KEYS))
    assert settings.resolved_api_keys() == ENV_KEYS
    for secret in ENV_KEYS:
        assert secret not in help_text and secret not in repr(settings) and secret not in str(settings.model_dump())


def test_a_missing_key_file_stops_the_server_at_startup(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "service", "--api-key-file", str(tmp_path / "nope")],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert result.returncode == 2 and "api_key_file" in result.stderr


def test_every_generation_route_requires_the_key() -> None:
    """A guard for routes added later: every operation under /generate, /v1/ or /jobs carries the
    bearer dependency (which is what puts the HTTPBearer security requirement on it)."""
    paths = create_app(Settings(models={}, api_keys="k")).openapi()["paths"]
    generation_paths = [path for path in paths if path == "/generate" or path.startswith(("/v1/", "/jobs"))]
    assert generation_paths
    for path in generation_paths:
        for method, operation in paths[path].items():
            assert operation.get("security") == [{"HTTPBearer": []}], f"{method.upper()} {path}"


def test_openapi_documents_the_generate_body_and_bearer_auth() -> None:
    app = create_app(Settings(models={}, api_keys="k"))
    document = app.openapi()
    operation = document["paths"]["/generate"]["post"]
    body_schemas = operation["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in body_schemas} == {
        "TextGenerateRequest", "ImageGenerateRequest", "MaskedTextGenerateRequest"}
    for name in ("TextGenerateRequest", "ImageGenerateRequest", "MaskedTextGenerateRequest", "CompletionRequest",
                 "ChatCompletionRequest", "ImageGenerationRequest"):
        assert document["components"]["schemas"][name]["properties"], name  # every route's body is documented
    assert operation["security"] == [{"HTTPBearer": []}]
    assert "security" not in document["paths"]["/health"]["get"]
    open_app = create_app(Settings(models={}))  # no keys: no check, and none documented
    assert open_app.state.api_keys == () and "security" not in open_app.openapi()["paths"]["/generate"]["post"]
