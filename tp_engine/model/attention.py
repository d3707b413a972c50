"""Attention over a paged KV cache.

The cache of one layer is one contiguous buffer of 2 * kv_heads * slots * head_dim elements,
read as [2, kv_heads, num_blocks, block_size * head_dim]: a block of one head is one contiguous
run of memory, so a step reads its context with one row gather (memcpy per block) of keys and
values of every head, and the keys come out as [kv_heads, sequences, context, head_dim], the
layout the batched matmuls want, with no further copy. A sequence owns a list of blocks (its
block table); token position p lives in slot `table[p // block_size] * block_size + p %
block_size`.

One step may mix prefills and decodes: every sequence brings `query_len` new tokens after
`start` tokens already in the cache. The two kinds are computed apart (see attention_groups):
- decodes (one new token): one row of scores per head, so two batched matmuls over the
  gathered blocks and an additive mask, with no padded queries, and groups that share leading
  blocks read those once; on a CPU the kernel of tp_engine/kernels/paged_decode reads the
  blocks where they lie instead (no gather), shared ones too: 96 sequences of SmolLM2 after a
  512-token shared prefix decoded in 140 ms a step against 207 through the shared gather
  (float32; bfloat16 76 against 85);
- prefills (several new tokens): on a CPU with AVX-512 the kernel of
  tp_engine/kernels/paged_prefill, causal, from the blocks where they lie (a 4,000-token prefill
  of SmolLM2 spent 87-96 ms a step in it against 384-426 ms in the SDPA below); elsewhere one
  scaled-dot-product attention over the sequences, padded to the longest query, with a mask
  that encodes causality, padding and the sliding window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tp_engine.kernels import paged_decode, paged_prefill
from tp_engine.model.attention_groups import (
    DecodeGroup,
    PrefillGroup,
    decode_groups,
    prefill_groups,
)


@dataclass
class AttentionMetadata:
    positions: torch.Tensor      # [tokens]: each new token's position in its sequence
    slot_mapping: torch.Tensor   # [tokens]: where each new token's k and v are written
    block_size: int
    decode: list[DecodeGroup]
    prefill: list[PrefillGroup]

    @classmethod
    def build(cls, starts: list[int], query_lens: list[int], block_tables: list[list[int]],
              block_size: int, sliding_window: int | None = None,
              device: torch.device | str = "cpu", ragged_prefill: bool = False
              ) -> AttentionMetadata:
        """`ragged_prefill`: a step's prefills form one group whatever their lengths, for the
        prefill kernel, which reads each sequence at its own length (torch's padded SDPA path
        is split by length instead, so that short prompts are not padded to long ones)."""
        bs, n = block_size, len(query_lens)
        if n == sum(query_lens):  # every query is one token: a decode step
            slots = [t[s // bs] * bs + s % bs for t, s in zip(block_tables, starts)]
            return cls(torch.tensor(starts, device=device), torch.tensor(slots, device=device),
                       bs, decode_groups(list(range(n)), None, starts, block_tables, bs,
                                         sliding_window, device), [])
        positions, slots, dec, dec_rows, pre, pre_rows = [], [], [], [], [], []
        for i, (start, qlen, table) in enumerate(zip(starts, query_lens, block_tables)):
            row = len(positions)
            positions.extend(range(start, start + qlen))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + qlen))
            if qlen == 1:
                dec.append(i)
                dec_rows.append(row)
            else:
                pre.append(i)
                pre_rows.append(range(row, row + qlen))
        decode = decode_groups(dec, dec_rows, starts, block_tables, bs, sliding_window,
                               device) if dec else []
        prefill = prefill_groups(pre, pre_rows, bool(dec), starts, query_lens, block_tables,
                                 bs, sliding_window, device, ragged_prefill) if pre else []
        return cls(torch.tensor(positions, device=device), torch.tensor(slots, device=device),
                   bs, decode, prefill)


def paged_attention(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                    cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    kv_expand: torch.Tensor | None = None,
                    runs: paged_decode.HeadRuns | None = None) -> torch.Tensor:
    """q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim], written to the cache here, or
    None where they are there already; cache: one layer's, [2, kv_heads, slots, dim].
    Returns [tokens, heads * dim]. `kv_expand`: the KV head each even group of query heads
    reads, where the heads do not fall evenly under the KV heads (uneven tensor parallelism);
    None: in order. `runs`: the same as runs of heads, for the CPU decode kernel (None: never
    use it)."""
    dim = q.shape[2]
    kv_heads = cache.shape[1]
    if k is not None:
        cache[0].index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        cache[1].index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
    gather = (cache, kv_heads, meta.block_size, dim)
    kernel = runs is not None and bool(meta.decode) and paged_decode.available(cache)
    prefill_kernel = (runs is not None and bool(meta.prefill)
                      and paged_prefill.available(cache, dim))

    def expand(kv: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if kv_expand is None:
            return kv
        return kv[0].index_select(0, kv_expand), kv[1].index_select(0, kv_expand)

    def compute(q: torch.Tensor, group: DecodeGroup | PrefillGroup) -> torch.Tensor:
        if isinstance(group, PrefillGroup):
            if prefill_kernel:
                return paged_prefill.prefill_attention(q, cache, kv_heads, meta.block_size,
                                                       group.tables, group.starts,
                                                       group.query_lens, group.window, scale,
                                                       runs)
            return _prefill(q, group, scale, *expand(group.gather(*gather)))
        if kernel:  # even over shared blocks: they stay in the CPU's cache between readers
            return paged_decode.decode_attention(q, cache, kv_heads, meta.block_size,
                                                 group.tables, group.positions, group.window,
                                                 scale, runs)
        if group.shared:
            shared, own = group.gather_parts(*gather)
            return _decode_shared(q, group, scale, expand(shared), expand(own))
        return _decode(q, group, scale, *expand(group.gather(*gather)))

    groups = [*meta.decode, *meta.prefill]
    if len(groups) == 1 and groups[0].rows is None:  # one group in token order: no copies
        return compute(q, groups[0])
    out = q.new_empty(q.shape[0], q.shape[1] * dim)
    for group in groups:
        out[group.rows] = compute(q[group.rows], group)
    return out


def _decode(q: torch.Tensor, group: DecodeGroup, scale: float, keys: torch.Tensor,
            values: torch.Tensor) -> torch.Tensor:
    n, heads, dim = q.shape
    kv_heads, ctx = keys.shape[0], keys.shape[2]
    # query heads grouped under their KV head, batched over (kv head, sequence)
    queries = q.view(n, kv_heads, heads // kv_heads, dim).transpose(0, 1)
    queries = queries.reshape(kv_heads * n, heads // kv_heads, dim)
    # scale and mask fused into the score matmul: bias + scale * q k^T
    scores = torch.baddbmm(group.bias_for(kv_heads, q.dtype, ctx), queries,
                           keys.view(kv_heads * n, ctx, dim).transpose(1, 2), alpha=scale)
    out = torch.bmm(scores.softmax(dim=-1), values.view(kv_heads * n, ctx, dim))
    return out.view(kv_heads, n, -1, dim).transpose(0, 1).reshape(n, heads * dim)


def _decode_shared(q: torch.Tensor, group: DecodeGroup, scale: float,
                   shared: tuple[torch.Tensor, torch.Tensor],
                   own: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """_decode for a group whose members begin with the same blocks: every query of a KV
    head faces the shared keys in one matmul; one softmax over both parts."""
    n, heads, dim = q.shape
    kv_heads = own[0].shape[0]
    per_kv = heads // kv_heads
    ctx_shared, ctx_own = shared[0].shape[2], own[0].shape[2]
    queries = q.view(n, kv_heads, per_kv, dim).transpose(0, 1)
    queries = queries.reshape(kv_heads, n * per_kv, dim)
    scores_shared = torch.bmm(queries, shared[0].view(kv_heads, ctx_shared, dim).transpose(1, 2))
    # the shared blocks lie before every query: only the own part is masked
    bias = group.bias_for(kv_heads, q.dtype, ctx_shared + ctx_own)[..., ctx_shared:]
    scores_own = torch.baddbmm(bias, queries.view(kv_heads * n, per_kv, dim),
                               own[0].view(kv_heads * n, ctx_own, dim).transpose(1, 2),
                               alpha=scale)
    scores = torch.cat([scores_shared.mul_(scale).view(kv_heads, n, per_kv, ctx_shared),
                        scores_own.view(kv_heads, n, per_kv, ctx_own)], dim=-1).softmax(dim=-1)
    p_shared, p_own = scores.split([ctx_shared, ctx_own], dim=-1)
    out = torch.bmm(p_shared.reshape(kv_heads, n * per_kv, ctx_shared),
                    shared[1].view(kv_heads, ctx_shared, dim))
    out += torch.bmm(p_own.reshape(kv_heads * n, per_kv, ctx_own),
                     own[1].view(kv_heads * n, ctx_own, dim)).view(kv_heads, n * per_kv, dim)
    return out.view(kv_heads, n, per_kv, dim).transpose(0, 1).reshape(n, heads * dim)


def _prefill(q: torch.Tensor, group: PrefillGroup, scale: float, keys: torch.Tensor,
             values: torch.Tensor) -> torch.Tensor:
    heads, dim = q.shape[1], q.shape[2]
    keys, values = keys.transpose(0, 1), values.transpose(0, 1)        # [n, kv, ctx, dim]
    n = keys.shape[0]
    padded = q.new_zeros(n * group.max_query_len, heads, dim)
    padded[group.query_index] = q
    padded = padded.view(n, group.max_query_len, heads, dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(padded, keys, values, attn_mask=group.mask, scale=scale,
                                         enable_gqa=heads != keys.shape[1])
    return out.transpose(1, 2).reshape(-1, heads * dim)[group.query_index]
