"""Engine output equals transformers, and the scheduler never changes a result: batching,
chunked prefill and preemption give each request exactly what it gets alone."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from checkpoints import greedy, reference

from tp_engine import AsyncEngine, Engine, SamplingParams
from tp_engine.errors import InvalidRequestError

PROMPTS = [[5, 17, 33, 2, 9, 41, 11, 3, 60, 7, 21, 12], [8, 1, 44], [99, 4, 150, 23, 7],
           [3] * 30]
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def as_inputs(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_greedy_matches_transformers(hf_models, tp):
    for name, path in hf_models.items():
        with Engine(path, tensor_parallel_size=tp, device="cpu") as engine:
            outputs = engine.generate(as_inputs(PROMPTS), GREEDY)
        ref = reference(path)
        for prompt, out in zip(PROMPTS, outputs):
            assert out.token_ids == greedy(ref, prompt, 16), (name, tp, prompt)
            assert out.finish_reason == "length"


def test_runs_of_decode_steps_match_transformers_with_a_sliding_window(tmp_path):
    """A Mistral whose window (6) is shorter than the prompts, at TP 2: the decode runs (2, 4,
    8, then 16 steps from one message) mask the window step by step as transformers does;
    requests of different lengths end inside a run, and the run goes on without them."""
    from checkpoints import build

    from tp_engine.checkpoints.tiny import write_tokenizer

    path = build("mistral", tmp_path, vocab_size=300)
    write_tokenizer(path, "mistral", 300, 256)
    lengths = [40, 13, 27, 40]
    with Engine(str(path), tensor_parallel_size=2, device="cpu") as engine:
        params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
        outputs = engine.generate(as_inputs(PROMPTS), params)
    ref = reference(path)
    for prompt, n, out in zip(PROMPTS, lengths, outputs):
        assert out.token_ids == greedy(ref, prompt, n), (prompt, n)


@pytest.fixture(scope="module")
def engine(tiny_model):
    with Engine(tiny_model, tensor_parallel_size=2, device="cpu") as engine:
        yield engine


def test_batch_equals_each_alone_through_chunking_and_preemption(tiny_model, engine):
    prompts = [[(7 * i + j) % 500 + 4 for j in range(n)] for i, n in enumerate([40, 3, 17, 90])]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    alone = [engine.generate(as_inputs([p]), params)[0].token_ids for p in prompts]
    batched = [o.token_ids for o in engine.generate(as_inputs(prompts), params)]
    assert batched == alone
    # 16-token step budget cuts prefills into chunks; 14 blocks of 16 tokens cannot hold all
    # four sequences at full length, so the newest are preempted and recomputed
    with Engine(tiny_model, tensor_parallel_size=2, device="cpu", max_num_batched_tokens=16,
                num_kv_blocks=14) as small:
        squeezed = small.generate(as_inputs(prompts), params)
        assert small.core.stats()["preemptions"] > 0
    assert [o.token_ids for o in squeezed] == alone


def test_generate_admits_its_prompts_in_one_step(tiny_model, monkeypatch):
    """Queued one by one, the first prompt would start alone, a step ahead of the others (and
    the batch would then decode at two lengths): generate() queues them together, however
    long each takes to prepare (here 2 ms, so one-by-one queueing would always be seen). A
    fresh engine, so no step of an earlier test is still in flight."""
    prompts = [[(5 * i + j) % 300 + 4 for j in range(8 + i % 24)] for i in range(32)]
    with Engine(tiny_model, device="cpu") as engine:
        prepare = engine.core._request

        def slowly(*args, **kwargs):
            time.sleep(0.002)
            return prepare(*args, **kwargs)

        monkeypatch.setattr(engine.core, "_request", slowly)
        outputs = engine.generate(as_inputs(prompts), SamplingParams(max_tokens=1, temperature=0))
        assert [len(o.token_ids) for o in outputs] == [1] * 32
        assert engine.core.stats()["steps"] == 1


def test_the_blocks_freed_last_are_taken_first():
    """So the cache's working set stays as small as the load (memory already mapped, likely
    still in the CPU's caches), instead of a queue walking every block of the cache."""
    from tp_engine.engine.block_manager import BlockManager

    blocks = BlockManager(1000, 16)
    first, second = [], []
    assert blocks.grow(first, 40) and blocks.grow(second, 17)
    assert first == [0, 1, 2] and second == [3, 4]
    blocks.free(first)
    again = []
    assert blocks.grow(again, 64)
    assert again == [0, 1, 2, 5]
    assert not blocks.grow(again, 16 * 1000) and again == [0, 1, 2, 5]  # all or nothing
    blocks.free(again)
    blocks.free(second)
    assert blocks.num_free == 1000


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    seeded = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = engine.generate(as_inputs([PROMPTS[0]]), seeded)[0].token_ids
    others = [SamplingParams(max_tokens=24, temperature=1.0) for _ in range(3)]
    batch = engine.generate(as_inputs([PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[3]]),
                            [others[0], seeded, others[1], others[2]])
    assert batch[1].token_ids == alone
    other_seed = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=99)
    assert engine.generate(as_inputs([PROMPTS[0]]), other_seed)[0].token_ids != alone


def test_outputs_in_input_order_with_text(engine):
    prompts = ["Hello world", "The quick brown fox", {"prompt_token_ids": PROMPTS[1]}]
    outputs = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0,
                                                      ignore_eos=True))
    assert [o.prompt for o in outputs] == ["Hello world", "The quick brown fox", None]
    assert outputs[0].prompt_token_ids == engine.tokenizer.encode("Hello world")
    for out in outputs:
        assert len(out.token_ids) == 8
        assert out.text == engine.tokenizer.decode(out.token_ids)


def test_stop_conditions(engine):
    base = engine.generate(as_inputs([PROMPTS[0]]), GREEDY)[0]
    # a stop token id ends the output at its first occurrence
    stop_id = base.token_ids[5]
    out = engine.generate(as_inputs([PROMPTS[0]]), SamplingParams(
        max_tokens=16, temperature=0, ignore_eos=True, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == base.token_ids[:base.token_ids.index(stop_id) + 1]
    # a stop string is cut from the text, exactly, however it falls across tokens
    text = base.text
    needle = text[len(text) // 2:len(text) // 2 + 3]
    if needle.strip():
        out = engine.generate(as_inputs([PROMPTS[0]]), SamplingParams(
            max_tokens=16, temperature=0, ignore_eos=True, stop=[needle]))[0]
        assert out.finish_reason == "stop"
        assert out.text == text[:text.index(needle)]


def test_eos_from_generation_config_stops(engine):
    eos = engine.core.eos_token_ids
    assert eos, "the tiny model's generation_config names its EOS tokens"
    out = engine.generate(as_inputs([PROMPTS[0]]), SamplingParams(
        max_tokens=16, temperature=0, stop_token_ids=[]))[0]
    assert out.finish_reason in ("stop", "length")
    if out.finish_reason == "stop":
        assert out.token_ids[-1] in eos


@pytest.mark.parametrize("bad", [
    dict(prompt={"prompt_token_ids": []}),
    dict(prompt={"prompt_token_ids": [1, 10**6]}),
    dict(prompt={"prompt_token_ids": [1] * 600}),
    dict(params=dict(temperature=-1)),
    dict(params=dict(top_p=0)),
    dict(params=dict(max_tokens=0)),
    dict(params=dict(stop=[""])),
    dict(params=dict(seed=-3)),
])
def test_bad_input_raises_and_the_engine_keeps_serving(engine, bad):
    with pytest.raises(InvalidRequestError):
        params = SamplingParams(**bad.get("params", {})) if "params" in bad else GREEDY
        prompts = [{"prompt_token_ids": PROMPTS[0]}, bad.get("prompt", "fine")]
        engine.generate(prompts, params)
    assert engine.generate(as_inputs([PROMPTS[1]]), GREEDY)[0].finish_reason == "length"
    assert len(engine.core.registry) == 0  # nothing was queued


def test_openai_shapes(engine):
    messages = [{"role": "user", "content": "Hi there"}]
    reply = engine.chat.completions.create(messages=messages, max_tokens=6, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens <= 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    chunks = list(engine.chat.completions.create(messages=messages, max_tokens=6, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    completion = engine.completions.create(prompt="Once upon", max_tokens=5, temperature=0)
    streamed = engine.completions.create(prompt="Once upon", max_tokens=5, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens


def test_closing_a_stream_aborts_its_request(engine):
    stream = engine.completions.create(prompt="abc", max_tokens=400, temperature=0,
                                       ignore_eos=True, stream=True)
    next(stream)
    stream.close()
    stats = engine.core.stats
    for _ in range(100):
        idle = not (stats()["waiting"] or stats()["running"])
        if idle and stats()["kv_blocks_free"] == stats()["kv_blocks"]:
            break
        asyncio.run(asyncio.sleep(0.01))
    assert stats()["kv_blocks_free"] == stats()["kv_blocks"]
    assert len(engine.core.registry) == 0


def test_async_engine_serves_many_concurrent_requests(tiny_model):
    async def main():
        with AsyncEngine(tiny_model, tensor_parallel_size=2, device="cpu") as engine:
            async def one(i):
                if i % 2:
                    reply = await engine.completions.create(prompt=f"n{i}", max_tokens=8,
                                                            temperature=0, ignore_eos=True)
                    return reply.choices[0].text
                stream = await engine.chat.completions.create(
                    messages=[{"role": "user", "content": f"n{i}"}], max_tokens=8,
                    temperature=0, ignore_eos=True, stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in stream])
            texts = await asyncio.gather(*(one(i) for i in range(24)))
            again = await one(3)
            return texts, again
    texts, again = asyncio.run(main())
    assert len(texts) == 24 and again == texts[3]


def test_from_config_reads_the_yaml_keys(tiny_model):
    path = Path(__file__).parents[1] / "configs" / "tiny.yaml"
    with Engine.from_config(path, model=tiny_model, max_num_seqs=8) as engine:
        assert engine.config.tensor_parallel_size == 2
        assert engine.config.max_num_seqs == 8
        assert engine.generate("hi", GREEDY)[0].finish_reason == "length"
