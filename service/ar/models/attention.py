"""Paged attention over a block pool, in plain torch.

The model runner flattens the new tokens of every scheduled sequence into one
packed batch of ``T`` tokens and describes it with a :class:`ForwardBatch`.
Each attention layer then

1. writes the new keys/values into the pool at ``slot_mapping`` and
2. attends, per sequence, over the keys gathered through its block table.

Sequences with one new token (decodes) are attended together, padded: one SDPA
call on CUDA, two batched matmuls on a CPU; each prefill chunk gets its own call with a causal mask offset by
the tokens it already has in the cache. The gather indices and masks are built
once per step and shared by all layers.

The "flex" backend (``flex_attention.py``) reads the pool in place instead of gathering it; this
file stays the reference and the CPU default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from service.ar.models.flex_attention import FlexAttentionMetadata, build_flex_metadata

AttentionBackendSetting = Literal["auto", "torch", "flex"]
AttentionBackend = Literal["torch", "flex"]


def resolve_attention_backend(setting: AttentionBackendSetting, device: torch.device) -> AttentionBackend:
    """auto = flex on CUDA (compiled kernels), torch elsewhere (uncompiled flex is slow on CPU)."""
    if setting == "auto":
        return "flex" if device.type == "cuda" else "torch"
    return setting


@dataclass(frozen=True)
class SequenceSlice:
    """The part of one sequence that a step computes."""

    new_token_ids: list[int]
    start_position: int  # tokens of this sequence already in the cache
    block_table: list[int]  # physical block ids, covering start_position + len(new_token_ids)


@dataclass
class PrefillAttention:
    query_start: int
    query_len: int
    kv_slots: torch.Tensor  # [context_len] flat slot ids
    mask: torch.Tensor  # [1, 1, query_len, context_len] bool, True = attend


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] flat slot for each new token's K/V
    num_decodes: int  # the first num_decodes tokens are one-token sequences
    decode_kv_blocks: torch.Tensor | None  # [num_decodes, max_blocks] block ids, padded with block 0
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_blocks * block_size]
    prefills: list[PrefillAttention]
    query_lens: list[int]  # per sequence, in batch order
    flex: FlexAttentionMetadata | None = None  # set: the flex backend, and the torch fields above are empty

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def last_token_indices(self) -> list[int]:
        """Index in the packed batch of each sequence's last new token."""
        indices, end = [], 0
        for query_len in self.query_lens:
            end += query_len
            indices.append(end - 1)
        return indices


def _slots_for(block_table: list[int], block_size: int, start: int, stop: int) -> list[int]:
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, stop)]


def build_forward_batch(
    slices: list[SequenceSlice], block_size: int, device: torch.device,
    attention_backend: AttentionBackend = "torch", num_pool_blocks: int = 0,
) -> ForwardBatch:
    """Pack ``slices`` into one batch. Decodes (one new token) must come first. The flex backend
    needs the pool's size in blocks (``num_pool_blocks``)."""
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    query_lens: list[int] = []
    num_decodes = 0
    for index, piece in enumerate(slices):
        query_len = len(piece.new_token_ids)
        if query_len == 1 and num_decodes == index:
            num_decodes += 1
        stop = piece.start_position + query_len
        input_ids.extend(piece.new_token_ids)
        positions.extend(range(piece.start_position, stop))
        slot_mapping.extend(_slots_for(piece.block_table, block_size, piece.start_position, stop))
        query_lens.append(query_len)

    if attention_backend == "flex":
        flex = build_flex_metadata([piece.block_table for piece in slices], [piece.start_position for piece in slices],
                                   query_lens, num_decodes, block_size, num_pool_blocks, device)
        return ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
            num_decodes=num_decodes, decode_kv_blocks=None, decode_mask=None, prefills=[], query_lens=query_lens,
            flex=flex)

    decode_kv_blocks = decode_mask = None
    if num_decodes:
        # Whole blocks, not slots: a block's slots are adjacent in the pool, so the gather copies
        # block_size x head_dim runs instead of head_dim rows (cold in cache each step: 1.5x faster,
        # 25 -> 20 ms per 108 M decode step at 16 sequences).
        context_lens = [slices[i].start_position + 1 for i in range(num_decodes)]
        blocks_used = [-(-length // block_size) for length in context_lens]
        max_blocks = max(blocks_used)
        padded = [slices[i].block_table[:blocks_used[i]] + [0] * (max_blocks - blocks_used[i])
                  for i in range(num_decodes)]
        decode_kv_blocks = torch.tensor(padded, dtype=torch.long, device=device)
        lens = torch.tensor(context_lens, device=device)
        decode_mask = (torch.arange(max_blocks * block_size, device=device)[None, :] < lens[:, None])
        decode_mask = decode_mask[:, None, None, :]

    prefills: list[PrefillAttention] = []
    query_start = num_decodes
    for piece in slices[num_decodes:]:
        query_len = len(piece.new_token_ids)
        context_len = piece.start_position + query_len
        kv_slots = torch.tensor(
            _slots_for(piece.block_table, block_size, 0, context_len), dtype=torch.long, device=device
        )
        query_positions = torch.arange(piece.start_position, context_len, device=device)
        key_positions = torch.arange(context_len, device=device)
        mask = (key_positions[None, :] <= query_positions[:, None])[None, None]
        prefills.append(PrefillAttention(query_start, query_len, kv_slots, mask))
        query_start += query_len

    return ForwardBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
        num_decodes=num_decodes,
        decode_kv_blocks=decode_kv_blocks,
        decode_mask=decode_mask,
        prefills=prefills,
        query_lens=query_lens,
    )


def paged_attention(
    query: torch.Tensor,  # [T, heads, head_dim]
    key: torch.Tensor,  # [T, kv_heads, head_dim]
    value: torch.Tensor,  # [T, kv_heads, head_dim]
    key_cache: torch.Tensor,  # [kv_heads, num_slots, head_dim]
    value_cache: torch.Tensor,  # [kv_heads, num_slots, head_dim]
    batch: ForwardBatch,
    scale: float,
) -> torch.Tensor:
    """Store this step's keys/values in the pool, then attend. Returns [T, heads, head_dim]."""
    key_cache.index_copy_(1, batch.slot_mapping, key.transpose(0, 1).to(key_cache.dtype))
    value_cache.index_copy_(1, batch.slot_mapping, value.transpose(0, 1).to(value_cache.dtype))
    if batch.flex is not None:
        return batch.flex.attend(query, key_cache, value_cache, scale)
    gqa = query.shape[1] != key.shape[1]
    output = torch.empty_like(query)

    if batch.num_decodes:
        assert batch.decode_kv_blocks is not None and batch.decode_mask is not None
        n, max_blocks = batch.decode_kv_blocks.shape
        max_context = batch.decode_mask.shape[-1]
        flat_blocks = batch.decode_kv_blocks.reshape(-1)
        kv_heads, num_slots, head_dim = key_cache.shape
        block_size = max_context // max_blocks
        pool_shape = (kv_heads, num_slots // block_size, block_size, head_dim)
        # index_select, not key_cache[blocks]: on a CPU the advanced-indexing gather is ~8x slower
        keys = key_cache.view(pool_shape).index_select(1, flat_blocks).view(kv_heads, n, max_context, head_dim)
        values = value_cache.view(pool_shape).index_select(1, flat_blocks).view(kv_heads, n, max_context, head_dim)
        if query.device.type == "cpu":
            output[:n] = _decode_attention_matmul(query[:n], keys, values, batch.decode_mask, scale)
        else:
            output[:n] = F.scaled_dot_product_attention(
                query[:n].unsqueeze(2), keys.transpose(0, 1), values.transpose(0, 1),
                attn_mask=batch.decode_mask, scale=scale, enable_gqa=gqa,
            ).squeeze(2)

    for prefill in batch.prefills:
        start, stop = prefill.query_start, prefill.query_start + prefill.query_len
        keys = key_cache.index_select(1, prefill.kv_slots)[None]  # [1, kv_heads, ctx, d]
        values = value_cache.index_select(1, prefill.kv_slots)[None]
        output[start:stop] = F.scaled_dot_product_attention(
            query[start:stop].transpose(0, 1)[None], keys, values,
            attn_mask=prefill.mask, scale=scale, enable_gqa=gqa,
        )[0].transpose(0, 1)
    return output


def _decode_attention_matmul(
    query: torch.Tensor,  # [n, heads, head_dim]
    keys: torch.Tensor,  # [kv_heads, n, context, head_dim]
    values: torch.Tensor,  # [kv_heads, n, context, head_dim]
    mask: torch.Tensor,  # [n, 1, 1, context] bool, True = attend
    scale: float,
) -> torch.Tensor:
    """One-token queries as two small batched matmuls, each KV head's query group together.

    On a CPU this is 2-4x faster than SDPA's flash kernel, which is built for long queries. The
    matmuls run in the cache's dtype (bfloat16 batched matmuls are several times faster than float32
    ones on a CPU with AMX/AVX512-BF16); the softmax runs in float32.
    """
    n, heads, head_dim = query.shape
    kv_heads = keys.shape[0]
    grouped_query = query.reshape(n, kv_heads, heads // kv_heads, head_dim).transpose(0, 1).to(keys.dtype)
    scores = torch.matmul(grouped_query, keys.transpose(-1, -2)).float().mul_(scale)  # [kv, n, group, ctx]
    scores.masked_fill_(~mask.view(1, n, 1, -1), float("-inf"))
    attended = torch.matmul(scores.softmax(dim=-1).to(values.dtype), values)  # [kv, n, group, d]
    return attended.transpose(0, 1).reshape(n, heads, head_dim).to(query.dtype)
