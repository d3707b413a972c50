"""RMSNorm, replicated on every rank, written to match transformers' arithmetic (the order of
casts included) so float32 logits agree to 1e-4. Given the residual stream, it adds the layer's
output to it first and returns both, so that on the CPU the add and the norm are one pass
(tp_engine/kernels/layer_ops)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tp_engine.kernels import layer_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or with `residual`: (norm(residual + x), residual + x)."""
        if (layer_ops.serves(x) and x.is_contiguous() and self.weight.dtype == x.dtype
                and (residual is None or residual.is_contiguous())):
            if residual is None:
                return layer_ops.rms_norm(x, self.weight, self.eps)
            return layer_ops.rms_norm(x, self.weight, self.eps, residual), residual
        if residual is None:
            return self._norm(x)
        residual = residual + x
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32:  # one fused kernel, bit-identical to the steps below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
