"""What users call: `Engine` (vLLM's `generate`, OpenAI's `create`, waiting in the caller's
thread) and `AsyncEngine` (the same for asyncio: many coroutines of one loop can have requests
in flight at once, their deltas fed to asyncio queues by the stream-back thread; a cancelled
coroutine or a closed stream aborts its request). They share the front below and the OpenAI
namespaces of engine/openai.py, and differ only in how they wait.

The front holds the core; the core never refers back to the front, so dropping the last
reference to an engine terminates it at once (no cycle waits for the collector)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tp_engine.config import EngineConfig
from tp_engine.engine.core import EngineCore
from tp_engine.engine.openai import Chat, Completions, Run, run, run_async
from tp_engine.engine.request import AsyncSink, RequestOutput, RequestState, merge_samples
from tp_engine.engine.resources import track
from tp_engine.engine.sampling_params import SamplingParams
from tp_engine.errors import ConfigError, EngineError, InvalidRequestError

Prompt = str | dict


class EngineFront:
    """Construction from keywords or YAML, the state, the lifecycle calls, and the OpenAI
    namespaces (`chat.completions`, `completions`), which wait the front's way: `_run`."""

    _run: Run

    def __init__(self, model: str | Path, tensor_parallel_size: int = 1, device: str = "auto",
                 dtype: str = "auto", **kwargs: Any):
        try:
            config = EngineConfig(model=str(model), tensor_parallel_size=tensor_parallel_size,
                                  device=device, dtype=dtype, **kwargs)
            self._core = EngineCore(config)
        except EngineError:
            raise
        except (ValueError, TypeError, OSError) as e:  # the user's to fix: say so plainly
            raise ConfigError(str(e)) from e
        self.chat = Chat(self._core, type(self)._run)
        self.completions = Completions(self._core, type(self)._run)
        track(self)

    @classmethod
    def from_config(cls, path: str | Path, **overrides: Any):
        return cls(**EngineConfig.from_yaml(path, **overrides).keywords())

    @property
    def core(self) -> EngineCore:
        """The engine's core, for the server, the benchmarks and the tests: its tokenizer,
        replicas (each a worker group, scheduler and request loop) and stats()."""
        return self._core

    @property
    def state(self) -> str:
        core = getattr(self, "_core", None)
        return core.state if core is not None else "failed"

    @property
    def config(self) -> EngineConfig:
        return self._core.config

    @property
    def restarts(self) -> int:
        """How many times a worker group was restarted after a worker died."""
        core = getattr(self, "_core", None)
        return core.restarts if core is not None else 0

    @property
    def worker_pids(self) -> list[int]:
        """Every worker's pid, group by group."""
        return self._core.worker_pids

    @property
    def tokenizer(self):
        return self._core.tokenizer

    def terminate(self, timeout: float | None = None) -> None:
        core = getattr(self, "_core", None)  # absent when the constructor raised
        if core is not None:
            core.terminate(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    def __del__(self) -> None:
        self.terminate()


class Engine(EngineFront):
    _run = staticmethod(run)  # waits in the caller's thread

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
        requests: list[list[RequestState]] = core.submit_many(
            [(ids, p, text) for (text, ids), p in zip(inputs, params)])
        try:
            bar = tqdm(total=len(requests), desc="generate", disable=not use_tqdm)
            outputs = []
            for samples, p in zip(requests, params):
                outputs.append(merge_samples([state.result() for state in samples], p))
                bar.update(1)
            bar.close()
            return outputs
        finally:
            for samples in requests:
                for state in samples:
                    if not state.finished:
                        core.abort(state)


class AsyncEngine(EngineFront):
    _run = staticmethod(run_async)  # create() returns a coroutine: waits on the event loop

    async def generate(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's output as it grows (vLLM's AsyncLLM.generate); with n > 1,
        each time with every sample in `.outputs`."""
        text, ids = prompt_input(self._core, prompt)
        params = sampling_params or SamplingParams()
        sink = AsyncSink(asyncio.get_running_loop())
        states = self._core.submit_samples(ids, params, sink, text, request_id, stream=True)
        try:
            while True:
                await sink.wait()
                deltas = [state.take() for state in states]
                for delta in deltas:
                    if delta.error is not None:
                        raise delta.error
                yield merge_samples([state.output for state in states], params)
                if all(state.output.finished for state in states):
                    return
        finally:
            for state in states:
                if not state.finished:
                    self._core.abort(state)


def prompt_input(core: EngineCore, prompt: Prompt) -> tuple[str | None, list[int]]:
    if isinstance(prompt, str):
        return prompt, core.tokenizer.encode(prompt)
    if isinstance(prompt, dict) and isinstance(prompt.get("prompt_token_ids"), list):
        return prompt.get("prompt"), list(prompt["prompt_token_ids"])
    raise InvalidRequestError("a prompt is a str or {'prompt_token_ids': [int, ...]}")
