"""The KV cache's bookkeeping alone: BlockManager under random grows and frees, and with
prefix caching under random sequences that share prefixes."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tp_engine.engine.block_manager import BlockManager, chain_hash

SETTINGS = dict(derandomize=True, deadline=None, database=None)


class Blocks(RuleBasedStateMachine):
    """Tables grown and freed at random, against a model of the free list as a stack: the
    block handed out next is the one freed last (a freed table's first block on top), and a
    fresh manager hands out 0, 1, 2..."""

    @initialize(num_blocks=st.integers(1, 24), block_size=st.integers(1, 8))
    def start(self, num_blocks, block_size):
        self.bm = BlockManager(num_blocks, block_size)
        self.next_out = list(range(num_blocks))  # the free blocks, the next one out first
        self.tables: list[list[int]] = []

    @rule(tokens=st.integers(0, 100))
    def new_table(self, tokens):
        self.tables.append([])
        self.grow(len(self.tables) - 1, tokens)

    @precondition(lambda self: self.tables)
    @rule(i=st.integers(0, 1000), tokens=st.integers(0, 100))
    def grow(self, i, tokens):
        table = self.tables[i % len(self.tables)]
        before, free_before = list(table), list(self.bm._free)
        need = self.bm.extra_blocks(table, tokens)
        assert need == max(0, self.bm.blocks_for(tokens) - len(before))
        if self.bm.grow(table, tokens):
            assert need <= len(free_before)
            assert table == before + self.next_out[:need]  # the most recently freed first
            del self.next_out[:need]
            assert len(table) * self.bm.block_size >= tokens
            assert len(table) == max(len(before), self.bm.blocks_for(tokens))
        else:  # nothing taken, nothing changed
            assert need > len(free_before)
            assert table == before and self.bm._free == free_before

    @precondition(lambda self: self.tables)
    @rule(i=st.integers(0, 1000))
    def free(self, i):
        table = self.tables.pop(i % len(self.tables))
        freed = list(table)
        self.bm.free(table)
        assert table == []
        self.next_out[:0] = freed  # its first block out first

    @invariant()
    def every_block_free_or_owned_once(self):
        if not hasattr(self, "bm"):
            return
        owned = [b for table in self.tables for b in table]
        assert len(owned) + self.bm.num_free == self.bm.num_blocks
        assert sorted(owned + self.bm._free) == list(range(self.bm.num_blocks))
        assert self.bm._free[::-1] == self.next_out
        assert self.bm.usage == 1 - self.bm.num_free / self.bm.num_blocks


TestBlocks = Blocks.TestCase
TestBlocks.settings = settings(max_examples=150, stateful_step_count=30, **SETTINGS)


@settings(max_examples=200, **SETTINGS)
@given(block_size=st.integers(1, 64), tokens=st.integers(0, 10_000), have=st.integers(0, 400))
def test_blocks_for_and_extra_blocks(block_size, tokens, have):
    bm = BlockManager(1, block_size)
    b = bm.blocks_for(tokens)
    assert b * block_size >= tokens and (b == 0 or (b - 1) * block_size < tokens)  # the fewest
    assert bm.extra_blocks([0] * have, tokens) == max(0, b - have)


def test_a_fresh_manager_hands_out_block_0_first_and_reuses_the_last_freed():
    bm = BlockManager(8, 4)
    a, b = [], []
    assert bm.grow(a, 9) and a == [0, 1, 2]
    assert bm.grow(b, 4) and b == [3]
    bm.free(a)
    bm.free(b)
    c = []
    assert bm.grow(c, 16) and c == [3, 0, 1, 2]  # b (freed last) first, then a, in order
    assert bm.usage == 0.5


def test_a_grow_that_cannot_be_met_takes_nothing():
    bm = BlockManager(3, 2)
    a, b = [], []
    assert bm.grow(a, 4)
    assert not bm.grow(b, 3) and b == [] and bm.num_free == 1
    assert not bm.grow(a, 7) and a == [0, 1] and bm.num_free == 1
    assert bm.grow(a, 6) and a == [0, 1, 2] and bm.num_free == 0
    assert bm.grow(a, 5) and a == [0, 1, 2]  # already holds it: nothing to take


def hashes(tokens: list[int], block_size: int) -> list[bytes]:
    out = []
    for at in range(0, len(tokens) - block_size + 1, block_size):
        out.append(chain_hash(out[-1] if out else b"", tokens[at:at + block_size]))
    return out


class CachedBlocks(RuleBasedStateMachine):
    """Sequences over a two-token alphabet (so prefixes are shared often) start from their
    cached prefix, name their full blocks, and end. A shadow of the cache records what each
    block holds when written (the whole context up to its end): a block found in the cache
    always holds exactly the context its finder asked for, and counts stay exact."""

    @initialize(num_blocks=st.integers(1, 16), block_size=st.integers(1, 4))
    def start(self, num_blocks, block_size):
        self.bm = BlockManager(num_blocks, block_size, caching=True)
        self.tables: list[list[int]] = []
        self.holds: dict[int, tuple[int, ...] | None] = {}  # block -> its context, if full

    @rule(tokens=st.lists(st.integers(0, 1), min_size=1, max_size=24))
    def admit(self, tokens):
        bs = self.bm.block_size
        full = hashes(tokens, bs)
        cached = self.bm.cached_prefix(full[:(len(tokens) - 1) // bs])
        for i, block in enumerate(cached):  # what it reads is what it would have written
            assert self.holds[block] == tuple(tokens[:(i + 1) * bs])
        free_before, table = self.bm.num_free, []
        if not self.bm.allocate(table, cached, len(tokens)):
            assert table == [] and self.bm.num_free == free_before
            return
        assert table[:len(cached)] == cached and len(set(table)) == len(table)
        for i in range(len(cached), len(table)):  # computed now
            self.holds[table[i]] = tuple(tokens[:(i + 1) * bs]) if i < len(full) else None
        self.bm.register(table, full, len(cached))
        self.tables.append(table)

    @precondition(lambda self: self.tables)
    @rule(i=st.integers(0, 1000))
    def finish(self, i):
        table = self.tables.pop(i % len(self.tables))
        self.bm.free(table)
        assert table == []

    @precondition(lambda self: not self.tables)
    @rule()
    def restart(self):
        self.bm.reset()
        assert self.bm.num_cached == 0 and self.bm.num_free == self.bm.num_blocks

    @invariant()
    def counts_are_exact(self):
        if not hasattr(self, "bm"):
            return
        self.bm.check()
        held = Counter(b for table in self.tables for b in table)
        assert held == Counter({b: r for b, r in enumerate(self.bm._refs) if r})
        assert len(held) + self.bm.num_free == self.bm.num_blocks


TestCachedBlocks = CachedBlocks.TestCase
TestCachedBlocks.settings = settings(max_examples=150, stateful_step_count=30, **SETTINGS)


def cached_block(bm: BlockManager, tokens: list[int]) -> list[int]:
    """Admit `tokens` (full blocks only), name them, and let them go: a cached prefix."""
    table = []
    assert bm.allocate(table, [], len(tokens))
    bm.register(table, hashes(tokens, bm.block_size), 0)
    blocks = list(table)
    bm.free(table)
    return blocks


def test_a_cached_prefix_is_given_up_only_when_no_plain_block_is_left_oldest_first():
    bm = BlockManager(4, 2, caching=True)
    a, b, c = ([t, t] for t in range(3))
    assert [cached_block(bm, x) for x in (a, b, c)] == [[0], [1], [2]]
    assert bm.num_cached == 3 and bm.num_free == 4
    d = []
    assert bm.grow(d, 2) and d == [3]  # the plain block first
    assert bm.grow(d, 4) and d == [3, 0]  # then a's, the oldest
    assert bm.cached_prefix(hashes(a, 2)) == []
    assert bm.cached_prefix(hashes(b, 2)) == [1] and bm.cached_prefix(hashes(c, 2)) == [2]
    held = []  # b found again: held, so never given up
    assert bm.allocate(held, [1], 3) and held == [1, 2]
    assert bm.cached_prefix(hashes(c, 2)) == []  # c's went to the new block
    assert not bm.grow(d, 6) and d == [3, 0]  # nothing left
    bm.free(held)
    bm.free(d)
    bm.check()
    assert bm.num_free == 4 and bm.cached_prefix(hashes(b, 2)) == [1]


def test_an_idle_cached_block_counts_as_room_for_the_sequence_that_finds_it():
    bm = BlockManager(2, 2, caching=True)
    (block,) = cached_block(bm, [5, 6])
    table = []  # 2 blocks wanted, 2 free; one of them is the cached one it reuses
    assert bm.allocate(table, [block], 4) and table[0] == block and bm.num_free == 0
    other = []
    assert not bm.allocate(other, [block], 4) and other == [] and bm._refs[block] == 1
    bm.free(table)
    assert bm.num_free == 2 and bm.num_cached == 1


def test_samples_share_blocks_and_a_block_is_named_once():
    bm = BlockManager(8, 2, caching=True)
    tokens = [1, 2, 3, 4, 5]
    full = hashes(tokens, 2)
    first = []
    assert bm.allocate(first, [], 5)
    bm.register(first, full, 0)
    second = []  # another sample: its full blocks from the first, its last block its own
    assert bm.allocate(second, bm.cached_prefix(full), 5)
    assert second[:2] == first[:2] and second[2] != first[2]
    assert bm._refs[first[0]] == 2
    twin = []  # the same blocks computed apart (prompt logprobs): the first keeps the name
    assert bm.allocate(twin, [], 4)
    bm.register(twin, full, 0)
    assert bm.cached_prefix(full) == first[:2]
    for table in (first, second, twin):
        bm.free(table)
    bm.check()
    assert bm.num_free == 8 and bm.num_cached == 2


def test_reset_forgets_every_prefix_and_refuses_while_blocks_are_held():
    bm = BlockManager(4, 2, caching=True)
    cached_block(bm, [1, 1])
    held = []
    bm.grow(held, 1)
    with pytest.raises(AssertionError):
        bm.reset()
    bm.free(held)
    bm.reset()
    assert bm.cached_prefix(hashes([1, 1], 2)) == [] and bm._free == [3, 2, 1, 0]


def test_without_caching_nothing_is_named():
    bm = BlockManager(4, 2)
    table = []
    bm.allocate(table, [], 4)
    bm.register(table, hashes([1, 2, 3, 4], 2), 0)
    bm.free(table)
    assert bm.num_cached == 0 and bm.cached_prefix(hashes([1, 2, 3, 4], 2)) == []
