"""Decode attention read straight from the cache blocks (paged_decode.c), for float32 and
bfloat16 on the CPU: scores and their softmax in one pass, the values in a second.

Measured on SmolLM2 (2 cores, 96 sequences of ~180 tokens), against gathering the blocks and
two batched matmuls: see the README's performance section."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from tp_engine.kernels.build import load

_I, _P, _F = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
# tables, width, positions, n, heads, dim, block_size, run_first, run_count, run_kv, runs, window
_COMMON = [_I, _P, _I, _P, _I, _I, _I, _I, _P, _P, _P, _I, _I]
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _library() -> ctypes.CDLL | None:
    lib = load("paged_decode")
    if lib is not None and not hasattr(lib, "_typed"):
        for suffix in _SUFFIX.values():
            scores = getattr(lib, f"decode_probs_{suffix}")
            scores.argtypes = [_P, _I, _P, *_COMMON, _F, _P]
            values = getattr(lib, f"decode_values_{suffix}")
            values.argtypes = [_P, _P, *_COMMON, _P]
            scores.restype = values.restype = None
        lib._typed = True
    return lib


def available(tensor: torch.Tensor) -> bool:
    """Whether the kernel serves a cache like `tensor` (building it on the first call)."""
    return tensor.device.type == "cpu" and tensor.dtype in _SUFFIX and _library() is not None


@dataclass(frozen=True)
class HeadRuns:
    """A rank's query heads as runs of consecutive heads that read the same KV head."""
    first: torch.Tensor
    count: torch.Tensor
    kv: torch.Tensor

    @classmethod
    def of(cls, heads: int, kv_heads: int, expand: list[int] | None = None) -> HeadRuns:
        """`expand`: the KV head each even group of query heads reads (uneven tensor
        parallelism); None: heads // kv_heads query heads a KV head, in order."""
        if expand is None:
            kv_of = [h // (heads // kv_heads) for h in range(heads)]
        else:
            kv_of = [expand[h // (heads // len(expand))] for h in range(heads)]
        first = [h for h in range(heads) if h == 0 or kv_of[h] != kv_of[h - 1]]
        count = [b - a for a, b in zip(first, [*first[1:], heads])]
        return cls(*(torch.tensor(v, dtype=torch.long) for v in
                     (first, count, [kv_of[h] for h in first])))


def decode_attention(q: torch.Tensor, cache: torch.Tensor, kv_heads: int, block_size: int,
                     tables: torch.Tensor, positions: torch.Tensor, window: int | None,
                     scale: float, runs: HeadRuns) -> torch.Tensor:
    """q: [n, heads, dim] (rows may be strided); cache: one layer's, [2, kv_heads, blocks *
    block_size, dim] in memory order; tables: [n, width] int64; positions: [n] int64, each
    query's position (it sees keys up to it, and only the last `window` with one).
    Returns [n, heads * dim]."""
    lib = _library()
    n, heads, dim = q.shape
    if q.stride(2) != 1 or q.stride(1) != dim:
        q = q.contiguous()
    tables, positions = tables.contiguous(), positions.contiguous()
    width = tables.shape[1]
    head_stride = cache.numel() // (2 * kv_heads)
    common = (tables.data_ptr(), width, positions.data_ptr(), n, heads, dim, block_size,
              runs.first.data_ptr(), runs.count.data_ptr(), runs.kv.data_ptr(),
              runs.first.numel(), window or 0)
    suffix = _SUFFIX[q.dtype]
    probs = torch.empty(n, heads, width * block_size, dtype=torch.float32)
    getattr(lib, f"decode_probs_{suffix}")(q.data_ptr(), q.stride(0), cache.data_ptr(),
                                           head_stride, *common, scale, probs.data_ptr())
    out = torch.empty(n, heads * dim, dtype=q.dtype)
    values = cache.data_ptr() + kv_heads * head_stride * cache.element_size()
    getattr(lib, f"decode_values_{suffix}")(probs.data_ptr(), values, head_stride, *common,
                                            out.data_ptr())
    return out
