"""ImageGenerateRequest -> ImageParams (the diffusion engine's own type), with the server's limits.

Runs in the engine-core process; rejections travel back as ``RequestRejected``.
"""

from __future__ import annotations

from service.api.schemas import ImageGenerateRequest
from service.diffusion.request import ImageParams
from service.runtime.requests import RequestRejected
from service.settings import Settings


def image_params_from_request(request: ImageGenerateRequest, settings: Settings) -> ImageParams:
    steps = settings.default_denoise_steps if request.steps is None else request.steps
    if steps > settings.max_denoise_steps:
        raise RequestRejected(f"steps {steps} is above this server's limit of {settings.max_denoise_steps}",
                              status_code=422, error_type="validation_error")
    if request.n > settings.max_images_per_request:
        raise RequestRejected(f"n {request.n} is above this server's limit of {settings.max_images_per_request}",
                              status_code=422, error_type="validation_error")
    scheduler = request.scheduler
    if scheduler is None and settings.default_scheduler != "model":
        scheduler = settings.default_scheduler
    return ImageParams(
        prompt=request.prompt, negative_prompt=request.negative_prompt, steps=steps, scheduler=scheduler,
        eta=request.eta, guidance_scale=request.guidance_scale, seed=request.seed, num_images=request.n,
        width=request.width, height=request.height, preview_every=request.preview_every,
    )
