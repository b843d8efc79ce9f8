"""The plain-torch paged attention (ar/models/attention.py) against a naive per-sequence softmax attention:
decodes gathered by whole blocks, first prompt chunks attended together (padded) from the step's own keys,
and chunks that continue a cached sequence."""

from __future__ import annotations

import random

import pytest
import torch

from service.ar.models.attention import SequenceSlice, build_forward_batch, paged_attention
from tests.unit.test_flex_attention import BLOCK_SIZE, NUM_POOL_BLOCKS, random_slices

CPU = torch.device("cpu")
HEADS, KV_HEADS, HEAD_DIM = 6, 2, 8


def naive_attention(slices: list[SequenceSlice], query: torch.Tensor, key_pool: torch.Tensor,
                    value_pool: torch.Tensor, scale: float) -> torch.Tensor:
    """Each new token attends over its sequence's positions up to its own, read slot by slot."""
    group = HEADS // KV_HEADS
    output = torch.empty_like(query)
    row = 0
    for piece in slices:
        for offset in range(len(piece.new_token_ids)):
            position = piece.start_position + offset
            slots = [piece.block_table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(position + 1)]
            keys = key_pool[:, slots].repeat_interleave(group, dim=0)  # [heads, ctx, d]
            values = value_pool[:, slots].repeat_interleave(group, dim=0)
            weights = torch.einsum("hd,hcd->hc", query[row], keys).mul(scale).softmax(dim=-1)
            output[row] = torch.einsum("hc,hcd->hd", weights, values)
            row += 1
    return output


@pytest.mark.parametrize(("decode_contexts", "chunks"), [
    ([1, 4, 5, 13, 30], []),  # ragged decodes, at and across block edges
    ([], [(0, 7), (0, 9), (0, 6)]),  # first chunks of similar length: one padded group
    ([], [(0, 3), (0, 30), (0, 2)]),  # padding would more than double the tokens: one group each
    ([6, 21], [(0, 5), (8, 3), (0, 11), (3, 17)]),  # decodes, first chunks and continuing chunks, interleaved
])
def test_torch_attention_matches_a_naive_reference(decode_contexts: list[int],
                                                   chunks: list[tuple[int, int]]) -> None:
    slices = random_slices(random.Random(len(chunks)), decode_contexts, chunks)
    batch = build_forward_batch(slices, BLOCK_SIZE, CPU)
    generator = torch.Generator().manual_seed(0)
    num_slots = NUM_POOL_BLOCKS * BLOCK_SIZE
    key_pool = torch.randn(KV_HEADS, num_slots, HEAD_DIM, generator=generator)
    value_pool = torch.randn(KV_HEADS, num_slots, HEAD_DIM, generator=generator)
    query, key, value = (torch.randn(batch.num_tokens, heads, HEAD_DIM, generator=generator)
                         for heads in (HEADS, KV_HEADS, KV_HEADS))
    output = paged_attention(query, key, value, key_pool, value_pool, batch, HEAD_DIM**-0.5)
    # paged_attention wrote this step's keys and values into the pools, where the reference reads them
    torch.testing.assert_close(output, naive_attention(slices, query, key_pool, value_pool, HEAD_DIM**-0.5),
                               rtol=1e-5, atol=1e-5)


def test_first_chunks_are_grouped_unless_padding_would_double_the_work() -> None:
    similar = build_forward_batch(random_slices(random.Random(0), [3], [(0, 7), (4, 2), (0, 9)]), BLOCK_SIZE, CPU)
    assert [(group.prompts, group.longest) for group in similar.fresh_prefills] == [(2, 9)]
    assert len(similar.prefills) == 1  # the chunk after 4 cached tokens reads the pool
    uneven = build_forward_batch(random_slices(random.Random(0), [], [(0, 3), (0, 30), (0, 2)]), BLOCK_SIZE, CPU)
    assert [(group.prompts, group.longest) for group in uneven.fresh_prefills] == [(1, 3), (1, 30), (1, 2)]
