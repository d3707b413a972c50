"""One HTTP request's life in the engine: checked, submitted, streamed, measured, and always
closed. Streamed and whole responses both read the engine's chunk stream, so timing, token
counts, client disconnects and shutdown aborts work the same for both."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from tp_engine.engine.openai import (
    ChunkStream,
    PreparedRequest,
    prepare_chat,
    prepare_completion,
    sampling_params,
)
from tp_engine.engine.request import AsyncSink
from tp_engine.engine.sampling_params import SamplingParams
from tp_engine.serve.errors import APIError, from_exception, unavailable
from tp_engine.serve.protocol import ChatCompletionRequest, CompletionRequest
from tp_engine.serve.state import ServerState


def prepare(core, body: ChatCompletionRequest | CompletionRequest, params: SamplingParams,
            index: int, request_id: str | None) -> PreparedRequest:
    """The chat template and the tokenizer: seconds for a body of megabytes, so new_jobs runs
    this in a thread, and /health and the other streams go on meanwhile."""
    if isinstance(body, ChatCompletionRequest):
        return prepare_chat(core, body.template_messages(), body.model, params)
    return prepare_completion(core, body.prompts()[index], body.model, params, index,
                              request_id)


class Job:
    def __init__(self, server: ServerState, endpoint: str, body: Any, arrived: float,
                 core, request: PreparedRequest):
        self.server, self.endpoint, self.arrived = server, endpoint, arrived
        self.core = core
        with rejected(server, body):
            self._check_context(request)
            # submitted here rather than by the engine's create(), to check the context first
            self.state = core.submit(request.prompt_ids, request.params,
                                     AsyncSink(asyncio.get_running_loop()), request.prompt,
                                     request.request_id)
        self.request = request
        self.stream = ChunkStream(core, self.state, request, body.include_usage,
                                  body.continuous_usage)
        self.aborted_by_server = False
        self.error: BaseException | None = None
        self._counted, self._first, self._last = 0, 0.0, 0.0
        server.jobs.add(self)
        server.metrics.prompt_tokens.inc(len(request.prompt_ids))

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
        n = len(self.state.output.token_ids)
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
        reason = "error" if self.error else self.state.output.finish_reason or "abort"
        metrics.requests.labels(self.endpoint, reason).inc()
        if self._counted:
            metrics.e2e.observe(self._last - self.arrived)
        if self._counted > 1:
            metrics.tpot.observe((self._last - self._first) / (self._counted - 1))

    def abort(self) -> None:
        """Shutdown: end the request now. Its consumer still gets a last chunk with
        finish_reason "abort" (unlike close(), which ends the stream silently)."""
        if not self.state.finished:  # a request that has just finished keeps its output
            self.aborted_by_server = True
            self.core.abort(self.state)

    async def result(self) -> dict[str, Any]:
        """The whole response, as a non-streamed request gets it."""
        async for _ in self.chunks():
            pass
        if self.aborted_by_server:
            raise unavailable("the server is shutting down: request aborted")
        return self.request.response(self.state.output).to_dict()


@contextmanager
def rejected(server: ServerState, body: Any) -> Iterator[None]:
    """What goes wrong before the request runs is the client's to see: its error, counted."""
    try:
        yield
    except Exception as e:
        error = from_exception(e, set(type(body).model_fields))
        server.metrics.rejected.labels(str(error.status)).inc()
        raise error from e


async def new_jobs(server: ServerState, body: ChatCompletionRequest | CompletionRequest,
                   arrived: float) -> list[Job]:
    """One job per prompt (a chat has one), sharing the response's id. If one cannot be
    made, none runs."""
    endpoint = "chat" if isinstance(body, ChatCompletionRequest) else "completions"
    count = len(body.prompts()) if isinstance(body, CompletionRequest) else 1
    jobs: list[Job] = []
    try:
        with rejected(server, body):
            if count > 1 and body.stream:
                raise APIError(400, "several prompts in a streamed request are not supported",
                               param="prompt")
            core = server.admit(body.model).core
            params = sampling_params(**body.sampling_args())
        request_id = None
        for index in range(count):
            with rejected(server, body):
                request = await asyncio.to_thread(prepare, core, body, params, index,
                                                  request_id)
            request_id = request.request_id
            jobs.append(Job(server, endpoint, body, arrived, core, request))
    except BaseException:
        for job in jobs:
            job.stream.close()  # aborts the request, frees its blocks
            job.finish()
        raise
    return jobs


async def results(jobs: list[Job]) -> dict[str, Any]:
    """The whole response of one or several jobs: their choices in order, their usage summed.
    However it ends, every job is closed."""
    try:
        parts = await asyncio.gather(*(job.result() for job in jobs))
    finally:
        for job in jobs:
            job.stream.close()
    response = parts[0]
    if len(parts) > 1:
        response["choices"] = [choice for part in parts for choice in part["choices"]]
        response["usage"] = {key: sum(part["usage"][key] for part in parts)
                             for key in response["usage"]}
    return response
