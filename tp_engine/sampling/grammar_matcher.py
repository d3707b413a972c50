"""Rank 0's side of structured output: a grammar is compiled once per (kind, text) and kept;
each constrained sequence holds a matcher that gives the next token's mask and consumes the
token drawn."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from tp_engine.sampling.grammar import grammar_text, llguidance

if TYPE_CHECKING:
    from tp_engine.engine.tokenizer import Tokenizer

MAX_GRAMMARS = 256  # compiled grammars kept, least recently used dropped first


class Grammars:
    """Rank 0's grammar library: the tokenizer, built the first time a grammar is asked for
    (about a second), and the compiled grammars."""

    def __init__(self, tokenizer: Callable[[], Tokenizer], vocab_size: int):
        self._load_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids: list[int] = []
        self._tokenizer = None
        self._compiled: OrderedDict[tuple[str, str], object] = OrderedDict()  # matchers
        self._lock = threading.Lock()

    def matcher(self, kind: str, text: str) -> GrammarMatcher:
        """A matcher at the grammar's start. The grammar is compiled the first time it is
        asked for; later sequences get a copy of that first matcher, compiled already."""
        llg = llguidance()
        with self._lock:
            if self._tokenizer is None:
                tokenizer = self._load_tokenizer()
                self.eos_token_ids = tokenizer.eos_token_ids
                self._tokenizer = llg.LLTokenizer(tokenizer.to_json(), n_vocab=self.vocab_size,
                                                  eos_token=self.eos_token_ids or None)
            key = (kind, text)
            compiled = self._compiled.get(key)
            if compiled is None:
                compiled = self._compiled[key] = llg.LLMatcher(
                    self._tokenizer, grammar_text(kind, text), log_level=0)
                if len(self._compiled) > MAX_GRAMMARS:
                    self._compiled.popitem(last=False)
            self._compiled.move_to_end(key)
            return GrammarMatcher(compiled.deep_copy(), self.vocab_size, self.eos_token_ids)


class GrammarMatcher:
    def __init__(self, matcher, vocab_size: int, eos_token_ids: list[int]):
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._eos = torch.tensor(eos_token_ids, dtype=torch.long)

    def mask(self, row: torch.Tensor) -> None:
        """Leave only the tokens the grammar allows next in a row of logits (in place); once
        the grammar is complete (or broken), only EOS."""
        if self._matcher.is_error():
            allowed = torch.zeros(row.shape[0], dtype=torch.bool)
            allowed[self._eos] = True
        else:
            bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
            allowed = torch.from_numpy(np.unpackbits(bits, bitorder="little")[:row.shape[0]]
                                       .astype(bool))
            if allowed.shape[0] < row.shape[0]:
                allowed = torch.cat([allowed, allowed.new_zeros(row.shape[0] - allowed.shape[0])])
        row.masked_fill_(~allowed.to(row.device), float("-inf"))

    def accept(self, token: int) -> None:
        self._matcher.consume_token(token)
