"""A decoder layer's small operations in one pass each (layer_ops.c): RMSNorm after the
residual add, SiLU(gate) * up, and rotary embeddings with the cache write, in float32 and
bfloat16 on the CPU. The model keeps its torch expressions for every other case.

Measured on SmolLM2 (2 cores, a decode step of 96 sequences): see the README's performance
section."""

from __future__ import annotations

import ctypes

import torch

from tp_engine.kernels.build import load

_I, _P, _F = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _library() -> ctypes.CDLL | None:
    lib = load("layer_ops")
    if lib is not None and not hasattr(lib, "_typed"):
        for suffix in _SUFFIX.values():
            norm, silu = getattr(lib, f"rms_norm_{suffix}"), getattr(lib, f"silu_mul_{suffix}")
            rotary = getattr(lib, f"rotary_kv_{suffix}")
            norm.argtypes = [_P, _P, _P, _F, _P, _I, _I]
            silu.argtypes = [_P, _I, _P, _I, _I]
            rotary.argtypes = [_P, _I, _I, _I, _I, _I, _P, _P, _P, _P, _I, _P]
            norm.restype = silu.restype = rotary.restype = None
        lib._typed = True
    return lib


def serves(x: torch.Tensor) -> bool:
    """Whether the kernels take `x` (a float32 or bfloat16 CPU matrix, rows of unit stride)."""
    return (x.device.type == "cpu" and x.dtype in _SUFFIX and x.dim() == 2 and x.stride(1) == 1
            and _library() is not None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of x, or (with `residual`) of residual + x, which is stored in `residual` in
    place. Contiguous [tokens, hidden]."""
    n, hidden = x.shape
    out = torch.empty_like(x)
    kernel = getattr(_library(), f"rms_norm_{_SUFFIX[x.dtype]}")
    kernel(x.data_ptr(), 0 if residual is None else residual.data_ptr(), weight.data_ptr(), eps,
           out.data_ptr(), n, hidden)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of [tokens, 2 * size] (gate first): [tokens, size]."""
    n, size = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(n, size)
    kernel = getattr(_library(), f"silu_mul_{_SUFFIX[gate_up.dtype]}")
    kernel(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), n, size)
    return out


def rotary_kv(qkv: torch.Tensor, heads: int, kv_heads: int, dim: int, positions: torch.Tensor,
              cos: torch.Tensor, signed_sin: torch.Tensor, cache: torch.Tensor,
              slots: torch.Tensor) -> None:
    """Rotate the queries and keys of qkv ([tokens, (heads + 2 kv_heads) * dim]) in place by
    the float32 tables [positions, dim], and write keys and values to cache ([2, kv_heads,
    slots, dim] in memory order) at `slots`."""
    positions, slots = positions.contiguous(), slots.contiguous()
    getattr(_library(), f"rotary_kv_{_SUFFIX[qkv.dtype]}")(
        qkv.data_ptr(), qkv.stride(0), qkv.shape[0], heads, kv_heads, dim,
        positions.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(), cache.data_ptr(),
        cache.numel() // (2 * kv_heads * dim), slots.data_ptr())
