"""Logprobs in OpenAI's two shapes, from the engine's per-token dicts ({token id: logprob},
the chosen token first): completions' parallel lists, and chat's list of entries."""

from __future__ import annotations

from typing import Any

from tp_engine.engine.request import TokenLogprobs


def _top(entry: TokenLogprobs, k: int) -> list[tuple[int, float]]:
    # the chosen token is in the dict even when it is not among the k most likely
    return sorted(entry.items(), key=lambda item: -item[1])[:k]


class LogprobsFormat:
    def __init__(self, tokenizer, k: int):
        self.tokenizer, self.k = tokenizer, k

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def completion(self, token_ids: list[int], entries: list[TokenLogprobs | None],
                   offset: int = 0) -> dict[str, Any]:
        """{tokens, token_logprobs, top_logprobs, text_offset}; an entry None (the prompt's
        first token) has no logprob."""
        tokens = [self.text(t) for t in token_ids]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [None if e is None else e[t] for t, e in zip(token_ids, entries)],
            "top_logprobs": [None if e is None else {self.text(i): lp for i, lp in
                                                     _top(e, self.k)} for e in entries],
            "text_offset": offsets,
        }

    def chat(self, token_ids: list[int], entries: list[TokenLogprobs]) -> dict[str, Any]:
        return {"content": [
            {**self._entry(t, e[t]), "top_logprobs": [self._entry(i, lp)
                                                       for i, lp in _top(e, self.k)]}
            for t, e in zip(token_ids, entries)]}

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
