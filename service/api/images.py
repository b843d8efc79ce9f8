"""A validated diffusion request body -> a request queued in the diffusion engine.

Runs in the engine-core process (``runtime/adapters.py`` dispatches here by paradigm): the
front end has already checked the body against ``ImageGenerateRequest``; this applies the
server's limits and the model's own checks (labels, sizes, step counts), which raise
``RequestRejected`` (4xx) or ``QueueFull`` (503) back to the route.
"""

from __future__ import annotations

from typing import Any

from service.api.image_params import image_params_from_request
from service.api.schemas import ImageGenerateRequest
from service.runtime.requests import EventSink, RequestHandle
from service.settings import Settings


def submit_image(engine: Any, payload: dict[str, Any], settings: Settings, sink: EventSink,
                 request_id: str) -> RequestHandle:
    request = ImageGenerateRequest.model_validate(payload)
    params = image_params_from_request(request, settings)
    return engine.add_request(params, sink, request_id)
