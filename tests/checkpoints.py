"""Random tiny checkpoints written by transformers, covering the layouts tp-engine must read."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, rms_norm_eps=1e-6)

VARIANTS = {
    # one KV head: replicated at TP 2 and 4; a vocabulary no TP size divides; sharded + index
    "llama": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=1, vocab_size=103)),
    # Llama 3.1 rope scaling, written hub-style (rope_theta, rope_scaling, torch_dtype), bf16
    "llama3-hub-bf16": (LlamaConfig, LlamaForCausalLM, dict(
        num_key_value_heads=2, vocab_size=128, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=32))),
    # tied embeddings and q/k/v biases
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2, vocab_size=101,
                                                  tie_word_embeddings=True)),
    # a sliding window shorter than the prompts
    "mistral": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=2, vocab_size=97,
                                                        sliding_window=6)),
}


def build(name: str, root: Path, seed: int = 0, **overrides) -> Path:
    config_cls, model_cls, extra = VARIANTS[name]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**SMALL, **extra, **overrides})).eval()
    with torch.no_grad():  # larger than the default init: distinct logits, no near-ties
        for pname, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in pname else 0.2 * torch.randn_like(p))
    out = root / name
    if name.endswith("bf16"):
        model.to(torch.bfloat16).save_pretrained(out)
        _rewrite_hub_style(out / "config.json")
    elif name == "llama":
        model.save_pretrained(out, max_shard_size="40KB")
        assert (out / "model.safetensors.index.json").is_file()
    else:
        model.save_pretrained(out)
    return out


def reference(path: Path) -> torch.nn.Module:
    """The transformers model of a checkpoint, in float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _rewrite_hub_style(file: Path) -> None:
    raw = json.loads(file.read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = rope
    raw["torch_dtype"] = raw.pop("dtype", "bfloat16")
    file.write_text(json.dumps(raw, indent=2))


def greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy `generate`, with no EOS (so nothing is suppressed or stopped)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                              bos_token_id=None, pad_token_id=0)
    model.generation_config = config  # else generate merges in the checkpoint's EOS ids
    out = model.generate(torch.tensor([prompt]))
    return out[0, len(prompt):].tolist()
