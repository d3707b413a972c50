"""The Llama-family decoder (Llama, Mistral, Qwen2), tensor-parallel. Read top to bottom: the
attention and MLP blocks, a decoder layer, the stack, and the causal LM with its LM head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tp_engine.kernels import layer_ops
from tp_engine.kernels.paged_decode import HeadRuns
from tp_engine.model.attention import AttentionMetadata, paged_attention
from tp_engine.model.config import ModelConfig
from tp_engine.model.packed_linear import row_pieces
from tp_engine.model.parallel import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    TensorParallel,
    VocabParallelEmbedding,
)
from tp_engine.model.rmsnorm import RMSNorm
from tp_engine.model.rotary import Rope, RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_dim, config.num_heads,
                                          config.num_kv_heads, config.qkv_bias, tp)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads  # held in the cache
        expand = self.qkv_proj.kv_expand
        self.kv_expand = None if expand is None else torch.tensor(expand)
        self.score_heads = self.num_kv_heads if expand is None else len(expand)  # attention's
        self.head_runs = HeadRuns.of(self.num_heads, self.num_kv_heads, expand)
        self.o_proj = RowParallelLinear(config.num_heads * config.head_dim, config.hidden_size,
                                        config.o_bias, tp, self.qkv_proj.q_rows)
        self.scale = config.head_dim ** -0.5

    def forward(self, rope: Rope, x: torch.Tensor, cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        if layer_ops.serves(qkv) and cache.dtype == qkv.dtype:
            # rotated in place, keys and values written to the cache, in one pass
            layer_ops.rotary_kv(qkv, heads, kv_heads, dim, rope.positions, rope.cos,
                                rope.signed_sin, cache, meta.slot_mapping)
            q, k, v = qkv[:, :heads * dim].unflatten(-1, (heads, dim)), None, None
        else:  # queries and keys are rotated together: one set of ops for both
            qk = RotaryEmbedding.rotate(qkv[:, :(heads + kv_heads) * dim].unflatten(-1, (-1, dim)),
                                        rope)
            q, k = qk[:, :heads], qk[:, heads:]
            v = qkv[:, (heads + kv_heads) * dim:].unflatten(-1, (kv_heads, dim))
        out = paged_attention(q, k, v, cache, meta, self.scale, self.kv_expand, self.head_runs)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], False, tp)
        self.down_proj = RowParallelLinear(size, config.hidden_size, False, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj.packed is not None and len(pieces := row_pieces(x.shape[0])) > 1:
            # The packed linear goes in these pieces anyway; going through the whole MLP piece
            # by piece, its [rows, 2 x intermediate] activation never exists whole. Whole, at
            # 4,073 rows of SmolLM2 (50 MB, above glibc's largest mmap threshold) it was a
            # fresh mapping faulted in page by page in every layer, and its concatenation
            # took 12% of a prefill step.
            return torch.cat([self(part) for part in x.split(pieces)])
        gate_up = self.gate_up_proj(x)
        if layer_ops.serves(gate_up):
            return self.down_proj(layer_ops.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, tp)

    def forward(self, rope: Rope, x: torch.Tensor, residual: torch.Tensor | None,
                cache: torch.Tensor, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's output, added to the residual stream here (the first
        layer's x is the embedding, and the stream starts with it). Returns (this layer's
        output, the stream before it)."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(rope, h, cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, max_positions: int):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(config, tp)
                                    for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # shared by every layer: the positions are looked up once per step
        self.rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta,
                                      config.rope_scaling)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(ids)
        rope = self.rotary.table(positions, x.dtype)
        residual = None
        for layer, cache in zip(self.layers, caches):
            x, residual = layer(rope, x, residual, cache, meta)
        return self.norm(x, residual)[0]


class CausalLM(nn.Module):
    # checkpoint tensor name part -> (our merged parameter, which shard of it)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig, tp: TensorParallel, max_positions: int):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, tp, max_positions)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states of every new token: [tokens, hidden]."""
        return self.model(ids, positions, caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits over the real vocabulary, on rank 0 only (None on the other ranks)."""
        return self.lm_head(hidden)
