"""Causal prefill attention read straight from the cache blocks (paged_prefill.c), for float32
and bfloat16 on a CPU with AVX-512 and head sizes 64 or 128; elsewhere torch's SDPA serves.

Measured on SmolLM2 (2 cores): see the README's performance section."""

from __future__ import annotations

import ctypes

import torch

from tp_engine.kernels.build import load
from tp_engine.kernels.paged_decode import HeadRuns

_I, _P, _F = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _library() -> ctypes.CDLL | None:
    lib = load("paged_prefill")
    if lib is not None and not hasattr(lib, "_typed"):
        lib.prefill_supported.argtypes = [_I]
        lib.prefill_supported.restype = _I
        lib._typed = True
    return lib


def available(cache: torch.Tensor, dim: int) -> bool:
    """Whether the kernel serves a cache like `cache` with heads of `dim` (building it on the
    first call)."""
    if cache.device.type != "cpu" or cache.dtype not in _SUFFIX:
        return False
    lib = _library()
    return lib is not None and bool(lib.prefill_supported(dim))


def _function(dtype: torch.dtype):
    lib = _library()
    function = getattr(lib, f"prefill_attention_{_SUFFIX[dtype]}")
    if function.argtypes is None:
        # q, q_stride, cache, kv_heads, head_stride, tables, width, starts, query_lens, n,
        # heads, dim, block_size, run_first, run_count, run_kv, runs, window, scale, out
        function.argtypes = [_P, _I, _P, _I, _I, _P, _I, _P, _P, _I, _I, _I, _I,
                             _P, _P, _P, _I, _I, _F, _P]
        function.restype = None
    return function


def prefill_attention(q: torch.Tensor, cache: torch.Tensor, kv_heads: int, block_size: int,
                      tables: torch.Tensor, starts: torch.Tensor, query_lens: torch.Tensor,
                      window: int | None, scale: float, runs: HeadRuns) -> torch.Tensor:
    """q: [tokens, heads, dim] (rows may be strided), each sequence's new tokens together and
    in order; their keys and values are in `cache` (one layer's, [2, kv_heads, blocks *
    block_size, dim]); tables: [n, width] int64; starts, query_lens: [n] int64, the tokens
    before each sequence's new ones and their count. Returns [tokens, heads * dim]."""
    tokens, heads, dim = q.shape
    if q.stride(2) != 1 or q.stride(1) != dim:
        q = q.contiguous()
    tables, starts, query_lens = tables.contiguous(), starts.contiguous(), query_lens.contiguous()
    out = torch.empty(tokens, heads * dim, dtype=q.dtype)
    _function(q.dtype)(q.data_ptr(), q.stride(0), cache.data_ptr(), kv_heads,
                       cache.numel() // (2 * kv_heads), tables.data_ptr(), tables.shape[1],
                       starts.data_ptr(), query_lens.data_ptr(), tables.shape[0], heads, dim,
                       block_size, runs.first.data_ptr(), runs.count.data_ptr(),
                       runs.kv.data_ptr(), runs.first.numel(), window or 0, scale,
                       out.data_ptr())
    return out
