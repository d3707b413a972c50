"""Where a data-parallel engine places a request: the live replica with the most free room,
its claims counted from placement and released as the request loop finishes sequences."""

from __future__ import annotations

from types import SimpleNamespace

from tp_engine.engine.block_manager import BlockManager
from tp_engine.engine.replica import Replica, choose
from tp_engine.engine.sampling_params import SamplingParams
from tp_engine.engine.scheduler import Sequence

MAX_MODEL_LEN = 256


def replica(index: int, num_blocks: int = 32) -> Replica:
    loop = SimpleNamespace(released=0)  # what RequestLoop._forget adds to
    return Replica(index, None, BlockManager(num_blocks, 16), None, loop)


def seq(seq_id: int, prompt: int, max_tokens: int) -> Sequence:
    return Sequence(seq_id, [1] * prompt, prompt, SamplingParams(), max_tokens)


def place(replicas: list[Replica], seqs: list[Sequence]) -> Replica:
    chosen = choose(replicas)
    chosen.place(seqs, MAX_MODEL_LEN)
    return chosen


def test_a_burst_alternates_and_a_big_request_weighs_more():
    replicas = [replica(0), replica(1)]
    order = [place(replicas, [seq(i, 16, 16)]).index for i in range(4)]
    assert order == [0, 1, 0, 1]  # equal room: the first of equals
    big = seq(9, 100, 60)  # 160 tokens: 10 blocks
    assert place(replicas, [big]).index == 0 and big.claim == 10
    assert [place(replicas, [seq(10 + i, 16, 16)]).index for i in range(5)] == [1] * 5


def test_claims_are_capped_at_max_model_len_and_samples_stay_together():
    replicas = [replica(0), replica(1)]
    samples = [seq(i, 8, 10_000) for i in range(3)]  # n=3, max_tokens past the context
    assert place(replicas, samples).index == 0
    assert [s.claim for s in samples] == [MAX_MODEL_LEN // 16] * 3
    assert replicas[0].room == 32 - 3 * 16


def test_released_claims_free_room_and_failed_replicas_get_nothing():
    replicas = [replica(0), replica(1)]
    first = seq(0, 64, 64)
    place(replicas, [first])
    assert place(replicas, [seq(1, 16, 0)]).index == 1
    replicas[0].loop.released += first.claim  # it finished
    assert replicas[0].room == 32 and place(replicas, [seq(2, 16, 0)]).index == 0
    replicas[0].failure = RuntimeError("group 0 died")
    assert {place(replicas, [seq(3 + i, 16, 0)]).index for i in range(4)} == {1}
    replicas[1].failure = RuntimeError("group 1 died")
    assert choose(replicas) is None
