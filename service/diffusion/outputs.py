"""What the diffusion engine reports per step (``ImageProgress``) and at a request's end (``ImageResult``)."""

from __future__ import annotations

from dataclasses import dataclass

from service.common.errors import EngineError
from service.common.outputs import FinishReason


@dataclass(frozen=True, slots=True)
class ImageProgress:
    step: int  # denoise steps done
    steps: int
    preview_png: bytes | None = None  # the x0 estimates of the request's images, side by side


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    png: bytes
    seed: int


@dataclass(frozen=True, slots=True)
class ImageResult:
    images: tuple[GeneratedImage, ...]
    steps: int
    scheduler: str
    finish_reason: FinishReason
    error: EngineError | None = None  # set when finish_reason is "error"
