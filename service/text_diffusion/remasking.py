"""Which masked positions a denoising step reveals, and with which tokens.

A generation of ``length`` masked positions runs ``steps`` steps. With ``block_length`` the positions are cut into
consecutive blocks that are decoded one after another (semi-autoregressive, as in LLaDA): the steps are shared out
evenly between the blocks (the first blocks get one more when they don't divide), and within a block every step
reveals the same number of positions, up to one (the earlier steps take the remainder). Without ``block_length``
the whole generation is one block, which is the linear schedule: about ``length / steps`` positions per step.

Per step, the block's still-masked positions get a token sampled from the model's prediction (temperature, top-k,
top-p; temperature 0 is argmax), and the rule picks which of them to keep: ``random`` (uniformly) or
``low_confidence`` (LLaDA: keep the most confident predictions, i.e. remask the low-confidence ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

REMASKING_RULES = ("random", "low_confidence")


@dataclass(frozen=True)
class StepPlan:
    """One step: reveal ``count`` positions among the masked ones in ``[block_start, block_end)`` of the generation."""

    block_start: int
    block_end: int
    count: int


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = argmax
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


def block_count(length: int, block_length: int | None) -> int:
    if block_length is None or block_length >= length:
        return 1
    if block_length < 1:
        raise ValueError("block_length must be >= 1")
    return -(-length // block_length)


def plan_steps(length: int, steps: int, block_length: int | None = None) -> list[StepPlan]:
    """The whole schedule, one StepPlan per step; the counts add up to ``length``.

    Raises ValueError when ``steps`` < 1, ``length`` < 1, or there are fewer steps than blocks.
    """
    if length < 1:
        raise ValueError("length must be >= 1")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    blocks = block_count(length, block_length)
    if steps < blocks:
        raise ValueError(f"steps ({steps}) must be at least the number of blocks ({blocks}: "
                         f"{length} positions in blocks of {block_length})")
    size = length if blocks == 1 else int(block_length)  # type: ignore[arg-type]
    plans: list[StepPlan] = []
    for block in range(blocks):
        start, end = block * size, min(length, (block + 1) * size)
        block_steps = steps // blocks + (1 if block < steps % blocks else 0)
        positions = end - start
        for step in range(block_steps):
            count = positions // block_steps + (1 if step < positions % block_steps else 0)
            plans.append(StepPlan(start, end, count))
    return plans


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` [n, V] with everything outside the top-k / nucleus set to -inf (at least one token kept)."""
    if top_k and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probabilities = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probabilities.cumsum(dim=-1) - sorted_probabilities
        remove_sorted = mass_before > top_p
        remove_sorted[:, 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, sampling: SamplingParams,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled tokens [n] and their probabilities [n] (the confidence) under the filtered, tempered distribution."""
    logits = logits.float()
    if sampling.temperature == 0:
        probabilities = logits.softmax(dim=-1)
        confidence, tokens = probabilities.max(dim=-1)
        return tokens, confidence
    probabilities = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p).softmax(dim=-1)
    # Inverse-CDF sampling: one uniform per row (torch.multinomial is ~10x slower on [n, vocab] rows on CPU).
    # right=True never lands on a zero-probability token: its CDF value equals its predecessor's.
    cumulative = probabilities.cumsum(dim=-1)
    uniforms = torch.rand(len(probabilities), 1, generator=generator, device=generator.device).to(logits.device)
    tokens = torch.searchsorted(cumulative, uniforms * cumulative[:, -1:], right=True).squeeze(-1)
    tokens = tokens.clamp(max=probabilities.shape[-1] - 1)
    return tokens, probabilities.gather(-1, tokens[:, None]).squeeze(-1)


def choose_positions(rule: str, confidence: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Indices (into the candidates) of the ``count`` candidates to reveal, ascending.

    ``low_confidence`` keeps the highest-confidence candidates (ties go to the earlier position); ``random`` picks
    uniformly with ``generator``.
    """
    if rule not in REMASKING_RULES:
        raise ValueError(f"unknown remasking rule {rule!r} (known: {', '.join(REMASKING_RULES)})")
    candidates = confidence.shape[0]
    count = min(count, candidates)
    if rule == "random":
        scores = torch.rand(candidates, generator=generator, device=generator.device).to(confidence.device)
    else:
        scores = confidence
    # A stable descending sort makes ties deterministic (earlier position first), unlike topk.
    order = torch.sort(scores, descending=True, stable=True).indices[:count]
    return torch.sort(order).values
