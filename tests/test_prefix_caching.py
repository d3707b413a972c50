"""Prefix caching through the engine: outputs with the cache are token for token those
without it (greedy and seeded, across batches, through chunked prefill and preemption, and for
n samples of one prompt), at TP 1 and 2; the n samples cost one prefill; and every block is
given back."""

from __future__ import annotations

import pytest

from tp_engine import Engine, SamplingParams

SYSTEM = [(11 * j) % 500 + 4 for j in range(40)]  # 2 full blocks of 16, and 8 tokens more
FIRST = [SYSTEM + [7, 8, 9], SYSTEM + list(range(100, 130)), [3] * 30, SYSTEM]
LATER = [SYSTEM + [12, 13], SYSTEM + [7, 8, 9], SYSTEM + list(range(100, 150))]
SAMPLED = [(13 * j) % 500 + 4 for j in range(47)]  # its own prefix: nothing cached before
PARAMS = [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
          SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True)]
N_PARAMS = SamplingParams(max_tokens=8, temperature=1.0, seed=3, n=3, ignore_eos=True)


def outputs(engine: Engine) -> list[list[int]]:
    """Two batches, the second finding the first's blocks, then n samples of a new prompt."""
    got = []
    for prompts in (FIRST, LATER):
        inputs = [{"prompt_token_ids": p} for p in prompts]
        params = [PARAMS[i % 2] for i in range(len(prompts))]
        got += [o.token_ids for o in engine.generate(inputs, params)]
    sampled = engine.generate({"prompt_token_ids": SAMPLED}, N_PARAMS)[0]
    return got + [o.token_ids for o in sampled.outputs]


def all_given_back(engine: Engine) -> None:
    stats = engine.core.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks"]
    for replica in engine.core.replicas:
        replica.blocks.check()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tp", [1, 2])
def test_outputs_with_the_cache_equal_outputs_without(tiny_model, tp):
    with Engine(tiny_model, tensor_parallel_size=tp, device="cpu",
                enable_prefix_caching=False) as engine:
        expected = outputs(engine)
        assert engine.core.stats()["prefix_cache_hits"] == 0
    with Engine(tiny_model, tensor_parallel_size=tp, device="cpu") as engine:
        assert outputs(engine) == expected
        stats = engine.core.stats()
        # blocks of 16 found: FIRST's 2nd and 4th share SYSTEM's 2 with the 1st (admitted in
        # the same step); LATER's 1st and 2nd find those 2, its 3rd all 4 of FIRST's 2nd; the
        # 2nd and 3rd of the n samples share the 1st's 2
        assert stats["prefix_cache_hits"] == 16 * (2 * 2 + (2 + 2 + 4) + 2 * 2)
        all_given_back(engine)
    # a 16-token budget cuts every prefill into chunks, and 12 blocks cannot hold the batch:
    # sequences are preempted, recomputed, and re-admitted from the cache
    with Engine(tiny_model, tensor_parallel_size=tp, device="cpu", max_num_batched_tokens=16,
                num_kv_blocks=12) as engine:
        assert outputs(engine) == expected
        stats = engine.core.stats()
        assert stats["preemptions"] > 0 and stats["prefix_cache_hits"] > 0
        all_given_back(engine)
