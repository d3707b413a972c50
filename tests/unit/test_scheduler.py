"""The scheduler alone, no processes: how long its runs of decode steps are, and what a
worker restart does to the prefix cache."""

from __future__ import annotations

import pytest

from tp_engine.engine.block_manager import BlockManager
from tp_engine.engine.sampling_params import SamplingParams
from tp_engine.engine.scheduler import Scheduler, Sequence

RUN_SECONDS = 0.1


def decoding(step_seconds: float, decode_steps: int = 16) -> tuple[Scheduler, list[Sequence]]:
    """A scheduler with two sequences already decoding (prompt computed, one token in)."""
    scheduler = Scheduler(BlockManager(64, 4), 8, 256, 1024, decode_steps, RUN_SECONDS)
    seqs = []
    for i in range(2):
        seq = Sequence(i, [1, 2, 3, 4], 3, SamplingParams(max_tokens=500), 500)
        seq.num_computed = 3
        scheduler.blocks.grow(seq.block_table, 3)
        scheduler.running.append(seq)
        seqs.append(seq)
    if step_seconds:
        scheduler.observe_decode(step_seconds)
    return scheduler, seqs


def run_lengths(scheduler: Scheduler, seqs: list[Sequence], runs: int) -> list[int]:
    """Each run's length, as the request loop would see them (each run done before the next
    is scheduled: its tokens appended, its positions computed)."""
    lengths = []
    for _ in range(runs):
        batch, steps, _ = scheduler.schedule()
        k = max(steps, default=1)
        lengths.append(k)
        for seq, _ in batch:
            seq.token_ids.extend([7] * k)
            seq.num_computed = len(seq.token_ids) - 1
    return lengths


def test_runs_double_up_to_decode_steps_when_steps_are_fast():
    scheduler, seqs = decoding(step_seconds=0.001)
    assert run_lengths(scheduler, seqs, 6) == [2, 4, 8, 16, 16, 16]


@pytest.mark.parametrize("step_seconds", [0.02, 0.04, 0.2])
def test_a_run_is_kept_to_run_seconds_of_slow_steps(step_seconds):
    """A real model's decode step takes tens of milliseconds here: a run of 16 would make a
    new request wait, and an ended sequence compute, for seconds."""
    scheduler, seqs = decoding(step_seconds)
    longest = max(1, int(RUN_SECONDS / step_seconds))
    lengths = run_lengths(scheduler, seqs, 6)
    assert max(lengths) == min(16, longest)
    assert all(k * step_seconds <= max(RUN_SECONDS, step_seconds) for k in lengths)


def test_without_run_seconds_only_decode_steps_bounds_a_run():
    scheduler, seqs = decoding(step_seconds=0.2)
    scheduler.run_seconds = None
    assert run_lengths(scheduler, seqs, 5) == [2, 4, 8, 16, 16]


def test_the_step_time_is_a_moving_average():
    scheduler, _ = decoding(step_seconds=0.01)
    scheduler.observe_decode(1.0)  # one slow step (a stall) moves it, but not all the way
    assert 0.01 < scheduler.step_seconds < 0.5


def test_a_restart_requeues_everything_and_forgets_the_prefix_cache():
    """The new workers' cache is empty: no sequence may start from a block named before."""
    scheduler = Scheduler(BlockManager(16, 2, caching=True), 8, 256, 1024, 1)
    prompt = [1, 2, 3, 4, 5]
    first, second = (Sequence(i, list(prompt), 5, SamplingParams(max_tokens=4), 4)
                     for i in range(2))
    scheduler.add(first)
    scheduler.add(second)
    batch, _, _ = scheduler.schedule()
    assert [n for _, n in batch] == [5, 1] and second.num_computed == 4  # shared blocks 0-1
    scheduler.requeue_all()
    assert scheduler.blocks.num_cached == 0 and scheduler.blocks.num_free == 16
    batch, _, _ = scheduler.schedule()
    assert [n for _, n in batch] == [5, 1]  # all recomputed, the second shares again
    assert scheduler.prefix_hits == 8 and scheduler.prefix_queries == 20
