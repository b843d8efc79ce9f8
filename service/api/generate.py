"""POST /generate: validate, pick the engine, queue the request, answer in JSON or SSE."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse

from service.api.body import read_json_body
from service.api.errors import APIError, error_response
from service.api.schemas import REQUEST_SCHEMAS
from service.api.streaming import ClientDisconnected, event_batches, merge_token_events, sse_message
from service.runtime.engine_client import ClientHandle, EngineClient, EngineCoreDied
from service.runtime.registry import UnknownModel, resolve_model
from service.runtime.requests import EngineEvent, QueueFull, RequestRejected
from service.settings import Settings

router = APIRouter()
request_log = logging.getLogger("genserve.requests")


@router.post("/generate", response_model=None)
async def generate(request: Request) -> Response:
    state = request.app.state
    settings: Settings = state.settings
    client: EngineClient = state.engine_client
    if not client.ready.is_set():
        raise APIError(503, "not_ready", "models are still loading", {"Retry-After": str(settings.retry_after_s)})
    body = await read_json_body(request, settings.max_body_bytes, settings.body_read_timeout_s,
                                settings.max_json_depth)
    if not isinstance(body, dict):
        raise APIError(422, "validation_error", "the request body must be a JSON object")
    paradigms = {name: entry["paradigm"] for name, entry in client.models.items()}
    try:
        model = resolve_model(paradigms, body.get("model"), body.get("paradigm"))
    except UnknownModel as error:
        raise APIError(404, "model_not_found", str(error)) from error
    except RequestRejected as error:
        raise APIError(error.status_code, error.error_type, str(error)) from error
    schema = REQUEST_SCHEMAS[paradigms[model]]
    validated = schema.model_validate({**body, "model": model})
    handle = await submit(client, model, validated.model_dump(), settings)
    return await respond(handle, request, validated.stream)


async def submit(client: EngineClient, model: str, payload: dict[str, Any], settings: Settings) -> ClientHandle:
    try:
        return await client.submit(model, payload)
    except QueueFull as error:
        raise APIError(503, "overloaded", str(error), {"Retry-After": str(settings.retry_after_s)}) from error
    except RequestRejected as error:
        raise APIError(error.status_code, error.error_type, str(error)) from error
    except EngineCoreDied as error:
        raise APIError(503, "engine_unavailable", str(error), {"Retry-After": str(settings.retry_after_s)}) from error


async def respond(handle: ClientHandle, request: Request, stream: bool) -> Response:
    """Answer with one JSON body at the end, or with SSE events as they come."""
    if stream:
        return EventSourceResponse(sse_response_stream(handle, request),
                                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await collect_response(handle, request)


def _response_object(handle: ClientHandle, result: dict[str, Any]) -> dict[str, Any]:
    return {"id": handle.request_id, "model": handle.model, "paradigm": handle.paradigm, **result}


def _log_request(handle: ClientHandle, status: int, stream: bool, result: dict[str, Any] | None) -> None:
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


async def collect_response(handle: ClientHandle, request: Request) -> Response:
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


async def sse_response_stream(handle: ClientHandle, request: Request) -> AsyncIterator[str]:
    final: dict[str, Any] | None = None
    try:
        async for batch in event_batches(handle, request.receive):
            messages = []
            for event in merge_token_events(batch):
                if event.kind == "done":
                    final = event.data
                    messages.append(sse_message("done", _response_object(handle, event.data)))
                elif event.kind == "error":
                    final = event.data
                    messages.append(sse_message("error", {"error": event.data["error"]}))
                elif event.kind != "token" or event.data["text"] or "logprobs" in event.data:
                    messages.append(sse_message(event.kind, event.data))
            if messages:
                yield "".join(messages)
    except ClientDisconnected:
        pass
    finally:
        _log_request(handle, 200 if final is not None else 499, True, final)
