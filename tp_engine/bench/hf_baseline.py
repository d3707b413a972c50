"""The baseline: transformers' `generate` on the same checkpoint and the same requests.

transformers is imported here only, when a benchmark asks for the baseline; the runtime never
imports it. A padded batch generates max(max_tokens) tokens for every row, so only the tokens
each request asked for are counted, exactly as on the engine's side."""

from __future__ import annotations

import time

import torch

from tp_engine.bench.common import Request


def load(path: str) -> torch.nn.Module:
    """The checkpoint in float32: a Hugging Face directory, or a GGUF file (transformers
    dequantizes it as the engine does)."""
    from transformers import AutoModelForCausalLM

    from tp_engine.model.gguf_file import find_gguf

    gguf = find_gguf(path)
    if gguf is not None:
        return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                    dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def generate(model: torch.nn.Module, requests: list[Request], batch_size: int,
             pad_id: int = 0) -> tuple[float, int, list[list[int]]]:
    """Greedy, EOS ignored, batches taken in workload order and left-padded. Returns (seconds,
    requested tokens, each request's requested tokens)."""
    from transformers import GenerationConfig

    outputs: list[list[int]] = []
    start = time.perf_counter()
    for first in range(0, len(requests), batch_size):
        batch = requests[first:first + batch_size]
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, r in enumerate(batch):
            ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[row, width - len(r.prompt_ids):] = 1
        new = max(r.max_tokens for r in batch)
        config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                  eos_token_id=None, bos_token_id=None, pad_token_id=pad_id)
        model.generation_config = config  # else generate merges in the checkpoint's EOS ids
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        outputs += [out[row, width:width + r.max_tokens].tolist() for row, r in enumerate(batch)]
    seconds = time.perf_counter() - start
    return seconds, sum(r.max_tokens for r in requests), outputs
