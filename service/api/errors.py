"""One JSON error shape for every failure: ``{"error": {"type", "message"}}``.

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

from service.runtime import metrics

logger = logging.getLogger(__name__)

ECHO_LIMIT = 200
MESSAGE_LIMIT = 2000
# a Python repr of a string ('...' or "..."), the form f"{value!r}" messages echo input in
_QUOTED = re.compile(r"'[^'\\]*(?:\\.[^'\\]*)*'" + r'|"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


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


def internal_error_response(error_id: str) -> JSONResponse:
    return error_response(500, "internal_error", f"internal error (id {error_id}); the server log has the details",
                          {"X-Error-Id": error_id})


class APIError(Exception):
    def __init__(self, status_code: int, error_type: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type
        self.message = message
        self.headers = headers


def error_response(status_code: int, error_type: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    if status_code >= 500 and error_type == "internal_error" and not message.startswith("internal error (id "):
        error_id = new_error_id()  # e.g. an engine's admission failure: log the details, answer with the id
        logger.error("internal error %s: %s", error_id, clip(message, MESSAGE_LIMIT))
        return internal_error_response(error_id)
    if status_code >= 400:
        metrics.HTTP_REJECTIONS.labels(str(status_code)).inc()
    return JSONResponse({"error": {"type": error_type, "message": clip_echoes(message)}}, status_code=status_code,
                        headers=headers)


def describe_validation_errors(errors: list[dict]) -> str:
    parts = []
    for error in errors:
        location = ".".join(clip(str(part)) for part in error.get("loc", ()) if part != "body")
        parts.append(f"{location or 'body'}: {clip(error.get('msg', 'invalid'))}")
    return "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return error_response(error.status_code, error.error_type, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(422, "validation_error", describe_validation_errors(list(error.errors())))

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, error: ValidationError) -> JSONResponse:
        return error_response(422, "validation_error",
                              describe_validation_errors(list(error.errors(include_url=False))))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, "http_error", str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        return unexpected_error_response(request.url.path, error)


def unexpected_error_response(path: str, error: BaseException) -> JSONResponse:
    """Log a bug once, with its traceback and an id; answer with the id alone."""
    error_id = new_error_id()
    logger.error("internal error %s on %s", error_id, clip(path), exc_info=error)
    return internal_error_response(error_id)
