"""The OpenAI-compatible API under ``/v1/``: completions, chat completions, image generations, models.

Served by the same engines as ``/generate``; errors come in OpenAI's shape with the same statuses
(``service/api/errors.py``).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.api import openai_chat, openai_completions, openai_images
from service.common.errors import UnknownModel, shorten
from service.runtime.messages import ModelInfo

router = APIRouter()
router.include_router(openai_completions.router)
router.include_router(openai_chat.router)
router.include_router(openai_images.router)
SERVED_SINCE = int(time.time())


def model_object(info: ModelInfo) -> dict[str, object]:
    return {"id": info.name, "object": "model", "created": SERVED_SINCE, "owned_by": "genserve"}


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    """The served models, as OpenAI lists them (``GET /models`` tells what each accepts)."""
    models = request.app.state.engine_client.models.values()
    return JSONResponse({"object": "list", "data": [model_object(info) for info in models]})


@router.get("/v1/models/{model}")
async def retrieve_model(model: str, request: Request) -> JSONResponse:
    info = request.app.state.engine_client.models.get(model)
    if info is None:
        raise UnknownModel(f"model {shorten(model)!r} is not loaded")
    return JSONResponse(model_object(info))
