"""One JSON error shape for every failure: ``{"error": {"type", "message"}}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.runtime import metrics

logger = logging.getLogger(__name__)


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
    if status_code >= 400:
        metrics.HTTP_REJECTIONS.labels(str(status_code)).inc()
    return JSONResponse({"error": {"type": error_type, "message": message}}, status_code=status_code,
                        headers=headers)


def describe_validation_errors(errors: list[dict]) -> str:
    parts = []
    for error in errors:
        location = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        parts.append(f"{location or 'body'}: {error.get('msg', 'invalid')}")
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
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, "internal_error", f"{type(error).__name__}: {error}")
