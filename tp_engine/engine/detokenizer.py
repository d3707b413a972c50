"""Streaming token -> text conversion with O(1) work per token.

Decoding token by token is not simply concatenating per-token strings: a multi-byte UTF-8
character may be spread over several byte-level tokens, and SentencePiece-style decoders change
a token's leading space depending on what precedes it. We therefore keep two offsets into the
output ids (the "prefix/read offset" technique also used by vLLM and TGI):

- `prefix_offset`: start of a short window of already-emitted tokens, decoded for context;
- `read_offset`: end of the emitted tokens.

Each step decodes `ids[prefix:read]` and `ids[prefix:]` and emits the difference, but only once
the tail is a complete character; the window then slides forward, so its size stays bounded.
"""

from __future__ import annotations

from tp_engine.engine.tokenizer import Tokenizer

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas for one request.

    The deltas concatenate to `tokenizer.decode(output_ids)` once `flush()` has been called
    (flush only matters when generation stops in the middle of a multi-byte character).

    The window is built from output tokens only, never the prompt: decoding with prompt context
    would give SentencePiece tokenizers a leading space that `decode(output_ids)` strips, and
    streamed and non-streamed text must agree.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.output_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(
            self.output_ids[start:end], skip_special_tokens=self.skip_special_tokens
        )

    def _step(self, final: bool) -> str:
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        # A trailing U+FFFD means the last token ended mid-character: wait for the rest of its
        # bytes. (Valid text cannot have an incomplete character anywhere but at the end.)
        if not final and new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        # Nothing new (e.g. a skipped special token): keep the window so the next decode still
        # has real context in front of it.
        if len(new_text) <= len(prefix_text):
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.output_ids)
        self._pieces.append(delta)
        return delta

    def add(self, token_ids: list[int]) -> str:
        """Append newly generated ids; return the text they complete (possibly "")."""
        if not token_ids:
            return ""
        self.output_ids.extend(token_ids)
        return self._step(final=False)

    def flush(self) -> str:
        """Emit whatever is still held back (an incomplete character becomes U+FFFD)."""
        if self._read_offset == len(self.output_ids):
            return ""
        return self._step(final=True)
