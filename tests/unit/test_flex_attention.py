"""The flex attention backend (reads the KV pool in place) against the plain-torch reference (gathers it):
the same attention output on mixed decode + prefill-chunk batches."""

from __future__ import annotations

import random

import pytest
import torch

from service.ar.models.attention import (
    ForwardBatch, SequenceSlice, build_forward_batch, paged_attention, resolve_attention_backend)
from service.ar.models.flex_attention import QUERY_BLOCK, decode_batch_bucket

# uncompiled flex on the CPU is the point of most of these tests
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
CPU = torch.device("cpu")
BLOCK_SIZE = 8
NUM_POOL_BLOCKS = 96
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def random_slices(rng: random.Random, decode_contexts: list[int],
                  chunks: list[tuple[int, int]]) -> list[SequenceSlice]:
    """Decodes with the given context lengths (the new token included), then prefill chunks of
    (tokens already cached, new tokens); every sequence gets its own blocks, scattered over the pool."""
    free_blocks = list(range(NUM_POOL_BLOCKS))
    rng.shuffle(free_blocks)

    def table_for(num_tokens: int) -> list[int]:
        return [free_blocks.pop() for _ in range(-(-num_tokens // BLOCK_SIZE))]

    slices = [SequenceSlice([rng.randrange(100)], context - 1, table_for(context)) for context in decode_contexts]
    slices += [SequenceSlice([rng.randrange(100) for _ in range(new)], cached, table_for(cached + new))
               for cached, new in chunks]
    return slices


def attend_both(slices: list[SequenceSlice], dtype: torch.dtype = torch.float32,
                compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's attention through each backend, on identical pools holding random old context."""
    generator = torch.Generator().manual_seed(0)
    num_slots = NUM_POOL_BLOCKS * BLOCK_SIZE
    key_pool = torch.randn(num_slots, KV_HEADS, HEAD_DIM, generator=generator).to(dtype)
    value_pool = torch.randn(num_slots, KV_HEADS, HEAD_DIM, generator=generator).to(dtype)
    num_tokens = sum(len(piece.new_token_ids) for piece in slices)
    query = torch.randn(num_tokens, HEADS, HEAD_DIM, generator=generator).to(dtype)
    key = torch.randn(num_tokens, KV_HEADS, HEAD_DIM, generator=generator).to(dtype)
    value = torch.randn(num_tokens, KV_HEADS, HEAD_DIM, generator=generator).to(dtype)
    outputs = []
    for backend in ("torch", "flex"):
        batch = build_forward_batch(slices, BLOCK_SIZE, CPU, backend, NUM_POOL_BLOCKS)
        if batch.flex is not None:
            batch.flex.compiled = compiled
        outputs.append(paged_attention(query, key, value, key_pool.clone(), value_pool.clone(), batch,
                                       HEAD_DIM**-0.5))
    return outputs[0], outputs[1]


@pytest.mark.parametrize(("decode_contexts", "chunks"), [
    ([1, 9, 17, 40, 8], []),  # decodes only, ragged, one at a block edge; 5 rows padded to 8
    ([], [(0, 13)]),  # one fresh prefill
    ([3, 25, 64], [(0, 5), (16, 21), (20, 150)]),  # mixed; a chunk after cached tokens; one over a query block
    ([7], [(9, 1 + QUERY_BLOCK)]),
])
def test_flex_matches_torch_reference(decode_contexts: list[int], chunks: list[tuple[int, int]]) -> None:
    reference, flex = attend_both(random_slices(random.Random(len(decode_contexts)), decode_contexts, chunks))
    torch.testing.assert_close(flex, reference, rtol=1e-5, atol=1e-5)


def test_flex_reads_only_the_sequences_own_slots() -> None:
    """Poison every slot outside the sequences' contexts (huge, finite: a NaN would leak even through
    a zero attention weight, in either backend): the output must not change."""
    slices = random_slices(random.Random(3), [5, 30], [(8, 11)])
    batch = build_forward_batch(slices, BLOCK_SIZE, CPU, "flex", NUM_POOL_BLOCKS)
    num_slots = NUM_POOL_BLOCKS * BLOCK_SIZE
    key_pool = torch.randn(num_slots, KV_HEADS, HEAD_DIM)
    value_pool = torch.randn(num_slots, KV_HEADS, HEAD_DIM)
    used = torch.zeros(num_slots, dtype=torch.bool)
    for piece in slices:
        for position in range(piece.start_position + len(piece.new_token_ids)):
            used[piece.block_table[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE] = True
    num_tokens = batch.num_tokens
    query, key, value = (torch.randn(num_tokens, h, HEAD_DIM) for h in (HEADS, KV_HEADS, KV_HEADS))
    clean = paged_attention(query, key, value, key_pool.clone(), value_pool.clone(), batch, 0.25)
    key_pool[~used] = 1e4
    value_pool[~used] = -1e4
    poisoned = paged_attention(query, key, value, key_pool, value_pool, batch, 0.25)
    torch.testing.assert_close(poisoned, clean, rtol=1e-6, atol=1e-6)


def test_flex_matches_torch_in_bfloat16() -> None:
    reference, flex = attend_both(random_slices(random.Random(5), [4, 33], [(0, 19)]), torch.bfloat16)
    assert flex.dtype is torch.bfloat16
    torch.testing.assert_close(flex.float(), reference.float(), rtol=2e-2, atol=2e-2)


def test_compiled_flex_on_cpu_matches_torch() -> None:
    """The compiled kernels read the block list (the eager path evaluates the mask densely), so this
    checks the listed blocks too. One compile per kind, about 10 s on this CPU."""
    reference, flex = attend_both(random_slices(random.Random(7), [2, 19, 40], [(8, 27)]), compiled=True)
    torch.testing.assert_close(flex, reference, rtol=1e-5, atol=1e-5)


def test_decode_buckets_and_backend_choice() -> None:
    assert [decode_batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 33)] == [1, 2, 4, 8, 8, 16, 64]
    assert resolve_attention_backend("auto", CPU) == "torch"
    assert resolve_attention_backend("auto", torch.device("cuda")) == "flex"
    assert resolve_attention_backend("flex", CPU) == "flex"


def test_flex_batch_skips_the_gather_indices() -> None:
    batch: ForwardBatch = build_forward_batch(random_slices(random.Random(1), [9], [(0, 4)]), BLOCK_SIZE, CPU,
                                              "flex", NUM_POOL_BLOCKS)
    assert batch.flex is not None and batch.decode_kv_slots is None and batch.prefills == []
