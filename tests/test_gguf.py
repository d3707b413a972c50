"""GGUF checkpoints written by the tests with the gguf package, one for each tensor type, load
and match transformers (which reads the same file with `gguf_file=`); through the engine at
TP 2 too; a corrupt or unsupported file fails clearly, before any worker starts."""

from __future__ import annotations

import pytest
import torch
from checkpoints import greedy
from conftest import snapshot
from gguf_checkpoints import write_gguf
from ranks import run_ranks

from tp_engine import Engine, SamplingParams
from tp_engine.errors import ConfigError
from tp_engine.model.attention import AttentionMetadata
from tp_engine.model.loader import load_model
from tp_engine.model.parallel import TensorParallel

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]
PROMPT = [5, 17, 33, 2, 9, 41, 11, 3, 60, 7, 21, 12, 200, 145]
BLOCK = 16


def transformers_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()


def prompt_logits(tp: TensorParallel, path) -> torch.Tensor | None:
    """Every position's logits of PROMPT, one prefill through the paged cache (rank 0)."""
    model = load_model(path, tp, torch.float32)
    heads = model.model.layers[0].self_attn.num_kv_heads
    caches = [torch.zeros(2, heads, 4 * BLOCK, model.config.head_dim)
              for _ in range(model.config.num_layers)]
    meta = AttentionMetadata.build([0], [len(PROMPT)], [[2, 0, 3, 1]], BLOCK)
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(PROMPT), meta.positions, caches, meta))


def assert_logits_match(got: torch.Tensor, path) -> None:
    """`got` (our float32 logits) against transformers' forward of the same file in float64,
    within 1e-5 of the largest logit or three times transformers' own float32 error, whichever
    is larger. A random model amplifies float32's rounding: on the Q6_K file transformers'
    float32 logits lie 7.6e-6 of the largest from its float64 ones, and a float32 forward that
    sums in another order can land twice as far, on the other side."""
    model, ids = transformers_model(path), torch.tensor([PROMPT])
    with torch.no_grad():
        single = model(ids).logits[0].double()
        exact = model.double()(ids).logits[0]
    scale = exact.abs().max().item()
    bound = max(1e-5 * scale, 3 * (single - exact).abs().max().item())
    torch.testing.assert_close(got.double(), exact, atol=bound, rtol=0, msg=str(path.name))


@pytest.mark.parametrize("qtype", TYPES)
def test_each_tensor_type_matches_transformers(tmp_path, qtype):
    path = write_gguf(tmp_path / f"llama-{qtype}.gguf", qtype)
    assert_logits_match(prompt_logits(TensorParallel(0, 1), path), path)


@pytest.mark.parametrize("arch, qtype", [("llama", "Q4_K"), ("qwen2", "Q8_0")])
def test_row_shards_match_transformers_at_tp_2(tmp_path, arch, qtype):
    """Each rank dequantizes only its rows of q, k, v, gate, up and the embedding (the Llama
    q/k rows put back in Hugging Face's order head by head); Qwen2: q/k/v biases, tied."""
    path = write_gguf(tmp_path / f"{arch}.gguf", qtype, arch, tied=arch == "qwen2")
    assert_logits_match(run_ranks(2, prompt_logits, path), path)


def test_greedy_through_the_engine_at_tp_2(tmp_path):
    path = write_gguf(tmp_path / "llama.gguf", "Q4_1")
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    with Engine(str(path), tensor_parallel_size=2, device="cpu") as engine:
        out = engine.generate([{"prompt_token_ids": PROMPT}, "hello hello"], params)
        text_ids = engine.core.tokenizer.encode("hello hello")
    ref = transformers_model(path)
    assert out[0].token_ids == greedy(ref, PROMPT, 16)
    assert out[1].token_ids == greedy(ref, text_ids, 16)
    # a directory holding one GGUF file is the same checkpoint
    with Engine(str(tmp_path), device="cpu") as engine:
        assert engine.generate([{"prompt_token_ids": PROMPT}], params)[0].token_ids == \
            out[0].token_ids


def test_a_truncated_file_names_the_file_and_tensor_and_leaves_nothing(tmp_path):
    path = write_gguf(tmp_path / "whole.gguf", "Q8_0")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    before = snapshot()
    with pytest.raises(ConfigError, match=r"cut\.gguf: tensor \S+ runs past the end"):
        Engine(str(cut), tensor_parallel_size=2, device="cpu")
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ConfigError, match=r"header\.gguf: the header ends early"):
        Engine(str(header_only), device="cpu")
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(ConfigError, match=r"text\.gguf: not a GGUF file"):
        Engine(str(not_gguf), device="cpu")
    assert snapshot() == before


def test_an_unsupported_tensor_type_is_named_before_any_worker_starts(tmp_path):
    path = write_gguf(tmp_path / "q5.gguf", "Q5_0")
    before = snapshot()
    with pytest.raises(ConfigError, match=r"q5\.gguf: tensor token_embd\.weight: type Q5_0 is "
                                          r"not supported \(F32, F16, BF16, Q8_0"):
        Engine(str(path), tensor_parallel_size=2, device="cpu")
    assert snapshot() == before


def test_a_directory_with_two_gguf_files_asks_which(tmp_path):
    write_gguf(tmp_path / "a.gguf", "F16")
    write_gguf(tmp_path / "b.gguf", "F16")
    with pytest.raises(ConfigError, match="several GGUF files.*a.gguf, b.gguf"):
        Engine(str(tmp_path), device="cpu")
