"""AsyncEngine: the same engine for asyncio. Many coroutines of one event loop can have
requests in flight at once; deltas reach them through asyncio queues fed by the stream-back
thread. A cancelled coroutine or a closed stream aborts its request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from tp_engine.engine.front import EngineFront
from tp_engine.engine.llm import prompt_input
from tp_engine.engine.openai_api import (
    PreparedRequest,
    StreamChunks,
    prepare_chat,
    prepare_completion,
    sampling_params,
)
from tp_engine.engine.request import AsyncSink, RequestOutput, RequestState
from tp_engine.engine.sampling_params import SamplingParams


class AsyncEngine(EngineFront):
    def __init__(self, model: str, tensor_parallel_size: int = 1, device: str = "auto",
                 dtype: str = "auto", **kwargs: Any):
        super().__init__(model, tensor_parallel_size, device, dtype, **kwargs)
        self.chat = _Chat(self._core)
        self.completions = _Completions(self._core)

    async def generate(self, prompt: str | dict, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's output as it grows (vLLM's AsyncLLM.generate)."""
        text, ids = prompt_input(self._core, prompt)
        state = self._core.submit(ids, sampling_params or SamplingParams(),
                                  AsyncSink(asyncio.get_running_loop()), text, request_id)
        try:
            while True:
                delta = await state.aget()
                if delta.error is not None:
                    raise delta.error
                yield state.output
                if delta.finish_reason is not None:
                    return
        finally:
            if not state.finished:
                self._core.abort(state)

    @property
    def core(self):
        """For the server: metrics and limits."""
        return self._core


async def wait(state: RequestState) -> RequestOutput:
    while True:
        delta = await state.aget()
        if delta.error is not None:
            raise delta.error
        if delta.finish_reason is not None:
            return state.output


class AsyncStream:
    """An async iterator of chunks, as openai.AsyncStream. Closing it early aborts."""

    def __init__(self, core, state: RequestState, request: PreparedRequest,
                 include_usage: bool):
        self._core, self._state = core, state
        self._chunks = StreamChunks(request, state, include_usage)

    def __aiter__(self):
        return self

    async def __anext__(self):
        chunk = self._chunks.usage_chunk()
        try:
            while chunk is None and not self._chunks.done:
                chunk = self._chunks.take(await self._state.aget())
        except asyncio.CancelledError:
            self.close()
            raise
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        if not self._state.finished:
            self._core.abort(self._state)
        self._chunks.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


async def _run(core, request: PreparedRequest, stream: bool, extra: dict):
    sink = AsyncSink(asyncio.get_running_loop())
    state = core.submit(request.prompt_ids, request.params, sink, request.prompt,
                        request.request_id)
    if stream:
        include_usage = bool((extra.get("stream_options") or {}).get("include_usage"))
        return AsyncStream(core, state, request, include_usage)
    try:
        return request.response(await wait(state))
    finally:
        if not state.finished:
            core.abort(state)


class _Completions:
    def __init__(self, core):
        self._core = core

    async def create(self, *, prompt: str | list[int], model: str | None = None,
                     max_tokens: int | None = 16, temperature: float | None = None,
                     top_p: float | None = None, seed: int | None = None,
                     stop: str | list[str] | None = None, stream: bool = False, **extra: Any):
        params = sampling_params(max_tokens, temperature, top_p, seed, stop, extra)
        request = prepare_completion(self._core, prompt, model, params)
        return await _run(self._core, request, stream, extra)


class _ChatCompletions:
    def __init__(self, core):
        self._core = core

    async def create(self, *, messages: list[dict], model: str | None = None,
                     max_tokens: int | None = None, temperature: float | None = None,
                     top_p: float | None = None, seed: int | None = None,
                     stop: str | list[str] | None = None, stream: bool = False, **extra: Any):
        params = sampling_params(max_tokens, temperature, top_p, seed, stop, extra)
        request = prepare_chat(self._core, messages, model, params)
        return await _run(self._core, request, stream, extra)


class _Chat:
    def __init__(self, core):
        self.completions = _ChatCompletions(core)
