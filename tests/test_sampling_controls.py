"""Rank 0's sampling controls through the Python API, against their definitions computed on
transformers' logits of the same checkpoint: logprobs and prompt logprobs, the penalties,
logit bias and min_tokens (inside runs of decode steps too), n and best_of, and structured
output that a random model must follow."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from checkpoints import reference

from tp_engine import Engine, SamplingParams

pytestmark = pytest.mark.timeout(240)

PROMPT = [5, 17, 33, 2, 9, 17, 40, 5]
STEPS = 24


@pytest.fixture(scope="module")
def hf(hf_models):
    return reference(hf_models["llama"])


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def engine(request, hf_models):
    with Engine(hf_models["llama"], tensor_parallel_size=request.param, device="cpu",
                dtype="float32", seed=0) as llm:
        yield llm


@torch.no_grad()
def reference_greedy(hf, prompt: list[int], steps: int, process) -> list[int]:
    """Greedy decoding where `process(logits, output)` shapes each step's logits."""
    ids, out = list(prompt), []
    for _ in range(steps):
        logits = hf(torch.tensor([ids])).logits[0, -1].float()
        token = int(process(logits.clone(), out).argmax())
        out.append(token)
        ids.append(token)
    return out


def counts(out: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(out, dtype=torch.long), minlength=vocab).float()


def repetition(penalty: float):
    def process(row, out):
        seen = torch.zeros_like(row, dtype=torch.bool)
        seen[torch.tensor(PROMPT + out)] = True
        row[seen] = torch.where(row[seen] > 0, row[seen] / penalty, row[seen] * penalty)
        return row
    return process


def frequency(penalty: float):
    return lambda row, out: row - penalty * counts(out, row.shape[0])


def presence(penalty: float):
    return lambda row, out: row - penalty * (counts(out, row.shape[0]) > 0)


def bias(biases: dict[int, float]):
    def process(row, out):
        for token, value in biases.items():
            row[token] += value
        return row
    return process


def plain(row, out):
    return row


CONTROLS = {  # SamplingParams keywords -> the same on transformers' logits
    "repetition_penalty": (dict(repetition_penalty=1.8), repetition(1.8)),
    "frequency_penalty": (dict(frequency_penalty=1.5), frequency(1.5)),
    "presence_penalty": (dict(presence_penalty=1.5), presence(1.5)),
    "logit_bias": (dict(logit_bias={7: 100.0}), bias({7: 100.0})),
}


def test_each_control_changes_greedy_output_as_defined(engine, hf):
    base = reference_greedy(hf, PROMPT, STEPS, plain)
    params = [SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True, **kw)
              for kw, _ in CONTROLS.values()]
    # all at once, with a plain request beside them: one batch, runs of decode steps
    outs = engine.generate([{"prompt_token_ids": PROMPT}] * (len(params) + 1),
                           [*params, SamplingParams(max_tokens=STEPS, temperature=0,
                                                    ignore_eos=True)])
    assert outs[-1].token_ids == base
    for (name, (_, process)), out in zip(CONTROLS.items(), outs):
        expected = reference_greedy(hf, PROMPT, STEPS, process)
        assert out.token_ids == expected, name
        assert expected != base, f"{name} changed nothing: a weak test"
    assert outs[3].token_ids == [7] * STEPS  # a +100 bias forces its token


def test_negative_bias_bans_and_min_tokens_holds_back_a_stop(engine, hf):
    base = reference_greedy(hf, PROMPT, STEPS, plain)
    banned = engine.generate({"prompt_token_ids": PROMPT}, SamplingParams(
        max_tokens=STEPS, temperature=0, ignore_eos=True, logit_bias={base[0]: -100}))[0]
    assert base[0] not in banned.token_ids[:1]
    assert banned.token_ids == reference_greedy(hf, PROMPT, STEPS, bias({base[0]: -100}))
    stop = base[2]  # the third greedy token stops the request...
    stopped = engine.generate({"prompt_token_ids": PROMPT}, SamplingParams(
        max_tokens=STEPS, temperature=0, stop_token_ids=[stop]))[0]
    assert stopped.token_ids == base[:3] and stopped.finish_reason == "stop"
    held = engine.generate({"prompt_token_ids": PROMPT}, SamplingParams(
        max_tokens=STEPS, temperature=0, stop_token_ids=[stop], min_tokens=8))[0]

    def no_stop_before_8(row, out):  # ...unless min_tokens holds it back
        if len(out) < 8:
            row[stop] = float("-inf")
        return row
    expected = reference_greedy(hf, PROMPT, STEPS, no_stop_before_8)
    end = next((i for i, t in enumerate(expected) if t == stop and i >= 8), STEPS - 1)
    assert held.token_ids == expected[:end + 1]
    assert len(held.token_ids) > 3


@torch.no_grad()
def test_logprobs_equal_transformers_log_softmax(engine, hf):
    out = engine.generate({"prompt_token_ids": PROMPT}, SamplingParams(
        max_tokens=12, temperature=0, ignore_eos=True, logprobs=5, prompt_logprobs=3))[0]
    ids = PROMPT + out.token_ids
    expected = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    assert len(out.logprobs) == 12 and out.prompt_logprobs[0] is None
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = expected[len(PROMPT) - 1 + i]
        assert len(entry) in (5, 6) and token in entry
        assert set(row.topk(5).indices.tolist()) <= set(entry)
        for t, lp in entry.items():
            assert abs(lp - float(row[t])) < 1e-4
    for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert PROMPT[i] in entry
        for t, lp in entry.items():
            assert abs(lp - float(expected[i - 1, t])) < 1e-4
    echo = engine.generate({"prompt_token_ids": PROMPT},
                           SamplingParams(max_tokens=0, prompt_logprobs=1))[0]
    assert echo.token_ids == [] and echo.text == "" and len(echo.prompt_logprobs) == len(PROMPT)
    for token, mine, theirs in zip(PROMPT[1:], echo.prompt_logprobs[1:], out.prompt_logprobs[1:]):
        assert abs(mine[token] - theirs[token]) < 1e-6


def test_n_samples_differ_repeat_with_a_seed_and_best_of_ranks(engine):
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=11, n=3, ignore_eos=True)
    first = engine.generate({"prompt_token_ids": PROMPT}, params)[0]
    again = engine.generate({"prompt_token_ids": PROMPT}, params)[0]
    samples = [o.token_ids for o in first.outputs]
    assert len(samples) == 3 and len({tuple(s) for s in samples}) == 3
    assert samples == [o.token_ids for o in again.outputs]
    one = engine.generate({"prompt_token_ids": PROMPT}, SamplingParams(
        max_tokens=10, temperature=1.0, seed=11, ignore_eos=True))[0]
    assert one.token_ids == samples[0]  # the first sample is the request's own seed
    best = engine.generate({"prompt_token_ids": PROMPT}, SamplingParams(
        max_tokens=10, temperature=1.0, seed=11, n=2, best_of=5, ignore_eos=True))[0]
    wide = engine.generate({"prompt_token_ids": PROMPT}, SamplingParams(
        max_tokens=10, temperature=1.0, seed=11, n=5, ignore_eos=True, logprobs=0))[0]
    ranked = sorted(wide.outputs, key=lambda o: -o.cumulative_logprob)[:2]
    assert [o.token_ids for o in best.outputs] == [o.token_ids for o in ranked]
    assert best.outputs[0].logprobs is None  # not asked for


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "maxItems": 3,
                                  "items": {"enum": ["a", "b", "c"]}}}}


def test_structured_output_is_valid_from_a_random_model(tiny_model):
    with Engine(tiny_model, device="cpu", dtype="float32") as llm:
        schema, regex, choice = [llm.generate("hello", SamplingParams(
            max_tokens=80, temperature=1.0, seed=seed, **kw))[0] for seed, kw in enumerate(
                [dict(json_schema=SCHEMA), dict(regex=r"[0-9]{3}-[a-z]{2}"),
                 dict(choice=["red", "green", "blue"])])]
        jsonschema.validate(json.loads(schema.text), SCHEMA)
        assert schema.finish_reason == "stop"
        assert len(regex.text) == 6 and regex.text[3] == "-" and regex.text[:3].isdigit()
        assert choice.text in ("red", "green", "blue")
        many = llm.generate(["a", "b", "c", "d"], SamplingParams(
            max_tokens=80, temperature=1.0, seed=3, json_object=True))
        for out in many:
            assert isinstance(json.loads(out.text), dict)
        with pytest.raises(ValueError, match="structured output"):
            llm.generate("x", SamplingParams(regex="a(b"))
        assert llm.generate("x", SamplingParams(max_tokens=2))[0].token_ids  # still serving


def test_rank0_state_survives_preemption(hf_models):
    """A preempted sequence is recomputed from its tokens, and rank 0 rebuilds its state
    (penalty counts, the grammar's position) from them: the outputs equal a roomy run's."""
    params = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                             frequency_penalty=1.0, presence_penalty=0.5),
              SamplingParams(max_tokens=40, temperature=1.0, seed=7, ignore_eos=True,
                             repetition_penalty=1.3, logprobs=2),
              SamplingParams(max_tokens=40, temperature=1.0, seed=8, regex=r"[a-z]{10,30}")]
    prompts = [{"prompt_token_ids": [5 + i, 17, 33, 2, 9, 40 + i]} for i in range(12)]
    every = [params[i % 3] for i in range(12)]
    outputs = {}
    for blocks in (None, 12):  # 12 blocks of 16 for 12 sequences of up to 46 tokens: preempts
        with Engine(hf_models["llama"], device="cpu", dtype="float32",
                    num_kv_blocks=blocks) as llm:
            outputs[blocks] = llm.generate(prompts, every)
            preempted = llm.core.stats()["preemptions"]
        if blocks:
            assert preempted > 0, "no preemption: the test shows nothing"
    for roomy, tight in zip(outputs[None], outputs[12]):
        assert tight.token_ids == roomy.token_ids
        for mine, theirs in zip(tight.logprobs or [], roomy.logprobs or []):  # other batches:
            assert mine.keys() == theirs.keys()                              # other rounding
            assert all(abs(mine[t] - theirs[t]) < 1e-4 for t in mine)
