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

from dataclasses import dataclass, field
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
class FreshPrefills:
    """Prompts whose first chunk this step computes: nothing of theirs is in the pool yet, so they attend
    over this step's own keys and values, padded to the longest and in one call, with no gather."""

    prompts: int
    longest: int  # padded length; padding goes at the end, so causal attention keeps real tokens off it
    token_index: torch.Tensor  # [prompts * longest] packed-batch row of each padded position (padding: the first)
    rows: torch.Tensor  # [real tokens] rows of the padded [prompts * longest] result that are real tokens
    destinations: torch.Tensor  # [real tokens] their rows in the packed batch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] flat slot for each new token's K/V
    num_decodes: int  # the first num_decodes tokens are one-token sequences
    decode_kv_blocks: torch.Tensor | None  # [num_decodes, max_blocks] block ids, padded with block 0
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_blocks * block_size]
    prefills: list[PrefillAttention]  # chunks that continue a sequence already in the pool
    query_lens: list[int]  # per sequence, in batch order
    flex: FlexAttentionMetadata | None = None  # set: the flex backend, and the torch fields above are empty
    fresh_prefills: list[FreshPrefills] = field(default_factory=list)
    _decode_score_biases: dict[tuple[torch.dtype, int], torch.Tensor] = field(default_factory=dict, repr=False)
    _decode_pool_rows: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)

    def decode_pool_rows(self, kv_heads: int, pool_blocks: int) -> torch.Tensor:
        """The decodes' blocks as rows of the pool viewed [kv_heads * pool_blocks, block_size * head_dim],
        head-major: [kv_heads * num_decodes * max_blocks]. One ``index_select`` along dim 0 then gathers
        every head's context as whole contiguous blocks (dim 1 of the [kv_heads, blocks, ...] view copies
        element by element: 1.45x slower at a 108 M layer's 32 x 7 blocks). Built by the step's first layer."""
        key = (kv_heads, pool_blocks)
        rows = self._decode_pool_rows.get(key)
        if rows is None:
            assert self.decode_kv_blocks is not None
            blocks = self.decode_kv_blocks.reshape(1, -1)
            heads = torch.arange(kv_heads, device=blocks.device).unsqueeze(1)
            rows = (heads * pool_blocks + blocks).reshape(-1)
            self._decode_pool_rows[key] = rows
        return rows

    def decode_score_bias(self, dtype: torch.dtype, kv_heads: int) -> torch.Tensor:
        """``decode_mask`` as an additive score bias (0 or -inf), [kv_heads * num_decodes, 1, context] to
        broadcast over each KV head's query group; the step's first layer builds it, the others reuse it."""
        key = (dtype, kv_heads)
        bias = self._decode_score_biases.get(key)
        if bias is None:
            assert self.decode_mask is not None
            n, context = self.decode_mask.shape[0], self.decode_mask.shape[-1]
            bias = torch.zeros(n, 1, context, dtype=dtype, device=self.decode_mask.device)
            bias.masked_fill_(~self.decode_mask.view(n, 1, context), float("-inf"))
            bias = bias.unsqueeze(0).expand(kv_heads, n, 1, context).reshape(kv_heads * n, 1, context)
            self._decode_score_biases[key] = bias
        return bias

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
        # block_size x head_dim runs instead of head_dim rows (the pool is cold in cache at every layer:
        # a 108 M decode step at 16 sequences went from 26-35 to 21-23 ms).
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
    fresh: list[tuple[int, int]] = []  # (query_start, query_len) of first chunks
    query_start = num_decodes
    for piece in slices[num_decodes:]:
        query_len = len(piece.new_token_ids)
        context_len = piece.start_position + query_len
        if piece.start_position == 0:
            fresh.append((query_start, query_len))
            query_start += query_len
            continue
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
        fresh_prefills=_group_fresh_prefills(fresh, device),
    )


def _group_fresh_prefills(chunks: list[tuple[int, int]], device: torch.device) -> list[FreshPrefills]:
    """One padded group for all first chunks (one attention call per layer instead of one per prompt),
    unless padding would more than double the tokens attended: then one group per prompt."""
    if not chunks:
        return []
    longest = max(length for _, length in chunks)
    if len(chunks) > 1 and len(chunks) * longest > 2 * sum(length for _, length in chunks):
        return [group for chunk in chunks for group in _group_fresh_prefills([chunk], device)]
    token_index: list[int] = []
    rows: list[int] = []
    destinations: list[int] = []
    for number, (start, length) in enumerate(chunks):
        token_index.extend(range(start, start + length))
        token_index.extend([start] * (longest - length))
        rows.extend(range(number * longest, number * longest + length))
        destinations.extend(range(start, start + length))
    return [FreshPrefills(len(chunks), longest, torch.tensor(token_index, dtype=torch.long, device=device),
                          torch.tensor(rows, dtype=torch.long, device=device),
                          torch.tensor(destinations, dtype=torch.long, device=device))]


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
    if batch.num_decodes:
        assert batch.decode_kv_blocks is not None and batch.decode_mask is not None
        n, max_blocks = batch.decode_kv_blocks.shape
        max_context = batch.decode_mask.shape[-1]
        kv_heads, num_slots, head_dim = key_cache.shape
        block_size = max_context // max_blocks
        pool_blocks = num_slots // block_size
        rows = batch.decode_pool_rows(kv_heads, pool_blocks)
        pool_rows = (kv_heads * pool_blocks, block_size * head_dim)
        # index_select, not key_cache[rows]: on a CPU the advanced-indexing gather is ~8x slower
        keys = key_cache.view(pool_rows).index_select(0, rows).view(kv_heads, n, max_context, head_dim)
        values = value_cache.view(pool_rows).index_select(0, rows).view(kv_heads, n, max_context, head_dim)
        if query.device.type == "cpu":
            decoded = _decode_attention_matmul(query[:n], keys, values,
                                               batch.decode_score_bias(key_cache.dtype, kv_heads), scale)
        else:
            decoded = F.scaled_dot_product_attention(
                query[:n].unsqueeze(2), keys.transpose(0, 1), values.transpose(0, 1),
                attn_mask=batch.decode_mask, scale=scale, enable_gqa=gqa,
            ).squeeze(2)
        if n == query.shape[0]:  # decodes only (most steps): no output to assemble
            return decoded
    output = torch.empty_like(query)
    if batch.num_decodes:
        output[:batch.num_decodes] = decoded

    for group in batch.fresh_prefills:
        group_inputs = (_padded(query, group), _padded(key.to(key_cache.dtype), group),
                        _padded(value.to(value_cache.dtype), group))
        if query.device.type == "cpu" and group.longest <= SHORT_PROMPT_MATMUL_MAX_LEN:
            attended = _causal_attention_matmul(*group_inputs, scale)
        else:
            attended = F.scaled_dot_product_attention(*group_inputs, is_causal=True, scale=scale, enable_gqa=gqa)
        real = attended.transpose(1, 2).flatten(0, 1).index_select(0, group.rows)  # [real tokens, heads, d]
        output.index_copy_(0, group.destinations, real)

    for prefill in batch.prefills:
        start, stop = prefill.query_start, prefill.query_start + prefill.query_len
        keys = key_cache.index_select(1, prefill.kv_slots)[None]  # [1, kv_heads, ctx, d]
        values = value_cache.index_select(1, prefill.kv_slots)[None]
        output[start:stop] = F.scaled_dot_product_attention(
            query[start:stop].transpose(0, 1)[None], keys, values,
            attn_mask=prefill.mask, scale=scale, enable_gqa=gqa,
        )[0].transpose(0, 1)
    return output


def _padded(tensor: torch.Tensor, group: FreshPrefills) -> torch.Tensor:
    """Packed [T, heads, d] -> the group's padded [prompts, heads, longest, d]."""
    rows = tensor.index_select(0, group.token_index)
    return rows.view(group.prompts, group.longest, *tensor.shape[1:]).transpose(1, 2)


# On a CPU, SDPA's flash kernel is built for long sequences: over first chunks of up to this many tokens,
# two batched matmuls are faster (measured, bf16, 9/3 heads: 2.3x at 15 x 33 tokens, 1.6x at 4 x 128,
# even at 2 x 256, 3x slower at 1 x 512)
SHORT_PROMPT_MATMUL_MAX_LEN = 128


def _causal_attention_matmul(
    query: torch.Tensor,  # [P, heads, L, head_dim]
    keys: torch.Tensor,  # [P, kv_heads, L, head_dim]
    values: torch.Tensor,  # [P, kv_heads, L, head_dim]
    scale: float,
) -> torch.Tensor:
    """Causal self-attention of short sequences as two batched matmuls, each KV head's query group
    together, all in float32 as SDPA computes (bf16 scores drift past the bf16 parity tolerance).
    Returns [P, heads, L, head_dim] in the query's dtype."""
    prompts, heads, length, head_dim = query.shape
    kv_heads = keys.shape[1]
    grouped = query.float().reshape(prompts, kv_heads, heads // kv_heads, length, head_dim)
    scores = torch.matmul(grouped, keys.float().unsqueeze(2).transpose(-1, -2)).mul_(scale)  # [P, kv, g, L, L]
    future = torch.ones(length, length, dtype=torch.bool, device=query.device).triu_(1)
    scores.masked_fill_(future, float("-inf"))
    attended = torch.matmul(scores.softmax(dim=-1), values.float().unsqueeze(2))
    return attended.reshape(prompts, heads, length, head_dim).to(query.dtype)


def _decode_attention_matmul(
    query: torch.Tensor,  # [n, heads, head_dim]
    keys: torch.Tensor,  # [kv_heads, n, context, head_dim]
    values: torch.Tensor,  # [kv_heads, n, context, head_dim]
    score_bias: torch.Tensor,  # [kv_heads * n, 1, context]: 0 = attend, -inf = masked (ForwardBatch.decode_score_bias)
    scale: float,
) -> torch.Tensor:
    """One-token queries as two small batched matmuls, each KV head's query group together.

    On a CPU this is 2-4x faster than SDPA's flash kernel, which is built for long queries. The
    matmuls run in the cache's dtype (bfloat16 batched matmuls are several times faster than float32
    ones on a CPU with AMX/AVX512-BF16); the softmax runs in float32. Scaling and masking ride in the
    first matmul (``baddbmm``) and the float32 cast in the softmax: four fewer ops per layer than a
    separate scale, mask and cast (a 108 M layer's decode attention at 16 sequences: 296 -> 220 us).
    """
    n, heads, head_dim = query.shape
    kv_heads, _, context, _ = keys.shape
    group = heads // kv_heads
    grouped_query = (query.reshape(n, kv_heads, group, head_dim).transpose(0, 1)
                     .reshape(kv_heads * n, group, head_dim).to(keys.dtype))
    scores = torch.baddbmm(score_bias, grouped_query, keys.view(kv_heads * n, context, head_dim).transpose(1, 2),
                           alpha=scale)  # [kv * n, group, context]
    probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    attended = torch.bmm(probabilities, values.view(kv_heads * n, context, head_dim))  # [kv * n, group, d]
    return attended.view(kv_heads, n, group, head_dim).transpose(0, 1).reshape(n, heads, head_dim).to(query.dtype)
