"""Continuous batching: token budget, batch size, chunked prefill, FIFO order and preemption.

``engine_step`` plays the engine's part after each schedule (tokens computed, full blocks
published, one token sampled when a sequence has no uncomputed token left, finished
sequences removed), so every test can assert the exact schedule of every step.
"""

from __future__ import annotations

from service.ar.kv_cache import KVCacheManager
from service.ar.scheduler import ScheduledBatch, Scheduler
from service.ar.sequence import SamplingParams, Sequence, SequenceStatus
from tests.ar_sequences import make_sequence

BLOCK_SIZE = 4
MAX_STEPS = 50


def new_scheduler(num_blocks: int = 64, max_batch_size: int = 8, max_num_batched_tokens: int = 64) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, BLOCK_SIZE), max_batch_size, max_num_batched_tokens)


def add(scheduler: Scheduler, request_id: str, prompt_token_ids: list[int], max_tokens: int) -> Sequence:
    seq = make_sequence(request_id, prompt_token_ids, SamplingParams(max_tokens=max_tokens))
    scheduler.add(seq)
    return seq


def engine_step(scheduler: Scheduler, batch: ScheduledBatch) -> None:
    for seq, num_new in batch.entries:
        seq.num_computed_tokens += num_new
        scheduler.kv_cache.register_full_blocks(seq)
    for seq, _ in batch.entries:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(1000 + seq.num_tokens)  # a recognisable "sampled" token
            if seq.num_output_tokens >= seq.params.max_tokens:
                scheduler.remove(seq)
                seq.status = SequenceStatus.FINISHED


def run_to_completion(scheduler: Scheduler) -> list[ScheduledBatch]:
    batches = []
    while scheduler.has_work():
        assert len(batches) < MAX_STEPS, "the scheduler made no progress"
        batch = scheduler.schedule()
        engine_step(scheduler, batch)
        batches.append(batch)
    return batches


def entries(batch: ScheduledBatch) -> list[tuple[str, int]]:
    return [(seq.request_id, num_new) for seq, num_new in batch.entries]


def test_running_prefills_and_admissions_share_one_token_budget() -> None:
    scheduler = new_scheduler(max_num_batched_tokens=8)
    add(scheduler, "a", [1, 2, 3], max_tokens=4)
    add(scheduler, "b", list(range(10, 30)), max_tokens=2)
    batches = run_to_completion(scheduler)
    assert [entries(b) for b in batches] == [
        [("a", 3), ("b", 5)],
        [("a", 1), ("b", 7)],  # b is running now and still gets only what the budget leaves
        [("a", 1), ("b", 7)],
        [("a", 1), ("b", 1)],
        [("b", 1)],
    ]
    assert all(sum(n for _, n in entries(b)) <= 8 for b in batches)


def test_admission_in_arrival_order_with_chunked_prefill() -> None:
    scheduler = new_scheduler(max_num_batched_tokens=8)
    for request_id in "abc":
        add(scheduler, request_id, [ord(request_id)] * 6, max_tokens=3)
    batches = run_to_completion(scheduler)
    assert [entries(b) for b in batches] == [
        [("a", 6), ("b", 2)],
        [("a", 1), ("b", 4), ("c", 3)],
        [("a", 1), ("b", 1), ("c", 3)],
        [("b", 1), ("c", 1)],
        [("c", 1)],
    ]
    assert scheduler.kv_cache.num_free_blocks == 64


def test_a_long_prompt_is_prefilled_in_budget_sized_chunks() -> None:
    scheduler = new_scheduler(max_num_batched_tokens=8)
    seq = add(scheduler, "a", list(range(20)), max_tokens=2)
    batches = run_to_completion(scheduler)
    assert [entries(b) for b in batches] == [[("a", 8)], [("a", 8)], [("a", 4)], [("a", 1)]]
    assert seq.output_token_ids == [1020, 1021]


def test_batch_size_caps_the_running_sequences() -> None:
    scheduler = new_scheduler(max_batch_size=2)
    for request_id in "abc":
        add(scheduler, request_id, [ord(request_id)] * 2, max_tokens=2)
    batches = run_to_completion(scheduler)
    assert [entries(b) for b in batches] == [[("a", 2), ("b", 2)], [("a", 1), ("b", 1)], [("c", 2)], [("c", 1)]]


def test_single_token_entries_are_listed_first() -> None:
    scheduler = new_scheduler(max_num_batched_tokens=10)
    add(scheduler, "a", list(range(12)), max_tokens=1)
    assert entries(scheduler.schedule()) == [("a", 10)]
    scheduler.running[0].num_computed_tokens = 10
    add(scheduler, "b", [7], max_tokens=1)
    assert entries(scheduler.schedule()) == [("b", 1), ("a", 2)]


def test_a_prefix_hit_is_counted_at_first_admission() -> None:
    scheduler = new_scheduler()
    add(scheduler, "a", [1, 2, 3, 4, 5, 6, 7, 8, 9], max_tokens=1)
    run_to_completion(scheduler)
    second = add(scheduler, "b", [1, 2, 3, 4, 5, 6, 7, 8, 50], max_tokens=1)
    batch = scheduler.schedule()
    assert entries(batch) == [("b", 1)]
    assert batch.prefix_hit_tokens == 8 and second.num_cached_prompt_tokens == 8
    assert second.num_computed_tokens == 8 and second.status is SequenceStatus.RUNNING


def test_the_newest_sequence_is_preempted_and_recomputed_with_its_outputs() -> None:
    scheduler = new_scheduler(num_blocks=4)
    first = add(scheduler, "a", [1, 2, 3, 4, 5, 6, 7], max_tokens=6)
    second = add(scheduler, "b", [11, 12, 13, 14, 15, 16, 17], max_tokens=6)
    batches = run_to_completion(scheduler)
    assert [entries(b) for b in batches] == [
        [("a", 7), ("b", 7)],
        [("a", 1), ("b", 1)],
        [("a", 1)],  # a needs a third block: b, the newest, gives its two back
        [("a", 1)],  # b's first block is cached, but it needs two more and only one is free
        [("a", 1)],
        [("a", 1)],
        [("b", 5)],  # recomputed: 7 prompt + 2 output tokens, the first block from the prefix cache
        [("b", 1)],
        [("b", 1)],
        [("b", 1)],
    ]
    assert [[seq.request_id for seq in b.preempted] for b in batches] == [[], [], ["b"], [], [], [], [], [], [], []]
    assert [b.prefix_hit_tokens for b in batches] == [0, 0, 0, 0, 0, 0, 4, 0, 0, 0]
    assert first.num_preemptions == 0 and second.num_preemptions == 1
    assert second.output_token_ids == [1007, 1008, 1009, 1010, 1011, 1012]
    assert second.num_cached_prompt_tokens == 0  # what it hit at its first admission
    assert scheduler.kv_cache.num_free_blocks == 4


def test_preemption_frees_the_victim_and_puts_it_first_in_line() -> None:
    scheduler = new_scheduler(num_blocks=4)
    first = add(scheduler, "a", [1, 2, 3, 4, 5, 6, 7], max_tokens=6)
    second = add(scheduler, "b", [11, 12, 13, 14, 15, 16, 17], max_tokens=6)
    for _ in range(2):
        engine_step(scheduler, scheduler.schedule())
    late = add(scheduler, "c", [21, 22], max_tokens=1)
    batch = scheduler.schedule()
    assert entries(batch) == [("a", 1)] and batch.preempted == [second]
    assert list(scheduler.waiting) == [second, late]  # admission waits for the next step
    assert scheduler.running == [first]
    assert second.status is SequenceStatus.WAITING
    assert second.block_table == [] and second.num_computed_tokens == 0
    assert first.block_table == [0, 1, 3]
    assert scheduler.kv_cache.num_free_blocks == 1


def test_the_newest_sequence_preempts_itself_when_it_alone_lacks_a_block() -> None:
    scheduler = new_scheduler(num_blocks=2)
    first = add(scheduler, "a", [1, 2, 3], max_tokens=3)
    second = add(scheduler, "b", [11, 12, 13, 14], max_tokens=3)
    engine_step(scheduler, scheduler.schedule())
    batch = scheduler.schedule()
    assert entries(batch) == [("a", 1)] and batch.preempted == [second]
    assert scheduler.running == [first] and list(scheduler.waiting) == [second]
    assert second.block_table == [] and scheduler.kv_cache.num_free_blocks == 1


def test_a_waiting_sequence_that_does_not_fit_gives_its_prefix_blocks_back() -> None:
    scheduler = new_scheduler(num_blocks=3)
    add(scheduler, "a", [1, 2, 3, 4, 5], max_tokens=1)
    run_to_completion(scheduler)
    holder = add(scheduler, "h", [30, 31, 32, 33], max_tokens=5)
    engine_step(scheduler, scheduler.schedule())
    assert scheduler.kv_cache.num_free_blocks == 2
    # h's decode takes one of the two free blocks; b would hit a's first block but then needs two more for its 9 tokens
    blocked = add(scheduler, "b", [1, 2, 3, 4, 5, 6, 7, 8, 9], max_tokens=1)
    batch = scheduler.schedule()
    assert entries(batch) == [("h", 1)]
    assert list(scheduler.waiting) == [blocked] and blocked.block_table == [] and blocked.num_computed_tokens == 0
    assert scheduler.kv_cache.num_free_blocks == 1
    assert holder.status is SequenceStatus.RUNNING


def test_remove_drops_running_or_waiting_sequences_and_frees_their_blocks() -> None:
    scheduler = new_scheduler(max_batch_size=1)
    running = add(scheduler, "a", [1, 2, 3, 4, 5], max_tokens=4)
    waiting = add(scheduler, "b", [6, 7], max_tokens=4)
    assert not new_scheduler().has_work() and scheduler.has_work()
    scheduler.schedule()
    assert scheduler.kv_cache.num_free_blocks == 62
    scheduler.remove(waiting)
    assert list(scheduler.waiting) == [] and scheduler.running == [running]
    scheduler.remove(running)
    assert scheduler.running == [] and scheduler.kv_cache.num_free_blocks == 64
    scheduler.remove(running)  # already gone: nothing happens
    assert not scheduler.has_work()
    assert scheduler.schedule().is_empty


def test_a_running_sequence_gets_the_last_token_of_the_budget() -> None:
    scheduler = new_scheduler(max_num_batched_tokens=2)
    add(scheduler, "a", [1], max_tokens=3)
    add(scheduler, "b", [2, 3, 4, 5], max_tokens=1)
    batches = run_to_completion(scheduler)
    assert [entries(b) for b in batches] == [[("a", 1), ("b", 1)]] * 3 + [[("b", 1)]]


def test_a_block_shortage_preempts_the_newest_of_several() -> None:
    scheduler = new_scheduler(num_blocks=3)
    first = add(scheduler, "a", [1, 2, 3, 4], max_tokens=4)
    middle = add(scheduler, "b", [11, 12], max_tokens=4)
    newest = add(scheduler, "c", [21, 22], max_tokens=4)
    engine_step(scheduler, scheduler.schedule())
    batch = scheduler.schedule()  # a's fifth token needs a second block
    assert entries(batch) == [("a", 1), ("b", 1)] and batch.preempted == [newest]
    assert scheduler.running == [first, middle] and first.block_table == [0, 2]


def test_prefix_hits_of_one_step_add_up() -> None:
    scheduler = new_scheduler()
    add(scheduler, "a", [1, 2, 3, 4, 5, 6, 7, 8, 9], max_tokens=1)
    run_to_completion(scheduler)
    add(scheduler, "b", [1, 2, 3, 4, 5, 6, 7, 8, 50], max_tokens=1)
    add(scheduler, "c", [1, 2, 3, 4, 60, 61], max_tokens=1)
    batch = scheduler.schedule()
    assert entries(batch) == [("b", 1), ("c", 2)] and batch.prefix_hit_tokens == 12


def test_every_preemption_is_counted() -> None:
    scheduler = new_scheduler(num_blocks=3)
    add(scheduler, "a", [1], max_tokens=6)
    add(scheduler, "b", [20], max_tokens=2)
    third = add(scheduler, "c", [40, 41, 42, 43], max_tokens=4)
    batches = run_to_completion(scheduler)
    assert [(entries(b), [seq.request_id for seq in b.preempted], b.prefix_hit_tokens) for b in batches] == [
        ([("a", 1), ("b", 1), ("c", 4)], [], 0),
        ([("a", 1), ("b", 1)], ["c"], 0),  # c alone lacks a block: it preempts itself
        ([("a", 1), ("c", 1)], [], 4),     # b's block is free again; c's first block is a prefix hit
        ([("a", 1), ("c", 1)], [], 0),
        ([("a", 1)], ["c"], 0),            # a needs a second block: c is the newest
        ([("a", 1)], [], 0),               # c's prefix hit leaves it one block short
        ([("c", 3)], [], 4),
    ]
    assert third.num_preemptions == 2 and third.num_cached_prompt_tokens == 0
    assert third.output_token_ids == [1004, 1005, 1006, 1007]
