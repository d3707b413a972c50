"""A response's samples as OpenAI stream chunks, one sink waking for all of them."""

from __future__ import annotations

import asyncio
from collections import deque

from tp_engine.engine.openai_types import ChatChunkChoice, ChoiceDelta, Usage
from tp_engine.engine.request import AsyncSink, RequestState, SyncSink


def usage(requests: list, states: list[RequestState]) -> Usage:
    """Each prompt counted once, every sample's output."""
    prompt = sum(len(r.prompt_ids) for r in requests)
    completion = sum(len(s.output.token_ids) for s in states)
    return Usage(prompt, completion, prompt + completion)


class ChunkStream:
    """The deltas of a response's samples as OpenAI stream chunks: an iterator (openai.Stream)
    for the sync front, an async iterator (openai.AsyncStream) for the async one. Closing it
    early aborts every sample still running."""

    def __init__(self, core, requests: list,
                 states: list[list[RequestState]], sink: SyncSink | AsyncSink,
                 include_usage: bool, continuous_usage: bool = False):
        self._core, self.requests, self._sink = core, requests, sink
        self.states = [s for samples in states for s in samples]
        # (request, sample index, state) of each sample still streaming, and whether it has
        # sent its first chunk
        self._live = [(r, i, s) for r, samples in zip(requests, states)
                      for i, s in enumerate(samples)]
        self._started: set[int] = set()
        self.include_usage = include_usage
        self.continuous_usage = continuous_usage  # vLLM's continuous_usage_stats
        self._held = any(r.uses_tools for r in requests)
        self._ready: deque = deque()
        self.done = False

    def __iter__(self):
        return self

    def __next__(self):
        while not self._ready and not self.done:
            self._collect() or self._sink.wait()
        if not self._ready:
            raise StopIteration
        return self._ready.popleft()

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            while not self._ready and not self.done:
                self._collect() or await self._sink.wait()
        except asyncio.CancelledError:
            self.close()
            raise
        if not self._ready:
            raise StopAsyncIteration
        return self._ready.popleft()

    @property
    def usage(self) -> Usage:
        return usage(self.requests, self.states)

    def _collect(self) -> bool:
        """Read every sample's news into chunks; True when some are ready. Raises a
        sample's error."""
        live = []
        for request, sample, state in self._live:
            delta = state.take()
            if delta.error is not None:
                self.close()
                raise delta.error
            if delta.finish_reason is None:
                live.append((request, sample, state))
            if self._held:  # tool calls are read from the whole text: sent at the end
                if delta.finish_reason is not None:
                    self._ready.append(self._whole(request, state))
                continue
            first = id(state) not in self._started
            if delta.finish_reason is None and not (
                    delta.text or (delta.token_ids and (first or request.logprobs is not None))):
                continue  # nothing to show yet (a held-back stop prefix, a partial character)
            self._started.add(id(state))
            choice = request.chunk_choice(self._core, state, sample, delta, first)
            shown = self.usage if self.continuous_usage else None
            self._ready.append(request.chunk([choice], shown))
        self._live = live
        if not live:
            self.done = True
            if self.include_usage:
                self._ready.append(self.requests[0].chunk([], self.usage))
        return bool(self._ready)

    def _whole(self, request, state: RequestState):
        """A held stream's one chunk for a finished sample: its content or its tool calls."""
        choice = request.choices(self._core, state.output)[0]
        calls = choice.message.tool_calls
        if calls:
            calls = [{"index": i, **call} for i, call in enumerate(calls)]
        delta = ChoiceDelta(content=choice.message.content, role="assistant", tool_calls=calls)
        return request.chunk([ChatChunkChoice(choice.index, delta, choice.finish_reason)])

    def close(self) -> None:
        for state in self.states:
            if not state.finished:
                self._core.abort(state)
        self.done = True

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
