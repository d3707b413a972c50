"""The CPU attention kernels against the torch path (gather, then batched matmuls or SDPA):
the same attention through paged_attention, for both dtypes. Decode: the fast head sizes and
the generic one, grouped, uneven and sliding-window heads, strided queries and mixed steps.
Prefill: the same heads, prompts from position 0 and after cached tokens, tiles of 16 queries
cut anywhere, a sliding window shorter than the prompt, other block sizes."""

from __future__ import annotations

import pytest
import torch

from tp_engine.kernels import build, paged_decode, paged_prefill
from tp_engine.kernels.paged_decode import HeadRuns
from tp_engine.model.attention import AttentionMetadata, paged_attention

pytestmark = pytest.mark.skipif(not paged_decode.available(torch.zeros(1)),
                                reason="no C compiler here: the torch path serves")


def attention_both_ways(seed: int, dtype: torch.dtype, heads: int, kv_heads: int, dim: int,
                        query_lens: list[int], expand: list[int] | None = None,
                        window: int | None = None, bs: int = 16, ragged: bool = False):
    """(torch's path, the kernels' path) over the same inputs; `ragged`: the kernels' step
    has its prefills in one group, as the worker builds it where the prefill kernel serves."""
    gen = torch.Generator().manual_seed(seed)
    n = len(query_lens)
    starts = torch.randint(0, 300, (n,), generator=gen).tolist()
    blocks = sum(-(-(s + q) // bs) for s, q in zip(starts, query_lens)) + 7
    order = torch.randperm(blocks, generator=gen).tolist()  # tables scattered over the cache
    tables, at = [], 0
    for s, q in zip(starts, query_lens):
        need = -(-(s + q) // bs)
        tables.append(order[at:at + need])
        at += need
    cache = torch.randn(2, kv_heads, blocks * bs, dim, generator=gen).to(dtype)
    tokens = sum(query_lens)
    # q as the model passes it: a strided view of a wider projection
    qk = torch.randn(tokens, heads + kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(tokens, kv_heads, dim, generator=gen).to(dtype)
    kv_expand = None if expand is None else torch.tensor(expand)
    runs = HeadRuns.of(heads, kv_heads, expand)
    outs = []
    for use in (None, runs):
        meta = AttentionMetadata.build(starts, query_lens, tables, bs, window,
                                       ragged_prefill=ragged and use is not None)
        outs.append(paged_attention(qk[:, :heads], qk[:, heads:], v, cache.clone(), meta,
                                    dim ** -0.5, kv_expand, use))
    return outs


CASES = [  # heads, kv_heads, dim, expand
    (9, 3, 64, None),           # SmolLM2: three heads a KV head
    (8, 2, 128, None),          # the other fast size
    (4, 4, 32, None),           # the generic loop
    (5, 2, 64, [0, 0, 0, 1, 1]),  # 9 heads over 3 KV heads at TP 2, rank 0
    (7, 1, 64, None),           # one KV head for every head (more than a register block)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim,expand", CASES)
@pytest.mark.parametrize("window", [None, 40])
def test_decode_kernel_equals_torch_path(dtype, heads, kv_heads, dim, expand, window):
    for seed in range(3):
        torch_path, kernel = attention_both_ways(seed, dtype, heads, kv_heads, dim,
                                                 [1] * (5 + 20 * seed), expand, window)
        tolerance = 2e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(kernel.float(), torch_path.float(), atol=tolerance,
                                   rtol=tolerance)


PREFILL_CASES = [c for c in CASES if c[2] in (64, 128)]  # the prefill kernel's head sizes
needs_prefill_kernel = pytest.mark.skipif(
    not paged_prefill.available(torch.zeros(1), 64),
    reason="no AVX-512 here: torch's SDPA serves prefills")


@needs_prefill_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim,expand", PREFILL_CASES)
@pytest.mark.parametrize("window,bs", [(None, 16), (40, 16), (None, 8), (None, 32)])
def test_prefill_kernel_equals_torch_path(dtype, heads, kv_heads, dim, expand, window, bs):
    for seed in range(2):
        # lengths around the 16-query tile; the starts (0-300) put cached tokens before most
        query_lens = [1 + (7 * i + 5 * seed) % 40 for i in range(6)] + [16, 17, 33]
        torch_path, kernel = attention_both_ways(seed, dtype, heads, kv_heads, dim, query_lens,
                                                 expand, window, bs)
        tolerance = 2e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(kernel.float(), torch_path.float(), atol=tolerance,
                                   rtol=tolerance)


@needs_prefill_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefills_of_unequal_lengths_in_one_group(dtype):
    """Long and short prompts together: torch's path splits them into groups by length, the
    kernel takes them as one."""
    query_lens = [300, 8, 9, 290, 12, 1, 270, 5]
    assert len(AttentionMetadata.build([0] * 8, query_lens, [[0] * 20] * 8, 16).prefill) > 1
    torch_path, kernel = attention_both_ways(4, dtype, 9, 3, 64, query_lens, ragged=True)
    tolerance = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(kernel.float(), torch_path.float(), atol=tolerance,
                               rtol=tolerance)


@needs_prefill_kernel
def test_prefill_from_position_zero():
    """Prompts with nothing cached before them, as most prefills are."""
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(40, h, 64, generator=gen).to(dtype) for h in (9, 3, 3))
        cache = torch.zeros(2, 3, 4 * 16, 64, dtype=dtype)
        tables = [[2, 0, 3], [1]]
        outs = []
        for runs in (None, HeadRuns.of(9, 3)):
            meta = AttentionMetadata.build([0, 0], [33, 7], tables, 16)
            outs.append(paged_attention(q, k, v, cache.clone(), meta, 0.125, None, runs))
        tolerance = 2e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(outs[1].float(), outs[0].float(), atol=tolerance,
                                   rtol=tolerance)


def test_mixed_step_uses_kernel_for_its_decodes_only():
    torch_path, kernel = attention_both_ways(7, torch.float32, 9, 3, 64, [1, 30, 1, 1, 12, 1])
    torch.testing.assert_close(kernel, torch_path, atol=2e-5, rtol=2e-5)
    torch_path, kernel = attention_both_ways(7, torch.bfloat16, 9, 3, 64, [1, 30, 1, 1, 12, 1])
    torch.testing.assert_close(kernel.float(), torch_path.float(), atol=2e-2, rtol=2e-2)


def test_head_runs():
    runs = HeadRuns.of(9, 3)
    assert runs.first.tolist() == [0, 3, 6] and runs.count.tolist() == [3, 3, 3]
    runs = HeadRuns.of(5, 2, [0, 0, 0, 1, 1])
    assert runs.first.tolist() == [0, 3] and runs.count.tolist() == [3, 2]
    assert runs.kv.tolist() == [0, 1]


def test_no_compiler_means_torch_path(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("TP_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_loaded", {})
    with pytest.raises(OSError):
        build.build("paged_decode")
    assert build.load("paged_decode") is None
    assert "using the torch path" in caplog.text
    assert not paged_decode.available(torch.zeros(1))
    assert list(tmp_path.glob("kernels/*")) == []  # no half-built file left
