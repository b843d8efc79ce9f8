"""Every failure as one JSON error, and the one table from engine error types to HTTP statuses.

``/generate`` and the rest answer ``{"error": {"type", "message"}}``; routes under ``/v1/`` answer in
OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the same statuses.

Messages may quote what the client sent (an unknown label, a model name, a field name): every
quoted value is clipped to ``ECHO_LIMIT`` characters and a whole message to ``MESSAGE_LIMIT``,
so an error is never larger than a few kB whatever the input. A 5xx never names an exception:
it carries an error id, and the one log line that holds the details has the same id.
"""

from __future__ import annotations

import logging
import re
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.common.errors import (EngineError, EngineFailed, EngineUnavailable, InvalidRequest, PromptTooLong,
                                   QueueFull, RequestTimedOut, UnknownLabel, UnknownModel)
from service.runtime import metrics

logger = logging.getLogger(__name__)
OPENAI_PREFIX = "/v1/"
ECHO_LIMIT = 200
MESSAGE_LIMIT = 2000
# a Python repr of a string ('...' or "..."), the form f"{value!r}" messages echo input in
_QUOTED = re.compile(r"'[^'\\]*(?:\\.[^'\\]*)*'" + r'|"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)

# Most specific first: the first entry the error is an instance of wins.
ENGINE_ERROR_STATUS: tuple[tuple[type[EngineError], int, str], ...] = (
    (UnknownLabel, 422, "unknown_label"),
    (InvalidRequest, 422, "validation_error"),
    (PromptTooLong, 413, "prompt_too_long"),
    (QueueFull, 503, "overloaded"),
    (RequestTimedOut, 503, "queue_timeout"),
    (UnknownModel, 404, "model_not_found"),
    (EngineUnavailable, 503, "engine_unavailable"),
    (EngineFailed, 500, "engine_error"),
    (EngineError, 500, "engine_error"),
)
RETRYABLE_STATUSES = (503,)


def clip(text: str | None, limit: int = ECHO_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    text = "" if text is None else str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def clip_echoes(message: str) -> str:
    """Clip each quoted value in ``message``, then the message as a whole."""
    if len(message) > ECHO_LIMIT:
        message = _QUOTED.sub(lambda match: clip(match.group(0)), message)
    return clip(message, MESSAGE_LIMIT)


def new_error_id() -> str:
    return f"err-{uuid.uuid4().hex[:16]}"


def internal_error_response(error_id: str, openai: bool = False) -> JSONResponse:
    return error_response(500, "internal_error", f"internal error (id {error_id}); the server log has the details",
                          {"X-Error-Id": error_id}, openai=openai)


def unexpected_error_response(path: str, error: BaseException) -> JSONResponse:
    """Log a bug once, with its traceback and an id; answer with the id alone."""
    error_id = new_error_id()
    logger.error("internal error %s on %s", error_id, clip(path), exc_info=error)
    return internal_error_response(error_id, openai=path.startswith(OPENAI_PREFIX))


class APIError(Exception):
    def __init__(self, status_code: int, error_type: str, message: str,
                 headers: dict[str, str] | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type
        self.message = message
        self.headers = headers
        self.param = param


def status_of(error: EngineError) -> tuple[int, str]:
    for error_class, status, error_type in ENGINE_ERROR_STATUS:
        if isinstance(error, error_class):
            return status, error_type
    raise AssertionError("EngineError is in the table")


def api_error(error: EngineError, retry_after_s: int) -> APIError:
    status, error_type = status_of(error)
    headers = {"Retry-After": str(retry_after_s)} if status in RETRYABLE_STATUSES else None
    return APIError(status, error_type, str(error), headers)


def error_body(status_code: int, error_type: str, message: str, openai: bool, param: str | None = None) -> dict:
    message = clip_echoes(message)
    if openai:
        openai_type = "invalid_request_error" if status_code < 500 else "server_error"
        return {"error": {"message": message, "type": openai_type, "param": param, "code": error_type}}
    return {"error": {"type": error_type, "message": message}}


def error_response(status_code: int, error_type: str, message: str, headers: dict[str, str] | None = None,
                   openai: bool = False, param: str | None = None) -> JSONResponse:
    if status_code >= 500 and error_type in ("internal_error", "engine_error") \
            and not message.startswith("internal error (id "):
        error_id = new_error_id()  # log the details, answer with the id
        logger.error("internal error %s: %s", error_id, clip(message, MESSAGE_LIMIT))
        return internal_error_response(error_id, openai)
    if status_code >= 400:
        metrics.HTTP_REJECTIONS.labels(str(status_code)).inc()
    return JSONResponse(error_body(status_code, error_type, message, openai, param), status_code=status_code,
                        headers=headers)


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith(OPENAI_PREFIX)


def describe_validation_errors(errors: list[dict]) -> tuple[str, str | None]:
    """A readable message and the first offending field (OpenAI's ``param``)."""
    parts = []
    first_field = None
    for error in errors:
        location = ".".join(clip(str(part)) for part in error.get("loc", ()) if part != "body")
        first_field = first_field or location or None
        parts.append(f"{location or 'body'}: {clip(error.get('msg', 'invalid'))}")
    return "; ".join(parts), first_field


def api_error_response(error: APIError, openai: bool) -> JSONResponse:
    """The JSON answer to ``error`` (from ``api_error`` or raised), in OpenAI's shape with ``openai``."""
    return error_response(error.status_code, error.error_type, error.message, error.headers, openai, error.param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return api_error_response(error, _is_openai(request))

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, error: EngineError) -> JSONResponse:
        return api_error_response(api_error(error, request.app.state.settings.retry_after_s), _is_openai(request))

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(list(error.errors()))
        return error_response(422, "validation_error", message, openai=_is_openai(request), param=param)

    @app.exception_handler(ValidationError)
    async def _validation(request: Request, error: ValidationError) -> JSONResponse:
        message, param = describe_validation_errors(list(error.errors(include_url=False)))
        return error_response(422, "validation_error", message, openai=_is_openai(request), param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, "http_error", str(error.detail), getattr(error, "headers", None),
                              _is_openai(request))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        return unexpected_error_response(request.url.path, error)
