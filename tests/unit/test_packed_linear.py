"""CPU linear layers through oneDNN's packed weights: the same output as F.linear at every row
count a step can have, and only a few padded shapes (each costs oneDNN a cached primitive)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tp_engine.model import packed_linear
from tp_engine.model.packed_linear import (
    MAX_PACKED_ROWS,
    MAX_PREFILL_ROWS,
    ROW_BUCKETS,
    _padded_rows,
    linear,
    pack,
)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [1, 3, 96, 128, 129, 300, 1024, MAX_PREFILL_ROWS + 1])
def test_packed_equals_f_linear(dtype, tolerance, rows):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(48, 40, generator=gen).to(dtype)
    bias = torch.randn(48, generator=gen).to(dtype)
    packed = pack(weight, bias)
    if packed is None:
        pytest.skip("oneDNN's packed linear is not available in this torch build")
    x = torch.randn(rows, 40, generator=gen).to(dtype)
    with torch.inference_mode():
        want, got = F.linear(x, weight, bias).float(), linear(x, weight, packed, bias).float()
    assert got.shape == (rows, 48)
    assert ((want - got).abs().max() / want.abs().max()).item() <= tolerance


def test_few_padded_shapes():
    def shapes(dtype):
        rows = range(1, 3 * MAX_PREFILL_ROWS)
        return {_padded_rows(torch.empty(m, 1, dtype=dtype)) for m in rows}

    step = packed_linear.PREFILL_ROWS
    prefill = set(range(step * -(-(MAX_PACKED_ROWS + 1) // step), MAX_PREFILL_ROWS + 1, step))
    assert shapes(torch.float32) == set(ROW_BUCKETS) | prefill | {0}
    assert all(_padded_rows(torch.empty(m, 1)) >= m for m in range(1, MAX_PREFILL_ROWS + 1))
    # bfloat16 prefills keep F.linear (0), decode-sized inputs take the buckets
    assert shapes(torch.bfloat16) == set(ROW_BUCKETS) | {0}
