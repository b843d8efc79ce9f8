"""Owns the model and the physical KV pool; turns a scheduled batch into logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.ar.models.attention import SequenceSlice, build_forward_batch
from service.ar.models.base import CausalLM
from service.ar.sequence import Sequence


@dataclass
class StepLogits:
    # logits [S, V] float32 for the entries that reach their last token this step
    sample_logits: torch.Tensor | None
    sample_entries: list[int]  # entry index for each row of sample_logits
    # entry index -> log-probabilities of the prompt tokens this chunk predicts
    prompt_logprobs: dict[int, list[float]]


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        num_slots = num_blocks * block_size
        self.kv_caches = [
            (torch.zeros(num_slots, model.num_kv_heads, model.head_dim, dtype=dtype, device=device),
             torch.zeros(num_slots, model.num_kv_heads, model.head_dim, dtype=dtype, device=device))
            for _ in range(model.num_layers)
        ]

    @torch.inference_mode()
    def execute(self, entries: list[tuple[Sequence, int]]) -> StepLogits:
        slices = [
            SequenceSlice(seq.token_ids[seq.num_computed_tokens:seq.num_computed_tokens + num_new],
                          seq.num_computed_tokens, seq.block_table)
            for seq, num_new in entries
        ]
        batch = build_forward_batch(slices, self.block_size, self.device)
        hidden = self.model.forward(batch, self.kv_caches)

        last_indices = batch.last_token_indices()
        sample_entries = [
            index for index, (seq, num_new) in enumerate(entries)
            if seq.num_computed_tokens + num_new == seq.num_tokens
        ]
        sample_logits = None
        if sample_entries:
            rows = torch.tensor([last_indices[i] for i in sample_entries], device=self.device)
            sample_logits = self.model.compute_logits(hidden.index_select(0, rows))

        prompt_logprobs: dict[int, list[float]] = {}
        for index, (seq, num_new) in enumerate(entries):
            if not seq.params.prompt_logprobs:
                continue
            start = seq.num_computed_tokens
            # hidden at position p predicts token p + 1; keep those still inside the prompt
            stop = min(start + num_new, seq.num_prompt_tokens - 1)
            if stop <= start:
                continue
            first_row = last_indices[index] - num_new + 1
            logits = self.model.compute_logits(hidden[first_row:first_row + stop - start])
            targets = torch.tensor(seq.token_ids[start + 1:stop + 1], device=self.device)
            prompt_logprobs[index] = (
                logits.log_softmax(dim=-1).gather(1, targets[:, None]).squeeze(1).tolist()
            )
        return StepLogits(sample_logits, sample_entries, prompt_logprobs)
