"""Rotary position embeddings (default, linear and Llama 3 scaling), replicated on every
rank, written to match transformers' arithmetic (the order of casts included) so float32
logits agree to 1e-4."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn


def rope_inverse_frequencies(head_dim: int, theta: float,
                             scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_scaling(inv_freq, scaling)
    raise ValueError(f"config.json: rope scaling type {kind!r} is not supported "
                     "(default, linear and llama3 are)")


def _llama3_scaling(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, computed once; applied in the rotate-half layout.

    One instance serves every layer: a step looks its positions up once (`table`) and each
    layer rotates its queries and keys together (`rotate`), a handful of ops per layer."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None):
        super().__init__()
        inv_freq = rope_inverse_frequencies(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        # rotate_half(x) * sin == swap_halves(x) * signed_sin: the negation moves into the table
        signed = emb.sin()
        signed[:, :head_dim // 2].neg_()
        self.register_buffer("signed_sin", signed, persistent=False)

    def table(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        """The rotation of this step's tokens, at `positions`, in the compute dtype."""
        return Rope(positions, dtype, self.cos, self.signed_sin)

    @staticmethod
    def rotate(x: torch.Tensor, rope: Rope) -> torch.Tensor:
        """x: [tokens, heads, head_dim] (queries and keys side by side)."""
        cos, signed_sin = rope.rows
        swapped = x.roll(x.shape[-1] // 2, dims=-1)  # the two halves exchanged
        return x * cos + swapped * signed_sin


@dataclass
class Rope:
    """One step's rotary embedding: the tokens' positions and the float32 tables, which the
    CPU kernel reads by position; `rows` looks them up for torch, once a step."""

    positions: torch.Tensor
    dtype: torch.dtype
    cos: torch.Tensor         # [positions, head_dim], float32
    signed_sin: torch.Tensor

    @cached_property
    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) of each token, [tokens, 1, head_dim], in the compute dtype."""
        return (self.cos[self.positions].to(self.dtype).unsqueeze(1),
                self.signed_sin[self.positions].to(self.dtype).unsqueeze(1))
