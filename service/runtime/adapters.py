"""Validated request body (a dict from the front end) -> the engine's own request, per paradigm."""

from __future__ import annotations

from typing import Any

from service.runtime.requests import EventSink, RequestHandle
from service.settings import Settings


def _submit_text(engine: Any, payload: dict[str, Any], settings: Settings, sink: EventSink,
                 request_id: str) -> RequestHandle:
    from service.api.schemas import TextGenerateRequest
    from service.api.text_params import prompt_token_ids, sampling_params_from_request

    request = TextGenerateRequest.model_validate(payload)
    params = sampling_params_from_request(request, settings)
    return engine.add_request(prompt_token_ids(engine, request, settings), params, sink, request_id)


def _submit_image(engine: Any, payload: dict[str, Any], settings: Settings, sink: EventSink,
                  request_id: str) -> RequestHandle:
    from service.api.images import submit_image

    return submit_image(engine, payload, settings, sink, request_id)


SUBMITTERS = {"autoregressive": _submit_text, "diffusion": _submit_image}


def submit_to_engine(engine: Any, payload: dict[str, Any], settings: Settings, sink: EventSink,
                     request_id: str) -> RequestHandle:
    """Raises ``QueueFull`` or ``RequestRejected`` like ``engine.add_request``."""
    return SUBMITTERS[engine.paradigm](engine, payload, settings, sink, request_id)
