"""Continuous batching: who runs in the next step, and with how many tokens.

Each step has a token budget. Running sequences go first, oldest first: a
decode costs one token, a prompt still being prefilled takes what is left of
the budget (chunked prefill). Then waiting sequences are admitted while budget,
batch slots and KV blocks last. When a running sequence cannot get a block, the
newest running sequence is preempted: its blocks are freed and it goes back to
the front of the waiting queue, to be recomputed (mostly from the prefix cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from service.ar.kv_cache import KVCacheManager
from service.ar.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    # (sequence, number of new tokens), one-token entries first
    entries: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    prefix_hit_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.entries


class Scheduler:
    def __init__(self, kv_cache: KVCacheManager, max_batch_size: int, max_num_batched_tokens: int) -> None:
        self.kv_cache = kv_cache
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv_cache.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens

        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not self.kv_cache.allocate(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                batch.entries.append((seq, num_new))
                budget -= num_new

        while self.waiting and not batch.preempted and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            hit_tokens = 0
            if not seq.block_table:
                hit_tokens = self.kv_cache.match_prefix(seq)
                seq.num_computed_tokens = hit_tokens
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self.kv_cache.allocate(seq, num_new):
                self.kv_cache.free(seq)  # give back the prefix blocks; retry next step
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.entries.append((seq, num_new))
            batch.prefix_hit_tokens += hit_tokens
            if seq.num_preemptions == 0:
                seq.num_cached_prompt_tokens = hit_tokens
            budget -= num_new

        batch.entries.sort(key=lambda entry: entry[1] != 1)  # stable: decodes first
        return batch

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.kv_cache.free(seq)
