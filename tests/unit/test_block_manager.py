"""The KV cache's bookkeeping alone: BlockManager under random grows and frees."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tp_engine.engine.block_manager import BlockManager

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
