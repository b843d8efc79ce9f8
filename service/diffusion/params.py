"""What a diffusion request asks for, in the engine's own terms (the API layer fills it in)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageParams:
    """One request: ``num_images`` images, each its own batch row and its own generator.

    ``None`` means "the model's default": the model folder's scheduler, its guidance scale
    (7.5 for text-to-image, 1.0 = no guidance for class-conditional models), its native size.
    Image ``i`` is drawn from ``seed + i``; a missing seed is picked at random.
    """

    prompt: str = ""
    negative_prompt: str | None = None
    steps: int = 50
    scheduler: str | None = None
    eta: float = 0.0
    guidance_scale: float | None = None
    seed: int | None = None
    num_images: int = 1
    width: int | None = None
    height: int | None = None
    preview_every: int | None = None  # every k-th progress event carries a PNG preview
