"""One HTTP request's life in the engine: checked, submitted, streamed, measured, and always
closed. Streamed and whole responses both read the engine's chunk stream, so timing, token
counts, client disconnects and shutdown aborts work the same for both. A request's prompts
(a completions request may carry several) and their samples (n, best_of) are one job."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from tp_engine.engine.openai import (
    PreparedRequest,
    check_stream,
    prepare_chat,
    prepare_completion,
    response,
    sampling_params,
    submit,
)
from tp_engine.engine.openai_stream import ChunkStream
from tp_engine.engine.request import AsyncSink
from tp_engine.serve.errors import APIError, from_exception, unavailable
from tp_engine.serve.protocol import ChatCompletionRequest, CompletionRequest
from tp_engine.serve.state import ServerState


def prepare(core, body: ChatCompletionRequest | CompletionRequest, params,
            ) -> list[PreparedRequest]:
    """The chat template and the tokenizer: seconds for a body of megabytes, so new_job runs
    this in a thread, and /health and the other streams go on meanwhile."""
    extra = body.extra_args()
    if isinstance(body, ChatCompletionRequest):
        return [prepare_chat(core, body.template_messages(), body.model, params, extra)]
    requests: list[PreparedRequest] = []
    for index, prompt in enumerate(body.prompts()):
        requests.append(prepare_completion(core, prompt, body.model, params, index,
                                           requests[0].request_id if requests else None,
                                           extra))
    return requests


class Job:
    def __init__(self, server: ServerState, endpoint: str, body: Any, arrived: float,
                 core, requests: list[PreparedRequest]):
        self.server, self.endpoint, self.arrived = server, endpoint, arrived
        self.core, self.requests = core, requests
        with rejected(server, body):
            for request in requests:
                self._check_context(request)
            if body.stream:
                check_stream(requests)
            sink = AsyncSink(asyncio.get_running_loop())
            self.samples = submit(core, requests, sink, body.stream)
        self.stream = ChunkStream(core, requests, self.samples, sink, body.include_usage,
                                  body.continuous_usage)
        self.states = self.stream.states
        self.aborted_by_server = False
        self.error: BaseException | None = None
        self._counted, self._first, self._last = 0, 0.0, 0.0
        server.jobs.add(self)
        server.metrics.prompt_tokens.inc(sum(len(r.prompt_ids) for r in requests))

    def _check_context(self, request: PreparedRequest) -> None:
        """OpenAI refuses a prompt plus max_tokens over the context; the engine alone would
        cut the output short with finish_reason "length"."""
        limit = self.core.config.max_model_len
        prompt, wanted = len(request.prompt_ids), request.params.max_tokens or 1
        if prompt + wanted > limit:
            where = "messages" if request.kind == "chat" else "prompt"
            raise APIError(
                400, f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {prompt + wanted} tokens ({prompt} in the {where}, {wanted} in "
                f"the completion). Please reduce the length of the {where} or completion.",
                param=where, code="context_length_exceeded")

    def _produced(self) -> int:
        return sum(len(s.output.token_ids) for s in self.states)

    async def chunks(self) -> AsyncIterator[Any]:
        """The engine's chunks, measured on the way. However it ends (done, an error, the
        client gone, the task cancelled), the stream is closed, which aborts the request if it
        is still running and so frees its KV blocks at once."""
        try:
            async for chunk in self.stream:
                self._measure()
                yield chunk
        except Exception as e:  # the engine's error for this request (a worker died...)
            self.error = e
            raise
        finally:
            self.stream.close()
            self.finish()

    def _measure(self) -> None:
        n = self._produced()
        if n > self._counted:
            now = time.perf_counter()
            if self._counted == 0:
                self._first = now
                self.server.metrics.ttft.observe(now - self.arrived)
            self._last = now
            self.server.metrics.generation_tokens.inc(n - self._counted)
            self._counted = n

    def finish(self) -> None:
        if self not in self.server.jobs:
            return
        self.server.jobs.discard(self)
        self._measure()
        metrics = self.server.metrics
        reason = "error" if self.error else self.states[0].output.finish_reason or "abort"
        metrics.requests.labels(self.endpoint, reason).inc()
        if self._counted:
            metrics.e2e.observe(self._last - self.arrived)
        if self._counted > 1:
            metrics.tpot.observe((self._last - self._first) / (self._counted - 1))

    def abort(self) -> None:
        """Shutdown: end the request now. Its consumer still gets a last chunk with
        finish_reason "abort" (unlike close(), which ends the stream silently)."""
        for state in self.states:
            if not state.finished:  # a sample that has just finished keeps its output
                self.aborted_by_server = True
                self.core.abort(state)

    async def result(self) -> dict[str, Any]:
        """The whole response, as a non-streamed request gets it. However it ends, every
        sample is closed."""
        try:
            async for _ in self.chunks():
                pass
        finally:
            self.stream.close()
        if self.aborted_by_server:
            raise unavailable("the server is shutting down: request aborted")
        return response(self.core, self.requests, self.samples).to_dict()


@contextmanager
def rejected(server: ServerState, body: Any) -> Iterator[None]:
    """What goes wrong before the request runs is the client's to see: its error, counted."""
    try:
        yield
    except Exception as e:
        error = from_exception(e, set(type(body).model_fields))
        server.metrics.rejected.labels(str(error.status)).inc()
        raise error from e


async def new_job(server: ServerState, body: ChatCompletionRequest | CompletionRequest,
                  arrived: float) -> Job:
    endpoint = "chat" if isinstance(body, ChatCompletionRequest) else "completions"
    with rejected(server, body):
        core = server.admit(body.model).core
        params = sampling_params(**body.sampling_args())
        requests = await asyncio.to_thread(prepare, core, body, params)
    return Job(server, endpoint, body, arrived, core, requests)
