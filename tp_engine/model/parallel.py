"""Tensor-parallel layers (Megatron style). Each layer holds only its rank's shard and knows
how to read that shard from a checkpoint slice, so no rank ever reads a tensor it does not own.

Any TP size works: a dimension is cut into contiguous ranges whose lengths differ by at most
one unit (a head, a row), so sizes that do not divide the heads or the MLP shard unevenly.

A `weight_loader(param, source, shard_id)` receives a safetensors slice (or a tensor: both
support `[a:b]` and `[:, a:b]`), reads only the rows or columns of this rank, and copies them in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tp_engine.model.packed_linear import linear


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in the tensor-parallel group; one object shared by every layer.
    `group` is the process group of the ranks (None: the whole world) and `first` the global
    rank of its rank 0: under torchrun with data-parallel replicas, one group of the world's."""

    rank: int = 0
    size: int = 1
    group: Any = None
    first: int = 0

    def all_reduce(self, x: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, op=op, group=self.group)
        return x

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.broadcast(x, src=self.first, group=self.group)
        return x

    def gather_to_first(self, x: torch.Tensor) -> torch.Tensor | None:
        """Concatenate every rank's `x` along the last dimension on rank 0; None elsewhere."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x.contiguous(), parts, dst=self.first, group=self.group)
        return torch.cat(parts, dim=-1) if parts is not None else None

    def shard(self, size: int, unit: int = 1) -> range:
        """This rank's contiguous share of `size` elements, cut in whole `unit`s."""
        base, extra = divmod(size // unit, self.size)
        start = self.rank * base + min(self.rank, extra)
        return range(start * unit, (start + base + (self.rank < extra)) * unit)


def shape_of(source: Any) -> tuple[int, ...]:
    return tuple(source.get_shape()) if hasattr(source, "get_shape") else tuple(source.shape)


def copy_shard(param: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"{what}: checkpoint shard has shape {tuple(loaded.shape)}, "
                         f"the model expects {tuple(param.shape)}")
    param.data.copy_(loaded.to(param.dtype))


def _new(shape: tuple[int, ...]) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape), requires_grad=False)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split by output rows; each rank produces its slice of y."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel,
                 rows: range | None = None):
        super().__init__()
        self.tp = tp
        self.rows = tp.shard(out_features) if rows is None else rows
        self.weight = _new((len(self.rows), in_features))
        self.weight.weight_loader = self.load_rows
        self.bias = _new((len(self.rows),)) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.load_rows
        self.packed: torch.Tensor | None = None  # oneDNN's copy of the weight, once loaded
        self.packs_bias = True

    def load_rows(self, param: nn.Parameter, source: Any, shard_id: Any = None) -> None:
        copy_shard(param, source[self.rows.start:self.rows.stop], "column-parallel weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.packed, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (gate and up)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, tp: TensorParallel):
        self.shards = [tp.shard(size) for size in out_sizes]
        total = sum(len(r) for r in self.shards)
        super().__init__(in_features, sum(out_sizes), bias, tp, range(total))

    def load_rows(self, param: nn.Parameter, source: Any, shard_id: int = 0) -> None:
        rows = self.shards[shard_id]
        offset = sum(len(r) for r in self.shards[:shard_id])
        copy_shard(param.data[offset:offset + len(rows)], source[rows.start:rows.stop],
                   "merged weight")


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v in one matmul, split by query heads; each rank holds the KV heads its query
    heads use, so a KV head whose query heads two ranks share is held by both.

    Attention groups a rank's query heads evenly under KV heads. Where a rank's heads do not
    fall evenly under the KV heads they use (9 heads and 3 KV heads at TP 2: heads 0-4 use KV
    heads 0, 0, 0, 1, 1), attention reads each held KV head once per run of `group` heads
    (`group` divides every run; here 1): `kv_expand` says which, None when already even."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 tp: TensorParallel):
        self.head_dim = head_dim
        heads = tp.shard(num_heads)
        kv_of = [h // (num_heads // num_kv_heads) for h in heads]
        self.kv_rows = range(kv_of[0] * head_dim, (kv_of[-1] + 1) * head_dim)
        runs = [kv_of.count(kv) for kv in dict.fromkeys(kv_of)]
        group = math.gcd(*runs)
        self.num_heads = len(heads)
        self.num_kv_heads = len(runs)
        expand = [kv - kv_of[0] for kv in kv_of[::group]]
        self.kv_expand = expand if len(expand) != len(runs) else None
        self.q_rows = range(heads.start * head_dim, heads.stop * head_dim)
        local = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden, local, bias, tp, range(local))

    def load_rows(self, param: nn.Parameter, source: Any, shard_id: str = "q") -> None:
        q_size, kv_size = len(self.q_rows), len(self.kv_rows)
        if shard_id == "q":
            offset, rows = 0, self.q_rows
        else:
            offset, rows = (q_size if shard_id == "k" else q_size + kv_size), self.kv_rows
        copy_shard(param.data[offset:offset + len(rows)], source[rows.start:rows.stop],
                   f"{shard_id}_proj")


class RowParallelLinear(nn.Module):
    """y = x W^T with W split by input columns; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel,
                 columns: range | None = None):
        super().__init__()
        self.tp = tp
        self.columns = tp.shard(in_features) if columns is None else columns
        self.weight = _new((out_features, len(self.columns)))
        self.weight.weight_loader = self.load_columns
        self.bias = _new((out_features,)) if bias else None  # replicated: loaded whole
        self.packed: torch.Tensor | None = None
        self.packs_bias = False  # the bias is added once, after the all-reduce

    def load_columns(self, param: nn.Parameter, source: Any, shard_id: Any = None) -> None:
        copy_shard(param, source[:, self.columns.start:self.columns.stop],
                   "row-parallel weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(linear(x, self.weight, self.packed))
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """The vocabulary, padded to a multiple of the TP size, split into equal row ranges."""

    def __init__(self, vocab_size: int, hidden: int, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // tp.size)
        self.start = tp.rank * self.per_rank
        self.weight = _new((self.per_rank, hidden))
        self.weight.weight_loader = self.load_rows

    def load_rows(self, param: nn.Parameter, source: Any, shard_id: Any = None) -> None:
        end = min(self.start + self.per_rank, shape_of(source)[0])
        param.data.zero_()  # the padding rows past the real vocabulary stay zero
        if end > self.start:
            copy_shard(param.data[:end - self.start], source[self.start:end], "embedding")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        owned = (local >= 0) & (local < self.per_rank)
        y = F.embedding(local.masked_fill(~owned, 0), self.weight)
        return self.tp.all_reduce(y.masked_fill(~owned.unsqueeze(-1), 0))


class ParallelLMHead(VocabParallelEmbedding):
    """Each rank computes the logits of its vocabulary range; rank 0 gathers them."""

    def __init__(self, vocab_size: int, hidden: int, tp: TensorParallel):
        super().__init__(vocab_size, hidden, tp)
        self.packed: torch.Tensor | None = None
        self.packs_bias = False

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.tp.gather_to_first(linear(hidden, self.weight, self.packed))
        return logits[..., :self.vocab_size] if logits is not None else None
