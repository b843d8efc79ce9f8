"""POST /v1/images/generations, in OpenAI's wire format: ``{created, data: [{b64_json}]}``.

Streamed (``stream: true``), it sends OpenAI's image events, ``event: <type>`` then ``data: {json}``:
up to ``partial_images`` ``image_generation.partial_image`` events, then one
``image_generation.completed`` per image. The partial images are the engine's previews (the clean
image the sampler predicts at that step); ``preview_every`` is set so that about ``partial_images``
arrive before the last step. With ``n`` > 1 each event carries the extra field ``image_index``.
Only ``b64_json`` is served: this server keeps no images to link to.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

from service.api.engine_params import image_params
from service.api.errors import APIError, error_body, status_of
from service.api.generate import finished_output, log_request, submit
from service.api.generate_format import b64, error_of
from service.api.openai_schemas import ImageGenerationRequest
from service.api.openai_text import read_body, streamed
from service.api.openapi import request_body
from service.api.schemas import ImageGenerateRequest
from service.api.streaming import ClientDisconnected, output_batches, sse_event
from service.diffusion.outputs import ImageProgress, ImageResult
from service.diffusion.params import ImageParams
from service.runtime.engine_client import RequestStream
from service.runtime.messages import ModelInfo
from service.settings import Settings

router = APIRouter()
PARTIAL_EVENT = "image_generation.partial_image"
COMPLETED_EVENT = "image_generation.completed"
# The fields an OpenAI body shares with /generate's diffusion body (same names, same meaning).
SHARED_FIELDS = ("prompt", "negative_prompt", "steps", "scheduler", "guidance_scale", "seed", "n")


@router.post("/v1/images/generations", response_model=None, openapi_extra=request_body(ImageGenerationRequest))
async def image_generations(request: Request) -> Response:
    """OpenAI's image generation on a diffusion model."""
    settings: Settings = request.app.state.settings
    body, model, info = await read_body(request, ImageGenerationRequest, "diffusion", "image")
    if body.response_format == "url":
        raise APIError(400, "unsupported_response_format", "response_format 'url' is not supported: this server "
                       "keeps no images to link to; send response_format 'b64_json'", param="response_format")
    params = engine_params(body, info, settings)
    stream = await submit(request.app.state.engine_client, model, params, settings, final_only=not body.stream)
    created = int(time.time())
    size = f"{params.width}x{params.height}" if params.width is not None else model_size(info)
    if body.stream:
        return streamed(image_events(stream, request, params.num_images, body.partial_images or 0, created, size))
    output = await finished_output(stream, request, openai=True)
    if isinstance(output, Response):
        return output
    result = output.result
    assert isinstance(result, ImageResult)
    return JSONResponse({"created": created, "data": [{"b64_json": b64(image.png)} for image in result.images],
                         "output_format": "png", "size": size})


def engine_params(body: ImageGenerationRequest, info: ModelInfo, settings: Settings) -> ImageParams:
    """Through /generate's schema (only the fields the client sent, so the model's defaults apply)."""
    fields: dict[str, Any] = {name: getattr(body, name) for name in SHARED_FIELDS if name in body.model_fields_set}
    width, height = body.width_height
    if width is not None and height is not None:
        if width % 8 or height % 8 or min(width, height) < 8:
            raise APIError(422, "validation_error", f"size {body.size}: width and height must be multiples of 8",
                           param="size")
        fields.update(width=width, height=height)
    params = image_params(ImageGenerateRequest.model_validate(fields), settings, info)
    if body.stream and body.partial_images:
        # previews at steps k, 2k, ... before the last one: about partial_images of them
        params = dataclasses.replace(params, preview_every=max(1, math.ceil(params.steps / (body.partial_images + 1))))
    return params


def model_size(info: ModelInfo) -> str:
    sample_size = info.details.get("sample_size")
    if isinstance(sample_size, list) and len(sample_size) == 2:
        return f"{sample_size[0]}x{sample_size[1]}"
    return "auto"


def split_strip(png: bytes, count: int) -> list[bytes]:
    """The engine's preview strip (the request's images side by side) -> one PNG per image."""
    if count == 1:
        return [png]
    strip = Image.open(io.BytesIO(png))
    tile_width = strip.width // count
    tiles = []
    for index in range(count):
        buffer = io.BytesIO()
        strip.crop((index * tile_width, 0, (index + 1) * tile_width, strip.height)).save(buffer, format="PNG")
        tiles.append(buffer.getvalue())
    return tiles


async def image_events(stream: RequestStream, request: Request, num_images: int, partial_images: int,
                       created: int, size: str) -> AsyncIterator[str]:
    common = {"created_at": created, "size": size, "quality": "auto", "background": "opaque", "output_format": "png"}
    sent_partials = 0
    final = None
    status = 499
    try:
        async for batch in output_batches(stream, request.receive):
            messages: list[str] = []
            for output in batch:
                progress = output.delta
                if (isinstance(progress, ImageProgress) and progress.preview_png is not None
                        and progress.step < progress.steps and sent_partials < partial_images):
                    tiles = split_strip(progress.preview_png, num_images)
                    for image_index, tile in enumerate(tiles):
                        event = {"type": PARTIAL_EVENT, "b64_json": b64(tile),
                                 "partial_image_index": sent_partials, **common}
                        if len(tiles) > 1:
                            event["image_index"] = image_index
                        messages.append(sse_event(PARTIAL_EVENT, event))
                    sent_partials += 1
            if batch[-1].finished:
                final = batch[-1]
                error = error_of(final)
                if error is not None:
                    status, error_type = status_of(error)
                    messages.append(sse_event("error", error_body(status, error_type, str(error), openai=True)))
                else:
                    status = 200
                    result = final.result
                    assert isinstance(result, ImageResult)
                    for image_index, image in enumerate(result.images):
                        event = {"type": COMPLETED_EVENT, "b64_json": b64(image.png), **common,
                                 "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                                           "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}}
                        if len(result.images) > 1:
                            event["image_index"] = image_index
                        messages.append(sse_event(COMPLETED_EVENT, event))
            if messages:
                yield "".join(messages)
    except ClientDisconnected:
        pass
    finally:
        log_request(stream, status, True, final)
