"""CPU linear layers through oneDNN's packed weights: the same output as F.linear at every row
count a step can have, and only a few padded shapes (each costs oneDNN a cached primitive)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tp_engine.model import packed_linear
from tp_engine.model.packed_linear import (
    MAX_PACKED_ROWS,
    MAX_PREFILL_ROWS,
    ROW_BUCKETS,
    _padded_rows,
    linear,
    pack,
    row_pieces,
)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [1, 3, 96, 128, 129, 300, 700, 1024, MAX_PREFILL_ROWS + 1,
                                  MAX_PREFILL_ROWS + 300])
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


def _computed(rows: int) -> list[int]:
    """The row counts a linear of `rows` rows computes at."""
    return [_padded_rows(p) for p in row_pieces(rows)]


def test_few_padded_shapes():
    longest = 3 * MAX_PREFILL_ROWS
    shapes = {c for m in range(1, longest) for c in _computed(m)}
    step = packed_linear.PREFILL_ROWS
    prefill = set(range(step * -(-(MAX_PACKED_ROWS + 1) // step), MAX_PREFILL_ROWS + 1, step))
    assert shapes == set(ROW_BUCKETS) | prefill


def test_pieces_cover_the_rows_with_little_padding():
    for rows in range(MAX_PACKED_ROWS + 1, 3 * MAX_PREFILL_ROWS):
        pieces = row_pieces(rows)
        assert sum(pieces) == rows and max(pieces) <= MAX_PREFILL_ROWS
        assert all(_padded_rows(p) >= p for p in pieces)
        assert sum(_computed(rows)) - rows <= MAX_PACKED_ROWS, rows


def test_pack_model_holds_each_weight_once():
    """Packed layers drop their plain weight; the embedding's, shared with a tied head, stays."""
    class Head(nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight, self.packed = weight, None

    embed = nn.Embedding(64, 40)
    model = nn.ModuleDict({"embed": embed, "head": Head(embed.weight), "proj": Head(
        nn.Parameter(torch.randn(48, 40, generator=torch.Generator().manual_seed(0))))})
    plain = model["proj"].weight.detach().clone()
    if packed_linear.pack_model(model) != 2:
        pytest.skip("oneDNN's packed linear is not available in this torch build")
    assert model["proj"].weight.is_meta and model["proj"].weight.shape == (48, 40)
    assert model["head"].weight is embed.weight and not embed.weight.is_meta
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = linear(x, model["proj"].weight, model["proj"].packed)
    torch.testing.assert_close(got, F.linear(x, plain), atol=1e-5, rtol=1e-5)
