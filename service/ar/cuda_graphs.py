"""Decode steps replayed as CUDA graphs (CUDA and the flex attention backend only).

A pure-decode step (every sequence computes one token) costs a few hundred small kernel launches,
which on a GPU take longer than the kernels themselves at small batch. At load, the model's decode
forward is captured once per batch size in ``capture_sizes`` over static input buffers: token ids,
positions, KV slots and the attention mask's inputs (block tables, query positions), so the block
tables are graph inputs and not baked in. A step whose batch fits a captured size copies its inputs
into the buffers, pads the rest of the rows and replays the smallest graph that holds it. Padding rows
write their K/V into a scratch block at the end of the pool and attend only to it, so they never touch
a real sequence. Prefill, mixed and larger steps run eagerly.
"""

from __future__ import annotations

import logging

import torch

from service.ar.models.attention import ForwardBatch, SequenceSlice
from service.ar.models.base import CausalLM, KVCache
from service.ar.models.flex_attention import (
    FlexAttentionMetadata, PoolMaskInputs, decode_batch_bucket, decode_mask_tensors)

logger = logging.getLogger(__name__)


def capture_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to the bucket that holds ``max_batch_size`` (the flex decode kernels' sizes too)."""
    sizes = [1]
    while sizes[-1] < decode_batch_bucket(max_batch_size):
        sizes.append(sizes[-1] * 2)
    return sizes


class DecodeGraphs:
    def __init__(self, model: CausalLM, kv_caches: list[KVCache], block_size: int, scratch_block: int,
                 max_batch_size: int, max_blocks_per_sequence: int, device: torch.device) -> None:
        """``scratch_block`` is the pool's last block, outside the KV-cache manager's blocks."""
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.num_pool_blocks = scratch_block + 1
        self.table_width = max_blocks_per_sequence
        self.device = device
        self.sizes = capture_sizes(max_batch_size)
        largest = self.sizes[-1]
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(largest, dtype=torch.long, device=device)
        self.mask_inputs = PoolMaskInputs(largest, 1, max_blocks_per_sequence, self.num_pool_blocks, block_size,
                                          device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}  # each graph's hidden states [size, hidden]
        self.replays = 0  # steps served by a graph
        # the CUDA kernels are compiled; False runs the same static batches uncompiled (CPU tests)
        self.compile_attention = device.type == "cuda"

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    def fits(self, query_lens: list[int]) -> bool:
        """A pure-decode step that a captured graph holds."""
        return bool(self._graphs) and len(query_lens) <= self.max_batch_size and all(n == 1 for n in query_lens)

    def _static_batch(self, size: int) -> ForwardBatch:
        flex = FlexAttentionMetadata(num_decodes=size, decode_rows=size, decode_mask=self.mask_inputs.block_mask(size),
                                     prefill=None, compiled=self.compile_attention)
        return ForwardBatch(input_ids=self.input_ids[:size], positions=self.positions[:size],
                            slot_mapping=self.slot_mapping[:size], num_decodes=size, decode_kv_blocks=None,
                            decode_mask=None, prefills=[], query_lens=[1] * size, flex=flex)

    def _fill(self, slices: list[SequenceSlice], size: int) -> None:
        # Padding rows are one-token sequences in the scratch block: they write and read only it, and
        # no row is fully masked, so nothing non-finite can arise there.
        padded = slices + [SequenceSlice([0], 0, [self.scratch_block])] * (size - len(slices))
        positions = [piece.start_position for piece in padded]
        slots = [piece.block_table[p // self.block_size] * self.block_size + p % self.block_size
                 for piece, p in zip(padded, positions)]
        host = torch.tensor([[piece.new_token_ids[0] for piece in padded], positions, slots], dtype=torch.long)
        self.input_ids[:size].copy_(host[0], non_blocking=True)
        self.positions[:size].copy_(host[1], non_blocking=True)
        self.slot_mapping[:size].copy_(host[2], non_blocking=True)
        tensors = decode_mask_tensors([piece.block_table for piece in padded], positions, size, self.table_width,
                                      self.block_size, self.num_pool_blocks)
        self.mask_inputs.fill(*(tensor.to(self.device, non_blocking=True) for tensor in tensors))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, into one memory pool (a step replays one graph at a time)."""
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            self._fill([], size)  # all rows padding: capture writes only the scratch block
            batch = self._static_batch(size)
            # run on a side stream first: compiles this size's kernels and settles the allocator
            side_stream = torch.cuda.Stream()
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream):
                for _ in range(2):
                    self.model.forward(batch, self.kv_caches)
            torch.cuda.current_stream().wait_stream(side_stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[size] = self.model.forward(batch, self.kv_caches)
            self._graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def run_uncaptured(self, slices: list[SequenceSlice]) -> torch.Tensor:
        """What a replay computes, from the same buffers, without a graph (for tests, also on the CPU)."""
        size = next(size for size in self.sizes if size >= len(slices))
        self._fill(slices, size)
        return self.model.forward(self._static_batch(size), self.kv_caches)[:len(slices)]

    def run(self, slices: list[SequenceSlice]) -> torch.Tensor:
        """Hidden states [len(slices), hidden] of a pure-decode step; valid until the next replay."""
        size = next(size for size in self.sizes if size >= len(slices))
        self._fill(slices, size)
        self._graphs[size].replay()
        self.replays += 1
        return self._outputs[size][:len(slices)]
