"""The KV block pool: allocation counts, reference counts, chained prefix hashes and eviction order."""

from __future__ import annotations

import pytest

from service.ar.kv_cache import KVCacheManager, chained_block_hash
from service.ar.sequence import SamplingParams, Sequence
from tests.ar_sequences import make_sequence

BLOCK_SIZE = 4


def computed(manager: KVCacheManager, seq: Sequence, num_tokens: int | None = None) -> Sequence:
    """Allocate and 'compute' a sequence's first ``num_tokens`` tokens (all by default), as one engine step does."""
    num_tokens = seq.num_tokens if num_tokens is None else num_tokens
    assert manager.allocate(seq, num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = num_tokens
    manager.register_full_blocks(seq)
    return seq


def ref_counts(manager: KVCacheManager, block_ids: list[int]) -> list[int]:
    return [manager._blocks[block_id].ref_count for block_id in block_ids]


@pytest.mark.parametrize(("num_tokens", "blocks"), [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_blocks_needed_rounds_up(num_tokens: int, blocks: int) -> None:
    assert KVCacheManager(10, BLOCK_SIZE).blocks_needed(num_tokens) == blocks


def test_allocation_takes_blocks_in_order_and_grows_only_at_block_boundaries() -> None:
    manager = KVCacheManager(10, BLOCK_SIZE)
    seq = make_sequence("a", list(range(1, 10)))
    assert manager.allocate(seq, 9)
    assert seq.block_table == [0, 1, 2]
    assert manager.num_free_blocks == 7
    assert manager.usage == pytest.approx(0.3)
    assert ref_counts(manager, [0, 1, 2]) == [1, 1, 1]

    seq.num_computed_tokens = 9
    assert manager.allocate(seq, 3)  # 12 tokens still fit in three blocks
    assert seq.block_table == [0, 1, 2] and manager.num_free_blocks == 7
    seq.num_computed_tokens = 12
    assert manager.allocate(seq, 1)
    assert seq.block_table == [0, 1, 2, 3] and manager.num_free_blocks == 6


def test_a_short_pool_refuses_without_taking_anything() -> None:
    manager = KVCacheManager(3, BLOCK_SIZE)
    seq = make_sequence("a", list(range(13)))
    assert not manager.allocate(seq, 13)
    assert seq.block_table == [] and manager.num_free_blocks == 3
    assert manager.allocate(seq, 12)
    assert seq.block_table == [0, 1, 2] and manager.num_free_blocks == 0
    assert manager.usage == 1.0
    seq.num_computed_tokens = 12
    assert manager.allocate(seq, 0) and not manager.allocate(seq, 1)
    assert seq.block_table == [0, 1, 2]


def test_free_returns_every_block_and_resets_the_sequence() -> None:
    manager = KVCacheManager(10, BLOCK_SIZE)
    seq = computed(manager, make_sequence("a", list(range(1, 10))))
    manager.free(seq)
    assert manager.num_free_blocks == 10 and manager.usage == 0.0
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert ref_counts(manager, [0, 1, 2]) == [0, 0, 0]


def test_chained_hash_depends_on_the_previous_block() -> None:
    tokens = [5, 6, 7, 8]
    first = chained_block_hash(None, [1, 2, 3, 4])
    assert chained_block_hash(None, tokens) == chained_block_hash(None, list(tokens))
    assert chained_block_hash(first, tokens) != chained_block_hash(None, tokens)
    assert chained_block_hash(first, tokens) != chained_block_hash(chained_block_hash(None, [1, 2, 3, 9]), tokens)
    assert chained_block_hash(None, [1, 2, 3, 4]) != chained_block_hash(None, [1, 2, 3, 5])
    assert len(first) == 16


def test_a_shared_prefix_is_attached_with_reference_counts() -> None:
    manager = KVCacheManager(10, BLOCK_SIZE)
    first = computed(manager, make_sequence("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    second = make_sequence("b", [1, 2, 3, 4, 5, 6, 7, 8, 42, 43])
    assert manager.match_prefix(second) == 8
    assert second.block_table == first.block_table[:2] == [0, 1]
    assert ref_counts(manager, [0, 1, 2]) == [2, 2, 1]
    assert manager.num_free_blocks == 7  # the shared blocks were in use, not free

    second.num_computed_tokens = 8
    assert manager.allocate(second, 2)
    assert second.block_table == [0, 1, 3] and manager.num_free_blocks == 6
    manager.free(first)
    assert ref_counts(manager, [0, 1, 2]) == [1, 1, 0]
    assert manager.num_free_blocks == 7  # only the block the first sequence alone held
    manager.free(second)
    assert manager.num_free_blocks == 10


def test_a_prefix_hit_on_freed_blocks_takes_them_off_the_free_list() -> None:
    manager = KVCacheManager(4, BLOCK_SIZE)
    manager.free(computed(manager, make_sequence("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])))
    assert manager.num_free_blocks == 4
    seq = make_sequence("b", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert manager.match_prefix(seq) == 8
    assert seq.block_table == [0, 1]
    assert manager.num_free_blocks == 2
    assert ref_counts(manager, [0, 1]) == [1, 1]
    seq.num_computed_tokens = 8
    assert manager.allocate(seq, 2)
    # the new block is a fresh one, never one of the sequence's own prefix blocks
    assert seq.block_table == [0, 1, 2] and manager.num_free_blocks == 1
    other = make_sequence("c", list(range(100, 108)))
    assert not manager.allocate(other, 8)
    assert manager.allocate(other, 4) and other.block_table == [3]


def test_same_block_tokens_in_another_context_are_not_a_hit() -> None:
    manager = KVCacheManager(10, BLOCK_SIZE)
    computed(manager, make_sequence("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # block 0 here holds the tokens of block 1 above; block 1 here holds those of block 0 above
    moved = make_sequence("b", [5, 6, 7, 8, 1, 2, 3, 4, 9])
    assert manager.match_prefix(moved) == 0 and moved.block_table == []
    repeated = make_sequence("c", [1, 2, 3, 4, 1, 2, 3, 4, 9])
    assert manager.match_prefix(repeated) == 4 and repeated.block_table == [0]
    assert manager.num_free_blocks == 7


def test_a_prefix_match_always_leaves_one_token_to_compute() -> None:
    manager = KVCacheManager(10, BLOCK_SIZE)
    computed(manager, make_sequence("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert manager.match_prefix(make_sequence("b", [1, 2, 3, 4, 5, 6, 7, 8])) == 4
    assert manager.match_prefix(make_sequence("c", [1, 2, 3, 4, 5])) == 4
    assert manager.match_prefix(make_sequence("d", [1, 2, 3, 4])) == 0


def test_only_full_computed_blocks_are_published() -> None:
    manager = KVCacheManager(10, BLOCK_SIZE)
    computed(manager, make_sequence("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]), num_tokens=7)
    assert manager.match_prefix(make_sequence("b", [1, 2, 3, 4, 5, 6, 7, 8, 9])) == 4


def test_prefix_caching_off_or_prompt_logprobs_never_match() -> None:
    disabled = KVCacheManager(10, BLOCK_SIZE, enable_prefix_caching=False)
    computed(disabled, make_sequence("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert disabled.match_prefix(make_sequence("b", [1, 2, 3, 4, 5, 6, 7, 8, 9])) == 0

    manager = KVCacheManager(10, BLOCK_SIZE)
    computed(manager, make_sequence("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    wants_prompt_logprobs = make_sequence("b", [1, 2, 3, 4, 5, 6, 7, 8, 9], SamplingParams(prompt_logprobs=True))
    assert manager.match_prefix(wants_prompt_logprobs) == 0
    assert wants_prompt_logprobs.block_table == [] and manager.num_free_blocks == 7


def test_a_duplicate_block_is_not_published_twice_and_goes_first_in_line_for_reuse() -> None:
    manager = KVCacheManager(6, BLOCK_SIZE, enable_prefix_caching=True)
    first = computed(manager, make_sequence("a", [1, 2, 3, 4, 9]))
    # computed without matching first (as two prompts prefilled in the same step are)
    twin = computed(manager, make_sequence("b", [1, 2, 3, 4, 9]))
    assert first.block_table == [0, 1] and twin.block_table == [2, 3]
    manager.free(twin)
    manager.free(first)
    # the unpublished blocks (1, 2, 3) go to the front of the free list, the published block 0 to its back
    fresh = make_sequence("c", list(range(100, 124)))
    assert manager.allocate(fresh, 20)
    assert fresh.block_table == [1, 2, 3, 4, 5]
    assert manager.match_prefix(make_sequence("d", [1, 2, 3, 4, 9])) == 4


def test_eviction_reuses_unpublished_blocks_first_then_the_least_recently_freed_tail() -> None:
    manager = KVCacheManager(6, BLOCK_SIZE)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    manager.free(computed(manager, make_sequence("a", prompt)))  # blocks 0, 1 published, 2 partial
    filler = make_sequence("b", list(range(100, 120)))
    assert manager.allocate(filler, 20)
    # the partial block and the never-used ones go first, then the prefix's tail block 1, keeping block 0
    assert filler.block_table == [2, 3, 4, 5, 1]
    again = make_sequence("c", prompt)
    assert manager.match_prefix(again) == 4 and again.block_table == [0]
    assert manager.num_free_blocks == 0


def test_blocks_published_after_a_prefix_hit_chain_on_the_hit_blocks() -> None:
    manager = KVCacheManager(10, BLOCK_SIZE)
    computed(manager, make_sequence("a", [1, 2, 3, 4, 9]))
    extended = make_sequence("b", [1, 2, 3, 4, 5, 6, 7, 8, 10])
    extended.num_computed_tokens = manager.match_prefix(extended)
    assert extended.num_computed_tokens == 4
    computed(manager, extended)
    # b's second block is published under the hash of its whole prefix, not of its own tokens alone
    assert manager.match_prefix(make_sequence("c", [1, 2, 3, 4, 5, 6, 7, 8, 11])) == 8
    assert manager.match_prefix(make_sequence("d", [5, 6, 7, 8, 11])) == 0


def test_an_evicted_block_is_published_again_once_refilled() -> None:
    manager = KVCacheManager(2, BLOCK_SIZE)
    manager.free(computed(manager, make_sequence("a", [1, 2, 3, 4, 5])))
    refill = computed(manager, make_sequence("b", [6, 7, 8, 9, 10, 11, 12, 13]))
    assert refill.block_table == [1, 0]  # block 0 lost a's prefix when it was taken
    assert manager.match_prefix(make_sequence("c", [1, 2, 3, 4, 5])) == 0
    manager.free(refill)
    assert manager.match_prefix(make_sequence("d", [6, 7, 8, 9, 10, 11, 12, 13, 14])) == 8


def test_free_forgets_the_request() -> None:
    manager = KVCacheManager(10, BLOCK_SIZE)
    seq = computed(manager, make_sequence("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], SamplingParams(prompt_logprobs=True)))
    manager.free(seq)
    assert manager._block_hashes == {}
    # recomputed after a preemption (prompt logprobs: no prefix match), its new blocks are published
    assert manager.match_prefix(seq) == 0
    filler = make_sequence("f", list(range(100, 128)))
    assert manager.allocate(filler, 28)  # a's partial block 2 and blocks 3-8
    computed(manager, seq)
    assert seq.block_table == [9, 1, 0]  # taking 1 and 0 dropped a's old hashes
    assert manager.match_prefix(make_sequence("b", [1, 2, 3, 4, 5, 6, 7, 8, 42])) == 8


def test_match_prefix_takes_only_a_sequence_without_blocks() -> None:
    manager = KVCacheManager(10, BLOCK_SIZE)
    seq = make_sequence("a", [1, 2, 3, 4, 5])
    assert manager.allocate(seq, 5)
    with pytest.raises(AssertionError):
        manager.match_prefix(seq)
