"""POST /generate: validate, pick the engine, queue the request, answer in JSON or SSE."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse

from service.api.errors import APIError, error_response
from service.api.schemas import TextGenerateRequest
from service.api.text_params import prompt_token_ids, sampling_params_from_request
from service.api.streaming import ClientDisconnected, event_batches, merge_token_events, sse_message
from service.runtime.registry import AUTOREGRESSIVE, ModelRegistry, UnknownModel
from service.runtime.requests import EngineEvent, QueueFull, RequestHandle, RequestRejected
from service.settings import Settings

router = APIRouter()
request_log = logging.getLogger("genserve.requests")


async def read_json_body(request: Request, max_bytes: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, "body_too_large", f"request body is {declared} bytes; the limit is {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, "body_too_large", f"request body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, "invalid_json", f"request body is not valid JSON: {error}") from error


@router.post("/generate", response_model=None)
async def generate(request: Request) -> Response:
    state = request.app.state
    settings: Settings = state.settings
    registry: ModelRegistry = state.registry
    if not state.ready:
        raise APIError(503, "not_ready", "models are still loading", {"Retry-After": str(settings.retry_after_s)})
    body = await read_json_body(request, settings.max_body_bytes)
    if not isinstance(body, dict):
        raise APIError(422, "validation_error", "the request body must be a JSON object")
    try:
        engine = registry.resolve(body.get("model"), body.get("paradigm"))
    except UnknownModel as error:
        raise APIError(404, "model_not_found", str(error)) from error
    except RequestRejected as error:
        raise APIError(error.status_code, error.error_type, str(error)) from error
    if engine.paradigm == AUTOREGRESSIVE:
        return await _generate_text(request, engine, body, settings)
    raise APIError(422, "validation_error", f"paradigm {engine.paradigm!r} is not served")


def admit(add: Callable[[], RequestHandle], settings: Settings) -> RequestHandle:
    try:
        return add()
    except QueueFull as error:
        raise APIError(503, "overloaded", f"queue is full ({error}); retry later",
                       {"Retry-After": str(settings.retry_after_s)}) from error
    except RequestRejected as error:
        raise APIError(error.status_code, error.error_type, str(error)) from error


async def _generate_text(request: Request, engine: Any, body: dict[str, Any], settings: Settings) -> Response:
    body = {**body, "model": body.get("model") or engine.name}
    params_request = TextGenerateRequest.model_validate(body)
    params = sampling_params_from_request(params_request, settings)
    prompt_ids = prompt_token_ids(engine, params_request, settings)
    loop = asyncio.get_running_loop()
    handle = admit(lambda: engine.add_request(prompt_ids, params, loop), settings)
    return await respond(handle, request, params_request.stream)


async def respond(handle: RequestHandle, request: Request, stream: bool) -> Response:
    """Answer with one JSON body at the end, or with SSE events as they come."""
    if stream:
        return EventSourceResponse(sse_response_stream(handle, request),
                                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await collect_response(handle, request)


def _response_object(handle: RequestHandle, result: dict[str, Any]) -> dict[str, Any]:
    return {"id": handle.request_id, "model": handle.model, "paradigm": handle.paradigm, **result}


def _log_request(handle: RequestHandle, status: int, stream: bool, result: dict[str, Any] | None) -> None:
    line: dict[str, Any] = {"event": "request", "id": handle.request_id, "model": handle.model,
                            "paradigm": handle.paradigm, "status": status, "stream": stream,
                            "wall_s": round(time.perf_counter() - handle.arrival_time, 6)}
    if result is not None:
        line["finish_reason"] = result.get("finish_reason")
        for key in ("usage", "timings", "steps", "scheduler"):
            if key in result:
                line[key] = result[key]
    else:
        line["finish_reason"] = "cancelled"
    request_log.info(json.dumps(line, separators=(",", ":")))


async def collect_response(handle: RequestHandle, request: Request) -> Response:
    final: EngineEvent | None = None
    try:
        async for batch in event_batches(handle, request.receive):
            if batch[-1].is_final:
                final = batch[-1]
    except ClientDisconnected:
        _log_request(handle, 499, False, None)
        return Response(status_code=499)
    assert final is not None
    if final.kind == "error":
        _log_request(handle, 500, False, final.data)
        return error_response(500, final.data["error"]["type"], final.data["error"]["message"])
    _log_request(handle, 200, False, final.data)
    return JSONResponse(_response_object(handle, final.data))


async def sse_response_stream(handle: RequestHandle, request: Request) -> AsyncIterator[str]:
    final: dict[str, Any] | None = None
    try:
        async for batch in event_batches(handle, request.receive):
            for event in merge_token_events(batch):
                if event.kind == "done":
                    final = event.data
                    yield sse_message("done", _response_object(handle, event.data))
                elif event.kind == "error":
                    final = event.data
                    yield sse_message("error", {"error": event.data["error"]})
                elif event.data.get("text") or "logprobs" in event.data or event.kind != "token":
                    yield sse_message(event.kind, event.data)
    except ClientDisconnected:
        pass
    finally:
        _log_request(handle, 200 if final is not None else 499, True, final)
