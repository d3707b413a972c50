"""Logprobs as rank 0 reports them: the log-softmax of the model's logits (before penalties,
bias or temperature, as vLLM's default "raw" logprobs), for the token that was chosen and for
the k most likely ones."""

from __future__ import annotations

import torch

from tp_engine.wire import TokenLogprobs


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor,
                   top: list[int]) -> list[TokenLogprobs]:
    """For each row of `logits` ([rows, vocab]): [chosen's logprob, top[i] ids, their
    logprobs]."""
    logprobs = logits.float().log_softmax(dim=-1)
    picked = logprobs.gather(1, chosen.to(logprobs.device).view(-1, 1)).squeeze(1).tolist()
    k = max(top, default=0)
    if k == 0:
        return [[lp, [], []] for lp in picked]
    values, ids = logprobs.topk(k, dim=-1)
    values, ids = values.tolist(), ids.tolist()
    return [[lp, i[:n], v[:n]] for lp, i, v, n in zip(picked, ids, values, top)]
