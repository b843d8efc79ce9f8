"""POST /generate: validate, pick the model, build the engine params, submit, answer in JSON or SSE."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse

from service.api.body import read_json_body
from service.api.engine_params import image_params, masked_text_request, text_request
from service.api.errors import APIError, api_error, api_error_response
from service.api.generate_format import delta_events, error_json, error_of, result_body
from service.api.openapi import request_body
from service.api.routing import resolve_model
from service.api.schemas import ImageGenerateRequest, MaskedTextGenerateRequest, TextGenerateRequest
from service.api.streaming import SSE_PING, ClientDisconnected, final_output, output_batches, sse_event
from service.common.errors import EngineError
from service.common.outputs import RequestOutput
from service.runtime.engine_client import CoreState, EngineClient, RequestStream
from service.runtime.messages import EngineParams
from service.settings import Settings

router = APIRouter()
request_log = logging.getLogger("genserve.requests")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def read_request_json(request: Request, settings: Settings) -> Any:
    """The JSON body under the server's bounds: size, read time, nesting depth, number sizes, valid Unicode."""
    return await read_json_body(request, settings.max_body_bytes, settings.body_read_timeout_s,
                                settings.max_json_depth)


def ready_client(request: Request) -> EngineClient:
    client: EngineClient = request.app.state.engine_client
    if client.state is not CoreState.READY:
        message = "models are still loading" if client.state is CoreState.LOADING else \
            f"the engine core is {client.state.value}"
        raise APIError(503, "not_ready", message, {"Retry-After": str(request.app.state.settings.retry_after_s)})
    return client


def deadline(timeout_s: float | None, settings: Settings) -> float | None:
    """The request's own timeout, else the server's default; 0 means none."""
    chosen = settings.request_timeout_s if timeout_s is None else timeout_s
    return chosen or None


async def submit(client: EngineClient, model: str, params: EngineParams, settings: Settings,
                 timeout_s: float | None = None, final_only: bool = False,
                 request_id: str | None = None) -> RequestStream:
    """Queue ``params`` under the server's default deadline and queue wait; an ``EngineError`` becomes
    its HTTP ``APIError``."""
    try:
        return await client.submit(model, params, deadline(timeout_s, settings), settings.max_queue_wait_s or None,
                                   request_id=request_id, final_only=final_only)
    except EngineError as error:
        raise api_error(error, settings.retry_after_s) from error


@dataclass(frozen=True)
class PreparedRequest:
    model: str
    params: EngineParams
    stream: bool
    timeout_s: float | None


async def prepare(request: Request) -> PreparedRequest:
    """A /generate body, read, validated and turned into engine params (also what POST /jobs takes)."""
    settings: Settings = request.app.state.settings
    client = ready_client(request)
    body = await read_request_json(request, settings)
    if not isinstance(body, dict):
        raise APIError(422, "validation_error", "the request body must be a JSON object")
    paradigms = {name: info.paradigm for name, info in client.models.items()}
    model = resolve_model(paradigms, body.get("model"), body.get("paradigm"))
    info = client.models[model]
    params: EngineParams
    validated: TextGenerateRequest | ImageGenerateRequest | MaskedTextGenerateRequest
    if info.paradigm == "autoregressive":
        validated = TextGenerateRequest.model_validate({**body, "model": model})
        params = text_request(validated, settings, info)
    elif info.details.get("modality") == "text":
        validated = MaskedTextGenerateRequest.model_validate({**body, "model": model})
        params = masked_text_request(validated, settings, info)
    else:
        validated = ImageGenerateRequest.model_validate({**body, "model": model})
        params = image_params(validated, settings, info)
    return PreparedRequest(model, params, validated.stream, validated.timeout_s)


@router.post("/generate", response_model=None, openapi_extra=request_body(TextGenerateRequest, ImageGenerateRequest, MaskedTextGenerateRequest))
async def generate(request: Request) -> Response:
    """Text (autoregressive) or images (diffusion), by the model or `paradigm` named in the body."""
    settings: Settings = request.app.state.settings
    prepared = await prepare(request)
    stream = await submit(request.app.state.engine_client, prepared.model, prepared.params, settings,
                          prepared.timeout_s, final_only=not prepared.stream)
    if prepared.stream:
        return EventSourceResponse(sse_stream(stream, request, settings.sse_ping_s), headers=SSE_HEADERS)
    return await json_answer(stream, request)


def log_request(stream: RequestStream, status: int, streamed: bool, output: Any | None) -> None:
    line: dict[str, Any] = {"event": "request", "id": stream.request_id, "model": stream.model,
                            "paradigm": stream.paradigm, "status": status, "stream": streamed,
                            "wall_s": round(time.monotonic() - stream.arrival_time, 6), "outputs": stream.delivered}
    result = getattr(output, "result", None)
    line["finish_reason"] = getattr(result, "finish_reason", "cancelled")
    timings = getattr(output, "timings", None)
    if timings is not None:
        line["timings"] = {"queue_s": timings.queue_s, "ttft_s": timings.ttft_s, "total_s": timings.total_s}
    for name in ("prompt_tokens", "completion_tokens", "steps"):
        value = getattr(result, name, None)
        if value is not None:
            line[name] = value
    request_log.info(json.dumps(line, separators=(",", ":")))


async def finished_output(stream: RequestStream, request: Request, openai: bool = False) -> RequestOutput | Response:
    """The request's final output, or the response that ends it: 499 when the client left, the error's
    status and JSON when it failed (OpenAI's shape with ``openai``). Logs the request either way."""
    try:
        output = await final_output(stream, request.receive)
    except ClientDisconnected:
        log_request(stream, 499, False, None)
        return Response(status_code=499)
    error = error_of(output)
    if error is not None:
        translated = api_error(error, request.app.state.settings.retry_after_s)
        log_request(stream, translated.status_code, False, output)
        return api_error_response(translated, openai)
    log_request(stream, 200, False, output)
    return output


async def json_answer(stream: RequestStream, request: Request) -> Response:
    output = await finished_output(stream, request)
    return output if isinstance(output, Response) else JSONResponse(result_body(stream, output))


async def sse_stream(stream: RequestStream, request: Request, ping_every_s: float) -> AsyncIterator[str]:
    final = None
    try:
        async for batch in output_batches(stream, request.receive, ping_every_s):
            if not batch:
                yield SSE_PING
                continue
            messages = [sse_event(kind, data) for kind, data in delta_events(batch)]
            if batch[-1].finished:
                final = batch[-1]
                error = error_of(final)
                messages.append(sse_event("error", error_json(error)) if error is not None
                                else sse_event("done", result_body(stream, final)))
            if messages:
                yield "".join(messages)
    except ClientDisconnected:
        pass
    finally:
        log_request(stream, 200 if final is not None else 499, True, final)
