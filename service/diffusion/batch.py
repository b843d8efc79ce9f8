"""One denoise step for a group of rows whose latents have the same shape: one network forward.

The forward batch is ``[every row, conditional] + [an unconditional copy of each guided row]``,
so classifier-free guidance doubles only the rows that use it. Each row brings its own timestep,
sampler (kind, position, eta, generator) and guidance scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from service.diffusion.job import ImageJob, ImageRow
from service.diffusion.pipelines import DenoisingPipeline


@dataclass(frozen=True)
class GroupStep:
    """What one group's step computed: each row's x0 estimate feeds the previews."""

    pred_original_sample: torch.Tensor  # (B, ...) float32


def _cat_or_none(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    if all(tensor is None for tensor in tensors):
        return None
    if any(tensor is None for tensor in tensors):
        raise ValueError("rows of one forward must all be conditioned or all unconditioned")
    return torch.cat(tensors)  # type: ignore[arg-type]


def denoise_group(pipeline: DenoisingPipeline, members: Sequence[tuple[ImageJob, ImageRow]],
                  device: torch.device, dtype: torch.dtype) -> GroupStep:
    """Advance every row of ``members`` by one step, in place (``row.latents``, ``row.state``)."""
    schedule = pipeline.schedule
    states = [row.state for _, row in members]
    rows = schedule.gather_rows(states, device)
    sample = torch.cat([row.latents for _, row in members])
    model_input = schedule.scale_model_input(sample, rows)
    timesteps = rows.timestep
    conditionings = [job.conditioning for job, _ in members]
    assert all(conditioning is not None for conditioning in conditionings)
    cond = _cat_or_none([c.cond for c in conditionings])  # type: ignore[union-attr]

    guided_positions = [i for i, (job, _) in enumerate(members) if job.guidance_scale is not None]
    if guided_positions:
        guided_index = torch.tensor(guided_positions, dtype=torch.int64, device=device)
        model_input = torch.cat([model_input, model_input.index_select(0, guided_index)])
        timesteps = torch.cat([timesteps, timesteps.index_select(0, guided_index)])
        uncond = _cat_or_none([conditionings[i].uncond for i in guided_positions])  # type: ignore[union-attr]
        cond = torch.cat([cond, uncond]) if cond is not None and uncond is not None else cond

    output = pipeline.predict(model_input.to(dtype), timesteps, cond).float()
    batch_size = len(members)
    guided_output = output[:batch_size]
    if guided_positions:
        scales = torch.tensor([members[i][0].guidance_scale for i in guided_positions], dtype=torch.float32,
                              device=device).view(-1, *([1] * (output.dim() - 1)))
        unconditional = output[batch_size:]
        conditional = guided_output.index_select(0, guided_index)
        guided_output = guided_output.index_copy(
            0, guided_index, unconditional + scales * (conditional - unconditional))

    stepped = schedule.step_rows(guided_output, sample, rows)
    schedule.advance(states)
    for position, (_, row) in enumerate(members):
        row.latents = stepped.prev_sample[position:position + 1]
    return GroupStep(stepped.pred_original_sample)
