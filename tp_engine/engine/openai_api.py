"""`engine.chat.completions.create` and `engine.completions.create`: turn OpenAI arguments into
a request, and our outputs back into OpenAI's response shapes. The sync and async fronts share
everything here but the waiting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tp_engine.engine.openai_types import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    ChoiceDelta,
    Completion,
    CompletionChoice,
    Usage,
    new_id,
)
from tp_engine.engine.request import Delta, RequestOutput
from tp_engine.engine.sampling_params import SamplingParams
from tp_engine.errors import InvalidRequestError

OPENAI_DEFAULT_TEMPERATURE = 1.0


@dataclass
class PreparedRequest:
    """A request ready to submit, and how to present its results."""
    kind: str             # "chat" or "completion"
    request_id: str
    model: str
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams

    def usage(self, completion_tokens: int) -> Usage:
        n = len(self.prompt_ids)
        return Usage(n, completion_tokens, n + completion_tokens)

    def response(self, out: RequestOutput) -> ChatCompletion | Completion:
        usage = self.usage(len(out.token_ids))
        reason = out.finish_reason
        if self.kind == "chat":
            return ChatCompletion(self.request_id, self.model, usage=usage,
                                  choices=[ChatChoice(0, ChatMessage(out.text), reason)])
        return Completion(self.request_id, self.model, usage=usage,
                          choices=[CompletionChoice(0, out.text, reason)])

    def chunk(self, delta: Delta | None, first: bool = False,
              usage: Usage | None = None) -> ChatCompletionChunk | Completion:
        """A streamed chunk; `delta` None with `usage` is the closing usage-only chunk."""
        text = delta.text if delta else ""
        reason = delta.finish_reason if delta else None
        if self.kind == "chat":
            choices = [] if delta is None else [ChatChunkChoice(
                0, ChoiceDelta(content=text, role="assistant" if first else None), reason)]
            return ChatCompletionChunk(self.request_id, self.model, choices=choices, usage=usage)
        choices = [] if delta is None else [CompletionChoice(0, text, reason)]
        return Completion(self.request_id, self.model, choices=choices, usage=usage)


def sampling_params(max_tokens: int | None, temperature: float | None, top_p: float | None,
                    seed: int | None, stop: str | list[str] | None,
                    extra: dict[str, Any]) -> SamplingParams:
    """OpenAI's arguments (and vLLM's extras: top_k, ignore_eos, stop_token_ids)."""
    known = {"top_k", "ignore_eos", "stop_token_ids", "n", "user", "stream_options",
             "max_completion_tokens", "presence_penalty", "frequency_penalty"}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise InvalidRequestError(f"unsupported parameters: {', '.join(unknown)}")
    if extra.get("n", 1) != 1:
        raise InvalidRequestError("n must be 1")
    if max_tokens is None:
        max_tokens = extra.get("max_completion_tokens")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=OPENAI_DEFAULT_TEMPERATURE if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=extra.get("top_k", 0) or 0,
        seed=seed, stop=stop,
        stop_token_ids=extra.get("stop_token_ids"),
        ignore_eos=extra.get("ignore_eos", False),
    )


def prepare_chat(core, messages: list[dict], model: str | None, params: SamplingParams
                 ) -> PreparedRequest:
    prompt = core.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = core.tokenizer.encode(prompt, add_special_tokens=False)  # the template has BOS
    return PreparedRequest("chat", new_id("chatcmpl"), model or core.config.model, prompt, ids,
                           params)


def prepare_completion(core, prompt: str | list[int], model: str | None,
                       params: SamplingParams) -> PreparedRequest:
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        text, ids = None, prompt
    elif isinstance(prompt, str):
        text, ids = prompt, core.tokenizer.encode(prompt)
    else:
        raise InvalidRequestError("prompt must be a string or a list of token ids")
    return PreparedRequest("completion", new_id("cmpl"), model or core.config.model, text, ids,
                           params)


class StreamChunks:
    """Turns a request's deltas into OpenAI stream chunks; the sync and async streams differ
    only in how they wait for the next delta."""

    def __init__(self, request: PreparedRequest, state, include_usage: bool):
        self.request, self.state = request, state
        self.include_usage = include_usage
        self.first, self.done, self.usage_due = True, False, False

    def usage_chunk(self):
        """The closing usage-only chunk, once, when it is due."""
        if not self.usage_due:
            return None
        self.usage_due, self.done = False, True
        return self.request.chunk(None, usage=self.request.usage(len(self.state.output.token_ids)))

    def take(self, delta: Delta):
        """The chunk for `delta`, or None when it has nothing to show (a held-back stop
        prefix, a partial character); raises the request's error."""
        if delta.error is not None:
            self.done = True
            raise delta.error
        if delta.finish_reason is not None:
            self.done = True
            self.usage_due = self.include_usage
        elif not delta.text and not self.first:
            return None
        chunk = self.request.chunk(delta, first=self.first)
        self.first = False
        return chunk

    def close(self) -> None:
        self.done, self.usage_due = True, False
