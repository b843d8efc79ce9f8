"""The linear masking schedule and the continuous-time masked-diffusion ELBO.

Forward process: at time t in (0, 1] every token is replaced by the mask token independently with probability
t (alpha_t = 1 - t, the linear schedule). For that schedule the negative ELBO of a sequence x is

    E_{t ~ U(0, 1]} E_{x_t ~ q(.|x, t)} [ (1 / t) * sum_{i masked in x_t} -log p_theta(x_i | x_t) ]

an upper bound on -log p(x) in nats. Estimates here draw t stratified over (0, 1] (one draw in each of n equal
strata), which keeps the estimate unbiased and lowers its variance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
import math

import torch
import torch.nn.functional as F

from service.text_diffusion.model import MaskedDiffusionLM

MINIMUM_MASK_PROBABILITY = 1e-3  # t is kept above this so the 1/t weight stays bounded


def mask_probability(t: torch.Tensor) -> torch.Tensor:
    """Linear schedule: the probability that a token is masked at time t (1 - alpha_t)."""
    return t


def elbo_weight(t: torch.Tensor) -> torch.Tensor:
    """The weight of a masked position's cross-entropy at time t: -alpha'_t / (1 - alpha_t) = 1 / t."""
    return 1.0 / t


def stratified_times(count: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """``count`` times in [MINIMUM, 1]: one uniform draw in each of ``count`` equal strata of (0, 1]."""
    offsets = torch.rand(count, generator=generator)
    times = (torch.arange(count, dtype=torch.float64) + offsets.double()) / count
    return times.clamp(min=MINIMUM_MASK_PROBABILITY).float().to(device)


def mask_tokens(token_ids: torch.Tensor, times: torch.Tensor, mask_token_id: int, generator: torch.Generator,
                maskable: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each token of ``token_ids`` [B, T] with probability ``times`` [B] (per row).

    ``maskable`` [B, T] (bool) restricts masking to some positions (context tokens and padding stay).
    Returns (noisy ids, masked positions) both [B, T].
    """
    draws = torch.rand(token_ids.shape, generator=generator).to(token_ids.device)
    masked = draws < mask_probability(times)[:, None]
    if maskable is not None:
        masked &= maskable
    return torch.where(masked, torch.full_like(token_ids, mask_token_id), token_ids), masked


def masked_diffusion_loss(model: MaskedDiffusionLM, token_ids: torch.Tensor, times: torch.Tensor,
                          generator: torch.Generator, maskable: torch.Tensor | None = None,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row negative ELBO sample [B] in nats: (1/t) * sum of the masked positions' cross-entropies.

    The output projection runs on masked positions only (most of the vocabulary-sized work).
    """
    noisy, masked = mask_tokens(token_ids, times, model.config.mask_token_id, generator, maskable)
    hidden = model.hidden_states(noisy, attention_mask)
    logits = model.logits_from_hidden(hidden[masked]).float()
    cross_entropies = F.cross_entropy(logits, token_ids[masked], reduction="none")
    row_of_masked = masked.nonzero()[:, 0]
    per_row = torch.zeros(token_ids.shape[0], device=token_ids.device).index_add(0, row_of_masked, cross_entropies)
    return per_row * elbo_weight(times)


@dataclass(frozen=True)
class ElboEstimate:
    """A Monte-Carlo estimate of the negative ELBO: an upper bound on the negative log-likelihood, not a logprob."""

    nats: float  # negative ELBO of the scored tokens, in nats
    standard_error_nats: float  # of the estimate, from the spread between samples
    tokens: int  # tokens scored
    characters: int  # characters of the scored text (0 when unknown)
    samples: int

    @property
    def bits_per_character(self) -> float:
        return self.nats / math.log(2) / self.characters if self.characters else math.nan

    @property
    def nats_per_token(self) -> float:
        return self.nats / self.tokens if self.tokens else math.nan


@torch.no_grad()
def estimate_elbo(model: MaskedDiffusionLM, token_ids: Sequence[int], samples: int, seed: int,
                  context_ids: Sequence[int] = (), characters: int = 0, batch_size: int = 32) -> ElboEstimate:
    """The negative ELBO of ``token_ids`` given an unmasked ``context_ids`` prefix (context is not scored).

    ``samples`` masked copies of the sequence, with stratified times, seeded by ``seed`` (same seed, same estimate).
    """
    if samples < 1:
        raise ValueError("samples must be >= 1")
    if not token_ids:
        return ElboEstimate(0.0, 0.0, 0, characters, samples)
    device = model.embed_tokens.weight.device
    generator = torch.Generator().manual_seed(seed)
    sequence = torch.tensor([*context_ids, *token_ids], dtype=torch.long, device=device)
    maskable = torch.zeros(len(sequence), dtype=torch.bool, device=device)
    maskable[len(context_ids):] = True
    times = stratified_times(samples, generator, device)
    losses: list[torch.Tensor] = []
    for batch_times in times.split(batch_size):
        rows = len(batch_times)
        losses.append(masked_diffusion_loss(model, sequence.expand(rows, -1), batch_times, generator,
                                            maskable.expand(rows, -1)))
    per_sample = torch.cat(losses).double()
    error = float(per_sample.std() / math.sqrt(samples)) if samples > 1 else math.nan
    return ElboEstimate(float(per_sample.mean()), error, len(token_ids), characters, samples)
