"""`engine.chat.completions.create` and `engine.completions.create`: turn OpenAI arguments into
a request, and our outputs back into OpenAI's response shapes. One design for both fronts: the
namespaces take the front's `run` (sync: returns the response or a stream; async: a coroutine of
them), and one stream class iterates either way. They differ only in how they wait."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
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
from tp_engine.engine.request import AsyncSink, Delta, RequestOutput, RequestState, SyncSink
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
    index: int = 0        # its choice's index, among a request's several prompts

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
                          choices=[CompletionChoice(self.index, out.text, reason)])

    def chunk(self, delta: Delta | None, first: bool = False,
              usage: Usage | None = None) -> ChatCompletionChunk | Completion:
        """A streamed chunk; `delta` None with `usage` is the closing usage-only chunk."""
        text = delta.text if delta else ""
        reason = delta.finish_reason if delta else None
        if self.kind == "chat":
            choices = [] if delta is None else [ChatChunkChoice(
                0, ChoiceDelta(content=text, role="assistant" if first else None), reason)]
            return ChatCompletionChunk(self.request_id, self.model, choices=choices, usage=usage)
        choices = [] if delta is None else [CompletionChoice(self.index, text, reason)]
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
                       params: SamplingParams, index: int = 0,
                       request_id: str | None = None) -> PreparedRequest:
    """One prompt; `index` and `request_id` place it among a request's several prompts."""
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        text, ids = None, prompt
    elif isinstance(prompt, str):
        text, ids = prompt, core.tokenizer.encode(prompt)
    else:
        raise InvalidRequestError("prompt must be a string or a list of token ids")
    return PreparedRequest("completion", request_id or new_id("cmpl"),
                           model or core.config.model, text, ids, params, index)


class ChunkStream:
    """A request's deltas as OpenAI stream chunks: an iterator (openai.Stream) for the sync
    front, an async iterator (openai.AsyncStream) for the async one. Closing it early aborts
    the request."""

    def __init__(self, core, state: RequestState, request: PreparedRequest,
                 include_usage: bool, continuous_usage: bool = False):
        self._core, self._state, self.request = core, state, request
        self.include_usage = include_usage
        self.continuous_usage = continuous_usage  # vLLM's continuous_usage_stats
        self.first, self.done, self.usage_due = True, False, False

    def __iter__(self):
        return self

    def __next__(self):
        chunk = self._usage_chunk()
        while chunk is None and not self.done:
            chunk = self._take(self._state.get())
        if chunk is None:
            raise StopIteration
        return chunk

    def __aiter__(self):
        return self

    async def __anext__(self):
        chunk = self._usage_chunk()
        try:
            while chunk is None and not self.done:
                chunk = self._take(await self._state.aget())
        except asyncio.CancelledError:
            self.close()
            raise
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    def _usage_chunk(self):
        """The closing usage-only chunk, once, when it is due."""
        if not self.usage_due:
            return None
        self.usage_due, self.done = False, True
        tokens = len(self._state.output.token_ids)
        return self.request.chunk(None, usage=self.request.usage(tokens))

    def _take(self, delta: Delta):
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
        usage = None
        if self.continuous_usage:
            usage = self.request.usage(len(self._state.output.token_ids))
        chunk = self.request.chunk(delta, first=self.first, usage=usage)
        self.first = False
        return chunk

    def close(self) -> None:
        if not self._state.finished:
            self._core.abort(self._state)
        self.done, self.usage_due = True, False

    async def aclose(self) -> None:
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def run(core, request: PreparedRequest, stream: bool, include_usage: bool):
    """The sync front's way: wait in this thread."""
    state = core.submit(request.prompt_ids, request.params, SyncSink(), request.prompt,
                        request.request_id)
    if stream:
        return ChunkStream(core, state, request, include_usage)
    try:
        return request.response(state.result())
    finally:
        if not state.finished:
            core.abort(state)


async def run_async(core, request: PreparedRequest, stream: bool, include_usage: bool):
    """The async front's way: wait on the event loop."""
    sink = AsyncSink(asyncio.get_running_loop())
    state = core.submit(request.prompt_ids, request.params, sink, request.prompt,
                        request.request_id)
    if stream:
        return ChunkStream(core, state, request, include_usage)
    try:
        return request.response(await state.aresult())
    finally:
        if not state.finished:
            core.abort(state)


Run = Callable[[Any, PreparedRequest, bool, bool], Any]  # run or run_async


def _include_usage(extra: dict[str, Any]) -> bool:
    return bool((extra.get("stream_options") or {}).get("include_usage"))


class Completions:
    """`engine.completions`: create() returns the response or a stream (awaitable ones from
    the async front)."""

    def __init__(self, core, run: Run):
        self._core, self._run = core, run

    def create(self, *, prompt: str | list[int], model: str | None = None,
               max_tokens: int | None = 16, temperature: float | None = None,
               top_p: float | None = None, seed: int | None = None,
               stop: str | list[str] | None = None, stream: bool = False,
               **extra: Any) -> Any | Awaitable[Any]:
        params = sampling_params(max_tokens, temperature, top_p, seed, stop, extra)
        request = prepare_completion(self._core, prompt, model, params)
        return self._run(self._core, request, stream, _include_usage(extra))


class ChatCompletions:
    """`engine.chat.completions`, as Completions."""

    def __init__(self, core, run: Run):
        self._core, self._run = core, run

    def create(self, *, messages: list[dict], model: str | None = None,
               max_tokens: int | None = None, temperature: float | None = None,
               top_p: float | None = None, seed: int | None = None,
               stop: str | list[str] | None = None, stream: bool = False,
               **extra: Any) -> Any | Awaitable[Any]:
        params = sampling_params(max_tokens, temperature, top_p, seed, stop, extra)
        request = prepare_chat(self._core, messages, model, params)
        return self._run(self._core, request, stream, _include_usage(extra))


class Chat:
    def __init__(self, core, run: Run):
        self.completions = ChatCompletions(core, run)
