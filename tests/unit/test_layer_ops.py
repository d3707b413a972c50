"""The fused CPU layer operations against the torch expressions the model keeps for every
other case, in both dtypes: RMSNorm with and without the residual add, SiLU(gate) * up over
its whole range, and the rotary embedding with its cache write."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tp_engine.kernels import layer_ops
from tp_engine.model.rmsnorm import RMSNorm
from tp_engine.model.rotary import RotaryEmbedding

pytestmark = pytest.mark.skipif(not layer_ops.serves(torch.zeros(1, 1, dtype=torch.bfloat16)),
                                reason="no C compiler here: the torch expressions serve")


def torch_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers computes it (the model's torch path)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


# float32: the sum of squares is added in another order than torch's, so the last bit may differ
EXACT = {torch.bfloat16: {"atol": 0, "rtol": 0}, torch.float32: {"atol": 1e-6, "rtol": 1e-6}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,hidden", [(1, 576), (37, 576), (5, 100)])
def test_rms_norm_with_and_without_residual(dtype, tokens, hidden):
    gen = torch.Generator().manual_seed(tokens)
    x = (torch.randn(tokens, hidden, generator=gen) * 3).to(dtype)
    residual = torch.randn(tokens, hidden, generator=gen).to(dtype)
    weight = torch.randn(hidden, generator=gen).to(dtype)
    torch.testing.assert_close(layer_ops.rms_norm(x, weight, 1e-5),
                               torch_norm(x, weight, 1e-5), **EXACT[dtype])
    summed = residual + x
    got = layer_ops.rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(residual, summed), "the residual stream holds residual + x afterwards"
    torch.testing.assert_close(got, torch_norm(summed, weight, 1e-5), **EXACT[dtype])


def test_the_norm_module_takes_the_kernel_only_where_it_serves():
    norm = RMSNorm(8, 1e-6)
    norm.weight.data = torch.linspace(0.5, 2, 8).bfloat16()
    x = torch.randn(3, 16).bfloat16()[:, ::2]  # not contiguous: the torch path
    torch.testing.assert_close(norm(x), torch_norm(x, norm.weight, 1e-6), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_over_its_whole_range(dtype):
    gate = torch.linspace(-100, 100, 4001).to(dtype)
    up = torch.randn(4001, generator=torch.Generator().manual_seed(0)).to(dtype)
    gate_up = torch.cat([gate, up]).view(1, -1)
    want = F.silu(gate) * up
    torch.testing.assert_close(layer_ops.silu_mul(gate_up)[0], want, **EXACT[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_reads_strided_rows(dtype):
    gate_up = torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    rows = gate_up[:, 0]  # every third row of a wider buffer
    gate, up = rows.chunk(2, dim=-1)
    torch.testing.assert_close(layer_ops.silu_mul(rows), F.silu(gate) * up, **EXACT[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 32), (2, 1, 128)])
def test_rotary_kv_rotates_and_writes_the_cache(dtype, heads, kv_heads, dim):
    gen = torch.Generator().manual_seed(heads * dim)
    tokens, slots = 11, 64
    rotary = RotaryEmbedding(dim, 512, 10000.0, None)
    positions = torch.randint(0, 512, (tokens,), generator=gen)
    where = torch.randperm(slots, generator=gen)[:tokens]
    width = (heads + 2 * kv_heads) * dim
    qkv = torch.randn(tokens, width + 8, generator=gen).to(dtype)[:, :width]  # strided rows
    rope = rotary.table(positions, dtype)

    qk = qkv[:, :(heads + kv_heads) * dim].unflatten(-1, (-1, dim))
    want_qk = RotaryEmbedding.rotate(qk, rope)
    want_v = qkv[:, (heads + kv_heads) * dim:].unflatten(-1, (kv_heads, dim)).clone()
    cache = torch.full((2, kv_heads, slots, dim), 7.0, dtype=dtype)
    want_cache = cache.clone()
    want_cache[0, :, where] = want_qk[:, heads:].transpose(0, 1)
    want_cache[1, :, where] = want_v.transpose(0, 1)

    layer_ops.rotary_kv(qkv, heads, kv_heads, dim, positions, rope.cos, rope.signed_sin,
                        cache, where)
    torch.testing.assert_close(qk[:, :heads], want_qk[:, :heads], atol=0, rtol=0)
    torch.testing.assert_close(cache, want_cache, atol=0, rtol=0)
