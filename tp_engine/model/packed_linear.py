"""CPU linear layers through oneDNN with weights packed once at load time.

`F.linear` on CPU calls an sgemm that re-packs the weight matrix on every call; with the few
rows of a decode step (1 to 128) that packing is most of the work. oneDNN's linear with a
weight reordered once (`torch.ops.mkldnn._reorder_linear_weight`, what torch.compile uses on
CPU) measured 2.5x faster on the tiny model's decode steps and 1.3x on prefills, at 2 threads.

The ops are private to torch, so every layer is probed once against `F.linear` and keeps the
plain path if the op is missing or disagrees. A packed layer serves every row count from its
packed copy, and `pack_model` then drops the plain weight (a shape-only placeholder stays, so
the parameter keeps its name, shape and dtype): on CPU each linear weight is held once. The
embedding's weight, which a tied LM head shares, stays."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

_PACKABLE = (torch.float32, torch.bfloat16)
# oneDNN builds, JIT-compiles and caches one primitive per input shape, a few hundred kB each:
# a new row count every step would grow a worker by hundreds of MB. So a linear runs on a few
# row counts only: an input of up to MAX_PACKED_ROWS rows is padded to one of ROW_BUCKETS, and
# a longer one goes through in 2,048-row pieces and a rest padded to a multiple of PREFILL_ROWS
# (8 shapes), or, where that would compute over MAX_PACKED_ROWS rows of zeros, a multiple of
# PREFILL_ROWS and a small piece: a 300-row layer of SmolLM2 took 11 ms as 256 + 44 rows
# against 17 ms padded to 512. (A small piece for every rest cost more than the padding where
# it was short: its output is concatenated, and an MLP's is 5 times its input.) On SmolLM2's
# shapes a float32 layer took 134-140 ms in 2,048-row pieces against 150-155 ms in 4,096-row
# ones (bfloat16 the same either way). The packed path measured 1.1-1.5x F.linear's sgemm at
# 256-4,096 rows in float32 and 1.0-1.6x in bfloat16 (2 Zen 4 cores, 2026-12-06).
ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128)
MAX_PACKED_ROWS = ROW_BUCKETS[-1]
_BUCKET_OF = [next(b for b in ROW_BUCKETS if b >= m) for m in range(MAX_PACKED_ROWS + 1)]
PREFILL_ROWS, MAX_PREFILL_ROWS = 256, 2048


def row_pieces(rows: int) -> list[int]:
    """The row counts an input of `rows` rows goes through in: up to MAX_PACKED_ROWS rows
    whole; beyond, 2,048-row pieces, then the rest whole, or, where that would be padded by
    more than MAX_PACKED_ROWS rows, a multiple of PREFILL_ROWS and a small last piece."""
    if rows <= MAX_PACKED_ROWS:
        return [rows]
    whole, rest = divmod(rows, MAX_PREFILL_ROWS)
    pieces = [MAX_PREFILL_ROWS] * whole
    small = rest % PREFILL_ROWS
    if rest > PREFILL_ROWS and 0 < small <= MAX_PACKED_ROWS:
        pieces += [rest - small, small]
    elif rest:
        pieces.append(rest)
    return pieces


def _padded_rows(rows: int) -> int:
    """The row count a piece of `rows` rows is computed at."""
    if rows <= MAX_PACKED_ROWS:
        return _BUCKET_OF[rows]
    return -(-rows // PREFILL_ROWS) * PREFILL_ROWS


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    if packed is None:
        return F.linear(x, weight, bias)
    if x.dim() != 2:
        return linear(x.reshape(-1, x.shape[-1]), weight, packed, bias).view(*x.shape[:-1], -1)
    rows = x.shape[0]
    if len(pieces := row_pieces(rows)) > 1:
        return torch.cat([linear(part, weight, packed, bias) for part in x.split(pieces)])
    padded = _padded_rows(rows)
    if padded > rows:  # only the padding is zeroed (F.pad fills the whole copy first)
        grown = x.new_empty(padded, x.shape[1])
        grown[:rows] = x
        grown[rows:].zero_()
        x = grown
    out = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return out[:rows] if padded > rows else out


def pack(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """`weight` reordered for oneDNN, or None where that is unavailable or not exact."""
    if weight.device.type != "cpu" or weight.dtype not in _PACKABLE or weight.dim() != 2:
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        with torch.inference_mode():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
            probe = probe.to(weight.dtype)
            want = F.linear(probe, weight, bias).float()
            got = linear(probe, weight, packed, bias).float()
    except (RuntimeError, AttributeError, TypeError) as e:
        log.debug("oneDNN linear unavailable (%s): plain F.linear", e)
        return None
    scale = want.abs().max().item() + 1e-6
    tolerance = 1e-5 if weight.dtype == torch.float32 else 2e-2
    if ((want - got).abs().max().item() / scale) > tolerance:
        log.debug("oneDNN linear disagrees with F.linear: plain F.linear")
        return None
    return packed


def pack_model(model: nn.Module) -> int:
    """Pack every layer that has a `packed` slot and drop the plain weights that only packed
    layers use; return how many were packed."""
    kept = {id(m.weight) for m in model.modules()
            if not hasattr(m, "packed") and isinstance(getattr(m, "weight", None), torch.Tensor)}
    count = 0
    for module in model.modules():
        if hasattr(module, "packed") and getattr(module, "weight", None) is not None:
            bias = getattr(module, "bias", None) if getattr(module, "packs_bias", False) else None
            module.packed = pack(module.weight, bias)
            if module.packed is None:
                continue
            count += 1
            if id(module.weight) not in kept:
                module.weight = nn.Parameter(torch.empty_like(module.weight, device="meta"),
                                             requires_grad=False)
    return count
