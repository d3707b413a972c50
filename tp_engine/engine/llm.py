"""Engine: the synchronous Python API (vLLM's `generate`, OpenAI's `create`)."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from tp_engine.engine.front import EngineFront
from tp_engine.engine.openai_api import (
    PreparedRequest,
    StreamChunks,
    prepare_chat,
    prepare_completion,
    sampling_params,
)
from tp_engine.engine.request import RequestOutput, RequestState, SyncSink
from tp_engine.engine.sampling_params import SamplingParams
from tp_engine.errors import InvalidRequestError

Prompt = str | dict


class Engine(EngineFront):
    def __init__(self, model: str, tensor_parallel_size: int = 1, device: str = "auto",
                 dtype: str = "auto", **kwargs: Any):
        super().__init__(model, tensor_parallel_size, device, dtype, **kwargs)
        self.chat = _Chat(self._core)
        self.completions = _Completions(self._core)

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt through the scheduler together; outputs in input order."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise InvalidRequestError(f"{len(sampling_params)} sampling_params for "
                                          f"{len(prompts)} prompts")
            params = sampling_params
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        core = self._core
        inputs = [prompt_input(core, p) for p in prompts]
        states: list[RequestState] = core.submit_many(
            [(ids, p, text) for (text, ids), p in zip(inputs, params)])
        try:
            bar = tqdm(total=len(states), desc="generate", disable=not use_tqdm)
            outputs = []
            for state in states:
                outputs.append(wait(state))
                bar.update(1)
            bar.close()
            return outputs
        finally:
            for state in states:
                if not state.finished:
                    core.abort(state)


def prompt_input(core, prompt: Prompt) -> tuple[str | None, list[int]]:
    if isinstance(prompt, str):
        return prompt, core.tokenizer.encode(prompt)
    if isinstance(prompt, dict) and isinstance(prompt.get("prompt_token_ids"), list):
        return prompt.get("prompt"), list(prompt["prompt_token_ids"])
    raise InvalidRequestError("a prompt is a str or {'prompt_token_ids': [int, ...]}")


def wait(state: RequestState) -> RequestOutput:
    while True:
        delta = state.get()
        if delta.error is not None:
            raise delta.error
        if delta.finish_reason is not None:
            return state.output


class Stream:
    """The chunks of a streamed response. Closing it early aborts the request."""

    def __init__(self, core, state: RequestState, request: PreparedRequest,
                 include_usage: bool):
        self._core, self._state = core, state
        self._chunks = StreamChunks(request, state, include_usage)

    def __iter__(self):
        return self

    def __next__(self):
        chunk = self._chunks.usage_chunk()
        while chunk is None and not self._chunks.done:
            chunk = self._chunks.take(self._state.get())
        if chunk is None:
            raise StopIteration
        return chunk

    def close(self) -> None:
        if not self._state.finished:
            self._core.abort(self._state)
        self._chunks.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class _Completions:
    def __init__(self, core):
        self._core = core

    def create(self, *, prompt: str | list[int], model: str | None = None,
               max_tokens: int | None = 16, temperature: float | None = None,
               top_p: float | None = None, seed: int | None = None,
               stop: str | list[str] | None = None, stream: bool = False, **extra: Any):
        params = sampling_params(max_tokens, temperature, top_p, seed, stop, extra)
        return _run(self._core, prepare_completion(self._core, prompt, model, params), stream,
                    extra)


class _ChatCompletions:
    def __init__(self, core):
        self._core = core

    def create(self, *, messages: list[dict], model: str | None = None,
               max_tokens: int | None = None, temperature: float | None = None,
               top_p: float | None = None, seed: int | None = None,
               stop: str | list[str] | None = None, stream: bool = False, **extra: Any):
        params = sampling_params(max_tokens, temperature, top_p, seed, stop, extra)
        return _run(self._core, prepare_chat(self._core, messages, model, params), stream, extra)


class _Chat:
    def __init__(self, core):
        self.completions = _ChatCompletions(core)


def _run(core, request: PreparedRequest, stream: bool, extra: dict):
    state = core.submit(request.prompt_ids, request.params, SyncSink(), request.prompt,
                        request.request_id)
    if stream:
        include_usage = bool((extra.get("stream_options") or {}).get("include_usage"))
        return Stream(core, state, request, include_usage)
    try:
        return request.response(wait(state))
    finally:
        if not state.finished:
            core.abort(state)
