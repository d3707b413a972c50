"""The paged KV cache's bookkeeping: which blocks are free, which sequences hold each, and
(prefix caching) which full blocks hold which tokens.

Prefix caching: a full block is known by the hash of its tokens chained with the previous
block's hash, so a hash stands for the whole context up to the block's end, and with it for
the block's keys and values (one engine has one model and dtype, and a position's KV depends
only on the tokens up to it). A block is held by reference count; when the last holder lets it
go, a block with a hash stays findable until its room is needed, the least recently freed
first. A worker restart forgets every hash (`reset`): the new workers' cache is empty.

Free blocks without a hash are a stack: the most recently freed go out first, so the cache's
working set stays as small as the load. Its memory is mapped on first touch; taken in turn (a
queue), the blocks walked the whole cache (a quarter GB per CPU worker by default) and the
worker kept faulting in new pages: 2,900, 1,100 and 1,050 page faults in three batches of
64 requests of 128 tokens after a short one, against 1,800, 275 and then tens with a stack.
Cached blocks are taken only when that stack is empty: keeping a prefix is worth a page
fault."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


def chain_hash(previous: bytes, tokens: list[int]) -> bytes:
    """The hash of a full block: its tokens after the previous block's hash. SHA-256, so that
    no client can craft two contexts that share a block."""
    return hashlib.sha256(previous + array("i", tokens).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, caching: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self._free = list(range(num_blocks - 1, -1, -1))  # no hash, nobody's: block 0 on top
        self._cached: OrderedDict[int, None] = OrderedDict()  # hashed, nobody's: oldest first
        self._refs = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._block_of: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks nobody holds, cached ones included: they can be taken at once."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        """Blocks nobody holds that still keep a prefix."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks(self, table: list[int], num_tokens: int) -> int:
        """Blocks to add to `table` so that it holds `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(table))

    def cached_prefix(self, hashes: list[bytes]) -> list[int]:
        """The blocks that hold the longest prefix of `hashes` (a sequence's full blocks)."""
        blocks = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def allocate(self, table: list[int], cached: list[int], num_tokens: int) -> bool:
        """Start an empty `table` with the `cached` blocks (from cached_prefix), then grow it
        to `num_tokens`; False (and nothing taken) if short. A cached block nobody holds
        counts as free room until it is taken here."""
        assert not table
        idle = sum(self._refs[b] == 0 for b in cached)
        if self.blocks_for(num_tokens) - len(cached) > self.num_free - idle:
            return False
        for block in cached:
            if self._refs[block] == 0:
                del self._cached[block]
            self._refs[block] += 1
        table.extend(cached)
        return self.grow(table, num_tokens)

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Extend `table` in place to hold `num_tokens`; False (and nothing taken) if short."""
        need = self.extra_blocks(table, num_tokens)
        if need > self.num_free:
            return False
        if need:
            fresh = min(need, len(self._free))
            taken = self._free[len(self._free) - fresh:][::-1]
            del self._free[len(self._free) - fresh:]
            while len(taken) < need:  # the stack is empty: give up the oldest cached prefix
                block, _ = self._cached.popitem(last=False)
                del self._block_of[self._hash_of[block]]
                self._hash_of[block] = None
                taken.append(block)
            for block in taken:
                self._refs[block] = 1
            table.extend(taken)
        return True

    def register(self, table: list[int], hashes: list[bytes], start: int) -> None:
        """`table[start:len(hashes)]` now hold (or are being computed to hold) the blocks
        whose hashes these are: findable from now on. A block whose hash another block already
        has stays unnamed (the first keeps it)."""
        if not self.caching:
            return
        for i in range(start, len(hashes)):
            block, h = table[i], hashes[i]
            if self._hash_of[block] is None and h not in self._block_of:
                self._hash_of[block] = h
                self._block_of[h] = block

    def free(self, table: list[int]) -> None:
        """Let go of `table`'s blocks. Those nobody else holds become free, the last block
        first: a cached prefix is given up from its end."""
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if self._hash_of[block] is None:
                    self._free.append(block)  # its first block on top
                else:
                    self._cached[block] = None
        table.clear()

    def reset(self) -> None:
        """Forget every cached prefix (a new worker group: its cache holds nothing). Every
        block must be free."""
        assert not any(self._refs), "reset with blocks held"
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._cached.clear()
        self._hash_of = [None] * self.num_blocks
        self._block_of.clear()

    def check(self) -> None:
        """The invariants (for tests): each block is held, free or cached, exactly once, and
        the hash maps agree."""
        free, cached = set(self._free), set(self._cached)
        assert len(free) == len(self._free) and not free & cached
        for block, refs in enumerate(self._refs):
            assert refs >= 0
            assert (refs == 0) == (block in free or block in cached), block
            assert (block in free) <= (self._hash_of[block] is None)
            assert (block in cached) <= (self._hash_of[block] is not None)
        assert {b: h for b, h in enumerate(self._hash_of) if h is not None} == \
            {b: h for h, b in self._block_of.items()}
