"""Attention over a paged KV cache.

The cache of one layer is a tensor [2, num_blocks * block_size, kv_heads, head_dim]; a sequence
owns a list of blocks (its block table), and token position p lives in slot
`table[p // block_size] * block_size + p % block_size`. One step may mix prefills and decodes:
every sequence brings `query_len` new tokens after `start` tokens already in the cache.

The step is computed as one batched scaled-dot-product attention over the sequences, padded to
the longest query and the longest context, with a mask that encodes causality, padding and the
sliding window. The indices and the mask are built once per step and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    positions: torch.Tensor      # [tokens]: each new token's position in its sequence
    slot_mapping: torch.Tensor   # [tokens]: where each new token's k and v are written
    key_slots: torch.Tensor      # [batch, max_context]: the cache slots each sequence reads
    query_index: torch.Tensor    # [tokens]: each new token's row in the padded [batch * max_q]
    mask: torch.Tensor           # [batch, 1, max_q, max_context], True where attention is allowed
    max_query_len: int

    @classmethod
    def build(cls, starts: list[int], query_lens: list[int], block_tables: list[list[int]],
              block_size: int, sliding_window: int | None = None,
              device: torch.device | str = "cpu") -> AttentionMetadata:
        batch, max_q = len(query_lens), max(query_lens)
        max_ctx = max(s + q for s, q in zip(starts, query_lens))
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long)
        offsets = torch.arange(block_size)
        key_slots = (tables[:, :, None] * block_size + offsets).view(batch, -1)[:, :max_ctx]

        start_t = torch.tensor(starts)
        qlen_t = torch.tensor(query_lens)
        rows = torch.arange(max_q)
        # token i of sequence b is at position starts[b] + i and sits in row b * max_q + i
        valid_q = rows[None, :] < qlen_t[:, None]                          # [batch, max_q]
        query_index = (torch.arange(batch)[:, None] * max_q + rows[None, :])[valid_q]
        flat_rows = torch.arange(batch).repeat_interleave(qlen_t)
        first_row = (qlen_t.cumsum(0) - qlen_t).repeat_interleave(qlen_t)
        flat_pos = start_t.repeat_interleave(qlen_t) + torch.arange(len(flat_rows)) - first_row
        slot_mapping = key_slots[flat_rows, flat_pos]

        q_pos = start_t[:, None] + rows[None, :]                            # [batch, max_q]
        k_pos = torch.arange(max_ctx)
        mask = k_pos[None, None, :] <= q_pos[:, :, None]
        if sliding_window is not None:
            mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
        # padding rows attend to slot 0 only, so softmax never sees an all-masked row
        mask = torch.where(valid_q[:, :, None], mask, k_pos[None, None, :] == 0)
        return cls(
            positions=flat_pos.to(device),
            slot_mapping=slot_mapping.to(device),
            key_slots=key_slots.to(device),
            query_index=query_index.to(device),
            mask=mask.unsqueeze(1).to(device),
            max_query_len=max_q,
        )


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim]. Returns [tokens, heads * dim]."""
    cache[0, meta.slot_mapping] = k
    cache[1, meta.slot_mapping] = v
    batch = meta.key_slots.shape[0]
    heads, dim = q.shape[1], q.shape[2]
    padded = q.new_zeros(batch * meta.max_query_len, heads, dim)
    padded[meta.query_index] = q
    padded = padded.view(batch, meta.max_query_len, heads, dim).transpose(1, 2)
    keys = cache[0, meta.key_slots].transpose(1, 2)                      # [batch, kv, ctx, dim]
    values = cache[1, meta.key_slots].transpose(1, 2)
    out = F.scaled_dot_product_attention(padded, keys, values, attn_mask=meta.mask, scale=scale,
                                         enable_gqa=heads != keys.shape[1])
    return out.transpose(1, 2).reshape(-1, heads * dim)[meta.query_index]
