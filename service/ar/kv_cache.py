"""The KV block pool: allocation, reference counts and automatic prefix caching.

Physical K/V tensors live in the model runner; this class only hands out block
ids. A full block is identified by a hash chained over every token up to its end,
so two sequences with the same prefix map to the same blocks. Freed blocks keep
their hash and stay reusable until the pool needs them (least recently freed
first), which is what lets a later request skip the prefill of a shared prefix.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from service.ar.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    content_hash: bytes | None = None


def chained_block_hash(previous: bytes | None, token_ids: list[int]) -> bytes:
    digest = hashlib.blake2b(previous or b"", digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}
        # per request: hashes of its full blocks, in order
        self._block_hashes: dict[str, list[bytes]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take_free_block(self) -> Block:
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.content_hash is not None:
            if self._cached.get(block.content_hash) == block_id:
                del self._cached[block.content_hash]
            block.content_hash = None
        block.ref_count = 1
        return block

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks for the longest cached prefix of a fresh sequence.

        Returns the number of tokens covered. At least one token is always left
        to compute, since the last position's logits are needed.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching or seq.params.prompt_logprobs:
            return 0
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hashes: list[bytes] = []
        previous: bytes | None = None
        for index in range(max_blocks):
            start = index * self.block_size
            block_hash = chained_block_hash(previous, seq.token_ids[start:start + self.block_size])
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            block = self._blocks[block_id]
            if block.ref_count == 0:
                self._free.pop(block_id, None)
            block.ref_count += 1
            seq.block_table.append(block_id)
            hashes.append(block_hash)
            previous = block_hash
        self._block_hashes[seq.request_id] = hashes
        return len(hashes) * self.block_size

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow the block table to hold ``num_new_tokens`` more tokens. False if the pool is short."""
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed > len(self._free):
            return False
        for _ in range(needed):
            seq.block_table.append(self._take_free_block().block_id)
        return True

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: publish the blocks that the computed tokens have filled."""
        if not self.enable_prefix_caching:
            return
        hashes = self._block_hashes.setdefault(seq.request_id, [])
        num_full = seq.num_computed_tokens // self.block_size
        while len(hashes) < num_full:
            index = len(hashes)
            start = index * self.block_size
            block_hash = chained_block_hash(hashes[-1] if hashes else None,
                                            seq.token_ids[start:start + self.block_size])
            hashes.append(block_hash)
            block = self._blocks[seq.block_table[index]]
            if block_hash not in self._cached and block.content_hash is None:
                block.content_hash = block_hash
                self._cached[block_hash] = block.block_id

    def free(self, seq: Sequence) -> None:
        """Release a sequence's blocks. Tail blocks go first in line for reuse."""
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.content_hash is None:
                    self._free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._block_hashes.pop(seq.request_id, None)
