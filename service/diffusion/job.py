"""One diffusion request inside the engine: its rows (one per image) and where they are."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from service.diffusion.pipelines import Conditioning, PreparedPrompt
from service.diffusion.schedulers import SamplerKind, SamplerState


@dataclass(eq=False)
class ImageRow:
    """One image: its own generator (in ``state``) and its latents, (1, C, h, w) float32 on the device."""

    seed: int
    state: SamplerState
    latents: torch.Tensor


@dataclass(eq=False)
class ImageJob:
    request_id: str
    prompt: PreparedPrompt
    sampler: SamplerKind
    steps: int
    eta: float
    guidance_scale: float | None  # None: not guided (no unconditional half)
    seeds: tuple[int, ...]
    width: int
    height: int
    latent_shape: tuple[int, ...]
    preview_every: int | None
    rows: list[ImageRow] = field(default_factory=list)  # filled when the job joins the batch
    conditioning: Conditioning | None = None
    finished: bool = False

    @property
    def cost(self) -> int:
        """UNet rows this job adds to every step: one per image, two with guidance."""
        return len(self.seeds) * (2 if self.guidance_scale is not None else 1)

    @property
    def steps_done(self) -> int:
        # the rows of a job join together and advance together
        return self.rows[0].state.step_index if self.rows else 0

    @property
    def running(self) -> bool:
        return bool(self.rows)

    def wants_preview(self) -> bool:
        return self.preview_every is not None and self.steps_done % self.preview_every == 0
