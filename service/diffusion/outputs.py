"""What the diffusion engine reports per step (``ImageProgress``) and at a request's end (``ImageResult``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.common.errors import EngineError
from service.common.outputs import FinishReason
from service.diffusion.images import png_bytes


@dataclass(frozen=True, slots=True)
class ImageProgress:
    step: int  # denoise steps done
    steps: int
    preview_png: bytes | None = None  # the x0 estimates of the request's images, side by side


class GeneratedImage:
    """One decoded image: (H, W, C) uint8 pixels and the seed it came from.

    ``png`` encodes it on first use and keeps the bytes. The engine core only decodes: a 512x512 PNG takes
    ~30 ms of CPU for a noisy image, which in the step loop would hold every other request (and the GPU)
    back. The front end encodes finished images in its own threads (``runtime/image_encoder.py``)."""

    __slots__ = ("pixels", "seed", "_png")

    def __init__(self, pixels: np.ndarray, seed: int) -> None:
        self.pixels = pixels
        self.seed = seed
        self._png: bytes | None = None

    @property
    def png(self) -> bytes:
        if self._png is None:
            self._png = png_bytes(self.pixels)
        return self._png

    @property
    def encoded(self) -> bool:
        return self._png is not None

    def __getstate__(self) -> tuple[np.ndarray, int, bytes | None]:
        return self.pixels, self.seed, self._png

    def __setstate__(self, state: tuple[np.ndarray, int, bytes | None]) -> None:
        self.pixels, self.seed, self._png = state

    def __repr__(self) -> str:
        return f"GeneratedImage({'x'.join(map(str, self.pixels.shape))}, seed={self.seed})"


@dataclass(frozen=True, slots=True)
class ImageResult:
    images: tuple[GeneratedImage, ...]
    steps: int
    scheduler: str
    finish_reason: FinishReason
    error: EngineError | None = None  # set when finish_reason is "error"
