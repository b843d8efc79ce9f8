"""Step-level batching of masked-diffusion generations: one forward per step for every job, whatever its step.

A job is a prompt (a fixed prefix) followed by ``max_tokens`` mask tokens, its own number of steps, remasking rule,
block length, sampling settings and random generator. ``denoise_step`` advances every unfinished job of a list by
one of its own steps with a single model forward over all of them (right padding plus a key-padding mask). Jobs
can be added to or dropped from the list between any two steps. Each job draws only from its own generator and
sees only its own rows, so its text for a given seed does not depend on the other jobs in the batch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from service.text_diffusion.model import MaskedDiffusionLM
from service.text_diffusion.remasking import (REMASKING_RULES, SamplingParams, StepPlan, choose_positions, plan_steps,
                                              sample_tokens)

MASK_PLACEHOLDER = "░"


@dataclass(eq=False)
class DenoiseJob:
    prompt_ids: list[int]
    max_tokens: int
    steps: int
    mask_token_id: int
    remasking: str
    block_length: int | None
    sampling: SamplingParams
    seed: int
    plan: list[StepPlan]
    tokens: torch.Tensor  # [len(prompt_ids) + max_tokens] on the model's device; masked positions hold mask_token_id
    generator: torch.Generator
    step_index: int = 0  # steps done so far
    revealed_last_step: list[int] = field(default_factory=list)  # generation offsets revealed by the latest step

    @classmethod
    def create(cls, prompt_ids: Sequence[int], max_tokens: int, steps: int, mask_token_id: int,
               remasking: str = "low_confidence", block_length: int | None = None,
               sampling: SamplingParams | None = None, seed: int | None = None,
               device: torch.device | str = "cpu", max_positions: int | None = None) -> DenoiseJob:
        """A fresh job; raises ValueError on bad settings (steps < 1, fewer steps than blocks, unknown rule, a
        prompt plus ``max_tokens`` longer than ``max_positions``, the model's ``max_position_embeddings``)."""
        if max_positions is not None and len(prompt_ids) + max_tokens > max_positions:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                             f"{max_positions} positions")
        if remasking not in REMASKING_RULES:
            raise ValueError(f"unknown remasking rule {remasking!r} (known: {', '.join(REMASKING_RULES)})")
        if mask_token_id in prompt_ids:
            raise ValueError("the prompt contains the mask token")
        plan = plan_steps(max_tokens, steps, block_length)
        device = torch.device(device)
        if seed is None:
            seed = random.SystemRandom().randrange(2**63)
        tokens = torch.tensor([*prompt_ids, *([mask_token_id] * max_tokens)], dtype=torch.long, device=device)
        return cls(list(prompt_ids), max_tokens, steps, mask_token_id, remasking, block_length,
                   sampling or SamplingParams(), seed, plan, tokens,
                   torch.Generator(device=device).manual_seed(seed))

    @property
    def length(self) -> int:
        return self.tokens.shape[0]

    @property
    def finished(self) -> bool:
        return self.step_index >= self.steps

    @property
    def generated_ids(self) -> torch.Tensor:
        """The generation part of the sequence (mask_token_id where still masked)."""
        return self.tokens[len(self.prompt_ids):]

    @property
    def masked_count(self) -> int:
        return int((self.generated_ids == self.mask_token_id).sum())

    def candidate_offsets(self) -> torch.Tensor:
        """Generation offsets still masked inside the current step's block."""
        plan = self.plan[self.step_index]
        block = self.generated_ids[plan.block_start:plan.block_end]
        return (block == self.mask_token_id).nonzero().squeeze(-1) + plan.block_start


@torch.inference_mode()
def denoise_step(model: MaskedDiffusionLM, jobs: Sequence[DenoiseJob], pad_token_id: int = 0) -> None:
    """Advance every unfinished job in ``jobs`` by one of its steps, with one forward for all that need one.

    A job whose step reveals no position (more steps than masked positions in its block) advances without a row.
    """
    active = [job for job in jobs if not job.finished]
    working: list[tuple[DenoiseJob, torch.Tensor, int]] = []
    for job in active:
        count = job.plan[job.step_index].count
        candidates = job.candidate_offsets()
        if count > 0 and len(candidates) > 0:
            working.append((job, candidates, count))
        else:
            job.revealed_last_step = []
    if working:
        device = working[0][0].tokens.device
        longest = max(job.length for job, _, _ in working)
        input_ids = torch.full((len(working), longest), pad_token_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros((len(working), longest), dtype=torch.bool, device=device)
        for row, (job, _, _) in enumerate(working):
            input_ids[row, :job.length] = job.tokens
            attention_mask[row, :job.length] = True
        needs_mask = any(job.length < longest for job, _, _ in working)
        hidden = model.hidden_states(input_ids, attention_mask if needs_mask else None)
        rows = torch.cat([torch.full_like(candidates, row) for row, (_, candidates, _) in enumerate(working)])
        columns = torch.cat([candidates + len(job.prompt_ids) for job, candidates, _ in working])
        logits = model.logits_from_hidden(hidden[rows, columns]).float()
        logits[:, model.config.mask_token_id] = float("-inf")
        start = 0
        for job, candidates, count in working:
            job_logits = logits[start:start + len(candidates)]
            start += len(candidates)
            tokens, confidence = sample_tokens(job_logits, job.sampling, job.generator)
            chosen = choose_positions(job.remasking, confidence, count, job.generator)
            offsets = candidates[chosen]
            job.tokens[offsets + len(job.prompt_ids)] = tokens[chosen]
            job.revealed_last_step = offsets.tolist()
    for job in active:
        job.step_index += 1


def run_to_completion(model: MaskedDiffusionLM, jobs: Sequence[DenoiseJob], pad_token_id: int = 0) -> None:
    """Step ``jobs`` together until all are finished (a convenience for tests, evaluations and benchmarks)."""
    while any(not job.finished for job in jobs):
        denoise_step(model, jobs, pad_token_id)


def final_token_ids(job: DenoiseJob, eos_token_id: int) -> tuple[list[int], str]:
    """The generated ids up to (not including) the first eos, and the finish reason: ``stop`` (eos) or ``length``."""
    ids = job.generated_ids.tolist()
    if eos_token_id in ids:
        return ids[:ids.index(eos_token_id)], "stop"
    return ids, "length"


def render_text(job: DenoiseJob, tokenizer: Tokenizer, placeholder: str = MASK_PLACEHOLDER,
                include_prompt: bool = False) -> str:
    """The generation as text, each still-masked position shown as ``placeholder`` (special tokens are dropped).

    Runs of revealed tokens are decoded together; a multi-byte character cut by a masked position shows as U+FFFD.
    """
    pieces: list[str] = []
    if include_prompt:
        pieces.append(tokenizer.decode(job.prompt_ids, skip_special_tokens=True))
    run: list[int] = []
    for token in job.generated_ids.tolist():
        if token == job.mask_token_id:
            if run:
                pieces.append(tokenizer.decode(run, skip_special_tokens=True))
                run = []
            pieces.append(placeholder)
        else:
            run.append(token)
    if run:
        pieces.append(tokenizer.decode(run, skip_special_tokens=True))
    return "".join(pieces)
