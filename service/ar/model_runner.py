"""Owns the model and the physical KV pool; turns a scheduled batch into logits."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from service.ar.cuda_graphs import DecodeGraphs
from service.ar.models.attention import AttentionBackendSetting, SequenceSlice, build_forward_batch, \
    resolve_attention_backend
from service.ar.models.base import CausalLM
from service.ar.models.flex_attention import flex_block_size_problem
from service.ar.models.layers import can_prepack_linears, prepack_linears
from service.ar.sequence import Sequence

logger = logging.getLogger(__name__)


@dataclass
class StepLogits:
    # logits [S, V] float32 for the entries that reach their last token this step
    sample_logits: torch.Tensor | None
    sample_entries: list[int]  # entry index for each row of sample_logits
    # entry index -> log-probabilities of the prompt tokens this chunk predicts
    prompt_logprobs: dict[int, list[float]]


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype, attention_backend: AttentionBackendSetting = "torch",
                 cuda_graphs: bool = False, max_batch_size: int = 1, max_model_len: int = 1,
                 prepack_cpu_weights: bool = False) -> None:
        """``num_blocks`` are the KV-cache manager's blocks; CUDA graphs add one scratch block after them."""
        self.model = model
        self.prepacked_linears = prepack_linears(model) if prepack_cpu_weights and can_prepack_linears(device, dtype) \
            else 0
        self.block_size = block_size
        self.device = device
        self.attention_backend = resolve_attention_backend(attention_backend, device)
        problem = flex_block_size_problem(block_size, device) if self.attention_backend == "flex" else None
        if problem is not None and attention_backend == "flex":
            raise ValueError(problem)
        if problem is not None:
            logger.warning("%s; attention_backend auto falls back to torch", problem)
            self.attention_backend = "torch"
        use_graphs = cuda_graphs and device.type == "cuda"
        if use_graphs and self.attention_backend != "flex":
            logger.info("CUDA graphs need the flex attention backend; decoding eagerly")
            use_graphs = False
        self.num_pool_blocks = num_blocks + (1 if use_graphs else 0)
        num_slots = self.num_pool_blocks * block_size
        self.kv_caches = [
            (torch.zeros(model.num_kv_heads, num_slots, model.head_dim, dtype=dtype, device=device),
             torch.zeros(model.num_kv_heads, num_slots, model.head_dim, dtype=dtype, device=device))
            for _ in range(model.num_layers)
        ]
        self.decode_graphs: DecodeGraphs | None = None
        if use_graphs:
            max_blocks_per_sequence = min(num_blocks, -(-max_model_len // block_size))
            self.decode_graphs = DecodeGraphs(model, self.kv_caches, block_size, num_blocks, max_batch_size,
                                              max_blocks_per_sequence, device)
            self.decode_graphs.capture()

    @torch.inference_mode()
    def execute(self, entries: list[tuple[Sequence, int]]) -> StepLogits:
        slices = [
            SequenceSlice(seq.token_ids[seq.num_computed_tokens:seq.num_computed_tokens + num_new],
                          seq.num_computed_tokens, seq.block_table)
            for seq, num_new in entries
        ]
        if self.decode_graphs is not None and self.decode_graphs.fits([num_new for _, num_new in entries]):
            hidden = self.decode_graphs.run(slices)
            last_indices = list(range(len(entries)))
        else:
            batch = build_forward_batch(slices, self.block_size, self.device, self.attention_backend,
                                        self.num_pool_blocks)
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
