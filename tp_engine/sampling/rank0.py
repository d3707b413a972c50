"""Everything rank 0 does between the logits and the next tokens: the sequences' states
(penalties, bias, min_tokens, grammar), the sampler, and the logprobs. A sequence with no
state (Sample.state == -1) goes straight to the sampler, as before."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from tp_engine.sampling.grammar_matcher import Grammars
from tp_engine.sampling.logprobs import token_logprobs
from tp_engine.sampling.sampler import Sampler
from tp_engine.sampling.sequence_state import SequenceState
from tp_engine.wire import Sample, SequenceSetup, TokenLogprobs

if TYPE_CHECKING:
    from tp_engine.engine.tokenizer import Tokenizer


class RankZeroSampling:
    def __init__(self, seed: int, device: torch.device, vocab_size: int,
                 tokenizer: Callable[[], Tokenizer]):
        self.device, self.vocab_size = device, vocab_size
        self.sampler = Sampler(seed, device)
        self.grammars = Grammars(tokenizer, vocab_size)
        self.states: dict[int, SequenceState] = {}

    def update(self, releases: list[int], setups: list[SequenceSetup]) -> None:
        """Before a step: drop the states of finished sequences, take the new ones."""
        for seq_id in releases:
            self.states.pop(seq_id, None)
        for setup in setups:
            self.states[setup.seq_id] = SequenceState(setup, self.vocab_size, self.device,
                                                      self.grammars)

    def sample(self, logits: torch.Tensor, specs: list[Sample],
               ) -> tuple[torch.Tensor, list[TokenLogprobs | None] | None]:
        """One token per row; and, when a row asked for them, each row's logprobs (None for
        the rows that did not)."""
        logits = logits.float()
        stateful = [(row, self.states[s.state]) for row, s in enumerate(specs) if s.state >= 0]
        if not stateful:
            return self.sampler(logits, specs), None
        wanted = [(row, state) for row, state in stateful if state.logprobs >= 0]
        raw = logits[[row for row, _ in wanted]] if wanted else None  # a copy, unprocessed
        for row, state in stateful:
            state.process(logits[row])
        tokens = self.sampler(logits, specs)
        entries: list[TokenLogprobs | None] | None = None
        if wanted:
            rows = [row for row, _ in wanted]
            found = token_logprobs(raw, tokens[rows], [state.logprobs for _, state in wanted])
            entries = [None] * len(specs)
            for row, entry in zip(rows, found):
                entries[row] = entry
        for row, state in stateful:
            state.accept(int(tokens[row]))
        return tokens, entries

    def prompt_logprobs(self, seq_id: int, start: int, logits: torch.Tensor,
                        ) -> list[TokenLogprobs]:
        """The logprobs of the prompt tokens at start + 1, start + 2, ... that the rows of
        `logits` (positions start, start + 1, ...) predict, as far as the prompt goes."""
        state = self.states[seq_id]
        targets = state.prompt[start + 1:start + 1 + logits.shape[0]]
        if not targets:
            return []
        chosen = torch.tensor(targets, dtype=torch.long)
        return token_logprobs(logits[:len(targets)], chosen,
                              [state.prompt_logprobs] * len(targets))
