"""A GGUF file as a checkpoint: its metadata as a ModelConfig, its tensors under the Hugging
Face names the model's layers load. No torch here: the controller reads the config too."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from tp_engine.model.config import ModelConfig
from tp_engine.model.gguf_file import GGUFFile, GGUFTensor

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# general.file_type -> the dtype "auto" keeps on a GPU; quantized files compute in bfloat16
FILE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}

_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def gguf_model_config(file: GGUFFile) -> ModelConfig:
    meta = file.metadata
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{file.path}: general.architecture {arch!r} is not supported "
                         f"({', '.join(ARCHITECTURES)} are)")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{file.path}: the metadata lacks {arch}.{key}")
        return value

    if "rope_freqs.weight" in file.tensors:
        raise ValueError(f"{file.path}: tensor rope_freqs.weight (Llama 3 rope scaling "
                         "factors) is not supported yet")
    for tensor in file.tensors.values():  # before any worker starts to load
        tensor.check_supported()
    embed = file.tensors.get("token_embd.weight")
    if embed is None:
        raise ValueError(f"{file.path}: no tensor token_embd.weight")
    heads, hidden = get("attention.head_count"), get("embedding_length")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ValueError(f"{file.path}: {arch}.rope.scaling.type {scaling!r} is not supported")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=ARCHITECTURES[arch],
        vocab_size=embed.shape[0],
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv", heads),
        head_dim=get("attention.key_length", meta.get(f"{arch}.rope.dimension_count",
                                                      hidden // heads)),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6),
        max_position_embeddings=get("context_length", 4096),
        tie_word_embeddings="output.weight" not in file.tensors,
        qkv_bias="blk.0.attn_q.bias" in file.tensors,
        o_bias="blk.0.attn_output.bias" in file.tensors,
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=(None if scaling == "none" else
                      {"rope_type": "linear", "factor": get("rope.scaling.factor")}),
        checkpoint_dtype=FILE_DTYPES.get(meta.get("general.file_type", 0), "bfloat16"),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (eos,),
    )


def gguf_tensors(file: GGUFFile, config: ModelConfig,
                 ) -> Iterator[tuple[str, GGUFTensor, int | None]]:
    """(Hugging Face name, tensor, heads) for every tensor of the file, in the file's order;
    `heads`: for a query or key whose rows llama.cpp permuted, how many heads it holds."""
    permuted = config.architecture == "LlamaForCausalLM"
    for name, tensor in file.tensors.items():
        if name in _TOP:
            yield _TOP[name], tensor, None
            continue
        match = _LAYER_NAME.fullmatch(name)
        if match is None or match[2] not in _LAYER:
            yield name, tensor, None  # the loader reports it as having no place
            continue
        layer, part, kind = match.groups()
        heads = None
        if permuted and part == "attn_q":
            heads = config.num_heads
        elif permuted and part == "attn_k":
            heads = config.num_kv_heads
        yield f"model.layers.{layer}.{_LAYER[part]}.{kind}", tensor, heads
