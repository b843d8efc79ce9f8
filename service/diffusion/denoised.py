"""The model's current estimate of the clean sample (x0) for some rows of a step, for previews.

Every row uses its own sampler's parameterisation: DDIM/DDPM rows read alpha_prod_t, Euler rows
sigma (the other fields hold harmless fillers of 1.0, so both branches stay finite).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from service.diffusion.schedulers import BatchRows, NoiseSchedule, SamplerKind


def _column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def predicted_clean_sample(schedule: NoiseSchedule, model_output: torch.Tensor, sample: torch.Tensor,
                           rows: BatchRows, positions: Sequence[int]) -> torch.Tensor:
    """x0 for the rows at ``positions`` (in that order), from the step's input sample and guided output."""
    index = torch.tensor(list(positions), dtype=torch.int64, device=sample.device)
    output = model_output.index_select(0, index).float()
    current = sample.index_select(0, index).float()
    if schedule.prediction_type == "sample":
        return output
    is_euler = torch.tensor([rows.kinds[p] is SamplerKind.EULER for p in positions], device=sample.device)
    alpha = _column(rows.alpha_prod_t.index_select(0, index), current)
    sigma = _column(rows.sigma.index_select(0, index), current)
    if schedule.prediction_type == "epsilon":
        discrete = (current - (1 - alpha) ** 0.5 * output) / alpha**0.5
        euler = current - sigma * output
    else:  # v_prediction
        discrete = alpha**0.5 * current - (1 - alpha) ** 0.5 * output
        euler = output * (-sigma / (sigma**2 + 1) ** 0.5) + current / (sigma**2 + 1)
    return torch.where(_column(is_euler, current), euler, discrete)
