"""Paged attention that reads the KV block pool in place, with PyTorch FlexAttention.

The plain-torch path (``attention.paged_attention``) gathers every sequence's context out of the
pool at every layer. Here the pool itself is the key/value sequence: a layer's keys are the view
``key_cache[None]`` of shape ``[1, kv_heads, num_slots, head_dim]`` (no copy),
broadcast over a batch of one row per sequence. A ``BlockMask`` whose KV block is one KV-cache
block lists, per sequence, exactly the pool blocks of its block table, so the kernel visits only
those; its ``mask_mod`` maps a pool slot back to its position in the sequence (through a
pool-block -> logical-block table) and keeps the slots at or before the query's position.

The eager (uncompiled) FlexAttention evaluates ``mask_mod`` densely and ignores the block list,
the compiled kernels read the block list: both must agree, so the mask is exact on its own.

A step has up to two groups of queries: the decodes (one query per sequence, the batch padded to a
power of two so that compiled kernels see few shapes) and the prefill chunks (one row per chunk,
padded to the longest). The masks are built once per step and shared by every layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

# Query rows per block-mask row; the compiled kernels' default query tile divides it.
QUERY_BLOCK = 128
# Widest key tile of the CUDA kernels when the KV block (one KV-cache block) is smaller than their default.
_MAX_CUDA_KEY_TILE = 64


def decode_batch_bucket(num_decodes: int) -> int:
    """The padded decode batch: the next power of two (also the CUDA-graph capture sizes)."""
    return 1 << max(0, num_decodes - 1).bit_length()


def flex_block_size_problem(block_size: int, device: torch.device) -> str | None:
    """Why ``block_size`` does not suit flex on ``device``, or None: the CUDA kernels tile keys by powers
    of two of at least 16, and the block mask's KV block is one cache block."""
    if device.type == "cuda" and (block_size < 16 or block_size & (block_size - 1)):
        return f"attention_backend flex on CUDA needs block_size a power of two >= 16, got {block_size}"
    return None


class PoolMaskInputs:
    """The tensors a pool block mask reads, for up to ``rows`` sequences of ``query_len`` queries.

    Eager steps allocate them per step; CUDA graphs allocate them once and refill them in place, so
    a captured graph keeps reading the same memory.
    """

    def __init__(self, rows: int, query_len: int, table_width: int, num_pool_blocks: int, block_size: int,
                 device: torch.device) -> None:
        self.block_size = block_size
        self.num_pool_blocks = num_pool_blocks
        self.query_len = query_len
        num_query_blocks = math.ceil(query_len / QUERY_BLOCK)
        # pool block -> its index in the row's block table, -1 if absent; one extra column takes the
        # scatter of padded table entries
        self.logical_block = torch.full((rows, num_pool_blocks + 1), -1, dtype=torch.int32, device=device)
        self.query_positions = torch.full((rows, query_len), -1, dtype=torch.int32, device=device)
        self.kv_num_blocks = torch.zeros((rows, 1, num_query_blocks), dtype=torch.int32, device=device)
        self.kv_indices = torch.zeros((rows, 1, num_query_blocks, num_pool_blocks), dtype=torch.int32,
                                      device=device)
        self.table_width = table_width
        self._logical_index = torch.arange(table_width, dtype=torch.int32, device=device)

    def fill(self, block_tables: torch.Tensor, query_positions: torch.Tensor, kv_num_blocks: torch.Tensor) -> None:
        """Write the first ``len(block_tables)`` rows. ``block_tables`` [n, table_width] int64, padded with
        ``num_pool_blocks``; ``query_positions`` [n, query_len] (-1 = padding); ``kv_num_blocks``
        [n, num_query_blocks]: blocks each query block reads (a prefix of its table)."""
        rows = block_tables.shape[0]
        logical_block = self.logical_block[:rows]
        logical_block.fill_(-1)
        logical_block.scatter_(1, block_tables, self._logical_index.expand(rows, -1))
        self.query_positions[:rows].copy_(query_positions)
        self.kv_num_blocks[:rows, 0].copy_(kv_num_blocks)
        listed = torch.where(block_tables < self.num_pool_blocks, block_tables, 0).to(torch.int32)
        self.kv_indices[:rows, 0, :, :self.table_width].copy_(listed[:, None, :])

    def block_mask(self, rows: int) -> BlockMask:
        logical_block = self.logical_block[:rows]
        query_positions = self.query_positions[:rows]
        block_size = self.block_size

        def within_own_context(batch: torch.Tensor, head: torch.Tensor, query_index: torch.Tensor,
                               slot: torch.Tensor) -> torch.Tensor:
            logical = logical_block[batch, slot // block_size]
            position = logical * block_size + slot % block_size
            return (logical >= 0) & (position <= query_positions[batch, query_index])

        return BlockMask.from_kv_blocks(
            self.kv_num_blocks[:rows], self.kv_indices[:rows], BLOCK_SIZE=(QUERY_BLOCK, block_size),
            mask_mod=within_own_context, seq_lengths=(self.query_len, self.num_pool_blocks * block_size),
            compute_q_blocks=False)


def _padded_tables(block_tables: list[list[int]], blocks_used: list[int], width: int, pad: int,
                   padding_rows: int = 0) -> torch.Tensor:
    """[rows + padding_rows, width] int64: each row's first ``blocks_used`` blocks, then ``pad``.

    Only the used entries pass through Python; padding a list per row cost ~5 us per row at the
    graphs' full table width (256 blocks), i.e. milliseconds per step at a few hundred sequences."""
    tables = np.full((len(block_tables) + padding_rows, width), pad, dtype=np.int64)
    used_entries = [block for table, used in zip(block_tables, blocks_used) for block in table[:used]]
    if used_entries:
        counts = np.asarray(blocks_used, dtype=np.int64)
        row_starts = np.repeat(np.cumsum(counts) - counts, counts)
        tables[np.repeat(np.arange(len(counts)), counts), np.arange(len(used_entries)) - row_starts] = used_entries
    return torch.from_numpy(tables)


def decode_mask_tensors(block_tables: list[list[int]], positions: list[int], rows: int, table_width: int,
                        block_size: int, pad_block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host tensors for ``PoolMaskInputs.fill`` of ``rows`` decode rows (one query each); rows past
    ``len(positions)`` are padding: no block, position -1."""
    blocks_used = [position // block_size + 1 for position in positions]
    padding = rows - len(positions)
    tables = _padded_tables(block_tables, blocks_used, table_width, pad_block, padding)
    query_positions = torch.tensor(positions + [-1] * padding, dtype=torch.int32)[:, None]
    kv_num_blocks = torch.tensor(blocks_used + [0] * padding, dtype=torch.int32)[:, None]
    return tables, query_positions, kv_num_blocks


@dataclass
class PrefillGroup:
    mask: BlockMask
    query_len: int  # padded chunk length
    query_rows: torch.Tensor  # [chunks * query_len] packed-batch row of each padded query
    output_rows: torch.Tensor  # rows of the flattened [chunks * query_len] output that are real, in packed order


@dataclass
class FlexAttentionMetadata:
    """One step's FlexAttention masks, shared by every layer."""

    num_decodes: int
    decode_rows: int  # the padded decode batch (>= num_decodes)
    decode_mask: BlockMask | None
    prefill: PrefillGroup | None
    compiled: bool

    def attend(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
               scale: float) -> torch.Tensor:
        """Attention of ``query`` [T, heads, head_dim] over the pool, which already holds this step's keys."""
        keys = key_cache.unsqueeze(0)  # [1, kv_heads, num_slots, head_dim], a view
        values = value_cache.unsqueeze(0)
        gqa = query.shape[1] != key_cache.shape[0]
        decodes = None
        if self.decode_mask is not None:
            n = self.num_decodes
            decode_queries = query[:n]
            if self.decode_rows > n:
                decode_queries = torch.cat((decode_queries, decode_queries.new_zeros(
                    (self.decode_rows - n, *decode_queries.shape[1:]))))
            attend = _attention_function("decode", self.compiled)
            decodes = attend(decode_queries.unsqueeze(2), keys, values, self.decode_mask, scale, gqa)
            decodes = decodes.squeeze(2)[:n]
            if self.prefill is None:
                return decodes
        output = torch.empty_like(query)
        if decodes is not None:
            output[:self.num_decodes] = decodes
        if self.prefill is not None:
            group = self.prefill
            chunk_queries = query.index_select(0, group.query_rows)
            chunk_queries = chunk_queries.view(-1, group.query_len, *query.shape[1:]).transpose(1, 2)
            attend = _attention_function("prefill", self.compiled)
            attended = attend(chunk_queries, keys, values, group.mask, scale, gqa)
            attended = attended.transpose(1, 2).reshape(-1, *query.shape[1:])
            output[self.num_decodes:] = attended.index_select(0, group.output_rows)
        return output


def build_flex_metadata(block_tables: list[list[int]], start_positions: list[int], query_lens: list[int],
                        num_decodes: int, block_size: int, num_pool_blocks: int,
                        device: torch.device) -> FlexAttentionMetadata:
    """Masks for a packed step: the first ``num_decodes`` sequences have one query, the rest are chunks."""
    decode_rows, decode_mask = 0, None
    if num_decodes:
        decode_rows = decode_batch_bucket(num_decodes)
        table_width = max(start_positions[i] // block_size + 1 for i in range(num_decodes))
        inputs = PoolMaskInputs(decode_rows, 1, table_width, num_pool_blocks, block_size, device)
        tensors = decode_mask_tensors(block_tables[:num_decodes], start_positions[:num_decodes], decode_rows,
                                      table_width, block_size, num_pool_blocks)
        inputs.fill(*(tensor.to(device) for tensor in tensors))
        decode_mask = inputs.block_mask(decode_rows)

    prefill = None
    if len(query_lens) > num_decodes:
        prefill = _prefill_group(block_tables[num_decodes:], start_positions[num_decodes:],
                                 query_lens[num_decodes:], num_decodes, block_size, num_pool_blocks, device)
    return FlexAttentionMetadata(num_decodes, decode_rows, decode_mask, prefill, compiled=device.type == "cuda")


def _prefill_group(block_tables: list[list[int]], starts: list[int], lens: list[int], first_row: int,
                   block_size: int, num_pool_blocks: int, device: torch.device) -> PrefillGroup:
    query_len = max(lens)
    num_query_blocks = math.ceil(query_len / QUERY_BLOCK)
    blocks_used = [-(-(start + length) // block_size) for start, length in zip(starts, lens)]
    table_width = max(blocks_used)
    query_rows: list[int] = []
    output_rows: list[int] = []
    positions: list[list[int]] = []
    kv_num_blocks: list[list[int]] = []
    packed_row = first_row
    for chunk, (start, length) in enumerate(zip(starts, lens)):
        query_rows += list(range(packed_row, packed_row + length)) + [packed_row] * (query_len - length)
        output_rows += range(chunk * query_len, chunk * query_len + length)
        positions.append(list(range(start, start + length)) + [-1] * (query_len - length))
        # a query block reads the blocks up to its last real query's position
        kv_num_blocks.append([
            (start + min((block + 1) * QUERY_BLOCK, length) - 1) // block_size + 1
            if block * QUERY_BLOCK < length else 0
            for block in range(num_query_blocks)])
        packed_row += length
    inputs = PoolMaskInputs(len(lens), query_len, table_width, num_pool_blocks, block_size, device)
    inputs.fill(_padded_tables(block_tables, blocks_used, table_width, num_pool_blocks).to(device),
                torch.tensor(positions, dtype=torch.int32, device=device),
                torch.tensor(kv_num_blocks, dtype=torch.int32, device=device))
    return PrefillGroup(inputs.block_mask(len(lens)), query_len,
                        torch.tensor(query_rows, dtype=torch.long, device=device),
                        torch.tensor(output_rows, dtype=torch.long, device=device))


def _kernel_options(mask: BlockMask, device: torch.device) -> dict[str, Any] | None:
    """On CUDA the key tile must divide the KV block (one cache block), which may be below the default tile."""
    if device.type != "cuda":
        return None
    return {"BLOCK_N": min(mask.BLOCK_SIZE[1], _MAX_CUDA_KEY_TILE)}


def _decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: BlockMask,
                      scale: float, gqa: bool) -> torch.Tensor:
    return flex_attention(query, keys, values, block_mask=mask, scale=scale, enable_gqa=gqa,
                          kernel_options=_kernel_options(mask, query.device))


def _prefill_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: BlockMask,
                       scale: float, gqa: bool) -> torch.Tensor:
    return flex_attention(query, keys, values, block_mask=mask, scale=scale, enable_gqa=gqa,
                          kernel_options=_kernel_options(mask, query.device))


_compiled: dict[str, Callable[..., torch.Tensor]] = {}


def _attention_function(kind: str, compiled: bool) -> Callable[..., torch.Tensor]:
    """FlexAttention is fast only compiled (on CUDA, always). Uncompiled it materialises
    [batch, heads, queries, num_slots] scores: fine for CPU tests, never for serving.

    Decodes and prefills are two functions so that each keeps its own compiled cache: decode batches
    come in a few power-of-two sizes, each with its own static kernel (the split-KV decoding kernel
    needs a static batch); prefill shapes vary every step, so they compile once more, dynamic."""
    function = _decode_attention if kind == "decode" else _prefill_attention
    if not compiled:
        return function
    if kind not in _compiled:
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 32)
        _compiled[kind] = torch.compile(function, dynamic=False if kind == "decode" else None)
    return _compiled[kind]
