"""What rank 0 keeps for one sequence whose sampling needs more than a Sample (see
wire.SequenceSetup): the counts its penalties read, its logit bias, its min_tokens, its
grammar's matcher. Built from the setup and the tokens the sequence already produced, so a
sequence restarted after a preemption continues exactly where it was."""

from __future__ import annotations

from array import array

import torch

from tp_engine.sampling.grammar_matcher import GrammarMatcher, Grammars
from tp_engine.wire import SequenceSetup


def int32s(data: bytes) -> list[int]:
    return array("i", data).tolist()


class SequenceState:
    def __init__(self, setup: SequenceSetup, vocab_size: int, device: torch.device,
                 grammars: Grammars):
        self.setup = setup
        output = int32s(setup.output)
        self.prompt = int32s(setup.prompt)
        self.num_output = len(output)
        self.logprobs, self.prompt_logprobs = setup.logprobs, setup.prompt_logprobs
        self.counts = None  # of each output token: frequency and presence penalties
        if setup.frequency_penalty or setup.presence_penalty:
            self.counts = torch.bincount(torch.tensor(output, dtype=torch.long),
                                         minlength=vocab_size).float().to(device)
        self.seen = None  # the tokens of the prompt and the output: repetition penalty
        if setup.repetition_penalty != 1:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(self.prompt + output, dtype=torch.long)] = True
        self.bias = None
        if setup.bias_ids:
            self.bias = (torch.tensor(setup.bias_ids, dtype=torch.long, device=device),
                         torch.tensor(setup.bias_values, dtype=torch.float32, device=device))
        self.stop_ids = torch.tensor(setup.stop_ids, dtype=torch.long, device=device)
        self.matcher: GrammarMatcher | None = None
        if setup.grammar:
            self.matcher = grammars.matcher(*setup.grammar)
            for token in output:
                self.matcher.accept(token)

    def process(self, row: torch.Tensor) -> None:
        """Turn a row of logits (float32, in place) into what the sampler draws from, in
        vLLM's order: the grammar's mask, min_tokens, logit bias, then the penalties."""
        s = self.setup
        if self.matcher is not None:
            self.matcher.mask(row)
        if self.num_output < s.min_tokens and self.stop_ids.numel():
            row[self.stop_ids] = float("-inf")
        if self.bias is not None:
            row.index_add_(0, *self.bias)
        if self.seen is not None:
            # a seen token's logit moves toward zero: divided when positive, multiplied when not
            seen = row[self.seen]
            penalty = s.repetition_penalty
            row[self.seen] = torch.where(seen > 0, seen / penalty, seen * penalty)
        if self.counts is not None:
            row -= s.frequency_penalty * self.counts + s.presence_penalty * (self.counts > 0)

    def accept(self, token: int) -> None:
        self.num_output += 1
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True
        if self.matcher is not None:
            self.matcher.accept(token)
