"""`engine.chat.completions.create` and `engine.completions.create`: turn OpenAI arguments into
requests, and our outputs back into OpenAI's response shapes. One design for both fronts: the
namespaces take the front's `run` (sync: returns the response or a stream; async: a coroutine of
them), and one stream class iterates either way. They differ only in how they wait.

A response has a choice per sample (n, best_of) of each prompt (a completions request may
carry several); all its samples wake one sink, so one stream serves them all."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tp_engine.engine import tools as tool_calls
from tp_engine.engine.openai_args import sampling_params
from tp_engine.engine.openai_logprobs import LogprobsFormat
from tp_engine.engine.openai_stream import ChunkStream, usage
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
from tp_engine.engine.request import (
    AsyncSink,
    CompletionOutput,
    Delta,
    RequestOutput,
    RequestState,
    SyncSink,
    merge_samples,
)
from tp_engine.engine.sampling_params import SamplingParams
from tp_engine.errors import InvalidRequestError


@dataclass
class PreparedRequest:
    """One prompt's request, ready to submit, and how to present its results."""
    kind: str             # "chat" or "completion"
    request_id: str
    model: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    index: int = 0        # the prompt's place among a request's several prompts
    echo: bool = False    # completions: the prompt comes back before the text
    logprobs: int | None = None   # top logprobs shown per token (None: no logprobs)
    tools: list[dict] | None = None
    tool_choice: Any = None

    def choice_index(self, sample: int) -> int:
        return self.index * self.params.n + sample

    def choices(self, core, out: RequestOutput) -> list[ChatChoice | CompletionChoice]:
        """The finished request's choices, one per sample kept."""
        samples = out.outputs if not out.samples else out.samples
        return [self._choice(core, out, sample) for sample in samples]

    def _choice(self, core, out: RequestOutput, sample: CompletionOutput):
        index = self.choice_index(sample.index)
        fmt = LogprobsFormat(core.tokenizer, self.logprobs or 0)
        if self.kind == "chat":
            content, calls, reason = sample.text, None, sample.finish_reason
            if self.tools and self.tool_choice != "none":
                content, found = tool_calls.parse_output(sample.text, self.tools,
                                                         self.tool_choice)
                if found:
                    calls, reason = found, "tool_calls"
            logprobs = None
            if self.logprobs is not None and sample.logprobs is not None:
                logprobs = fmt.chat(sample.token_ids, sample.logprobs)
            return ChatChoice(index, ChatMessage(content, tool_calls=calls), reason, logprobs)
        text, logprobs = sample.text, None
        if self.echo:
            text = (self.prompt or core.tokenizer.decode(self.prompt_ids)) + text
        if self.logprobs is not None and sample.logprobs is not None:
            ids, entries = sample.token_ids, sample.logprobs
            if self.echo and out.prompt_logprobs is not None:
                ids, entries = self.prompt_ids + ids, out.prompt_logprobs + entries
            logprobs = fmt.completion(ids, entries)
        return CompletionChoice(index, text, sample.finish_reason, logprobs)

    def chunk_choice(self, core, state: RequestState, sample: int, delta: Delta, first: bool):
        """A streamed chunk's choice for one sample's delta."""
        index = self.choice_index(sample)
        fmt = LogprobsFormat(core.tokenizer, self.logprobs or 0)
        show = self.logprobs is not None and delta.logprobs is not None
        if self.kind == "chat":
            logprobs = fmt.chat(delta.token_ids, delta.logprobs) if show else None
            return ChatChunkChoice(index, ChoiceDelta(content=delta.text,
                                                      role="assistant" if first else None),
                                   delta.finish_reason, logprobs)
        text, ids, entries = delta.text, delta.token_ids, delta.logprobs
        if first and self.echo:
            text = (self.prompt or core.tokenizer.decode(self.prompt_ids)) + text
            if show and state.output.prompt_logprobs is not None:
                ids, entries = self.prompt_ids + ids, state.output.prompt_logprobs + entries
        return CompletionChoice(index, text, delta.finish_reason,
                                fmt.completion(ids, entries) if show else None)

    def chunk(self, choices: list, usage: Usage | None = None):
        if self.kind == "chat":
            return ChatCompletionChunk(self.request_id, self.model, choices=choices,
                                       usage=usage)
        return Completion(self.request_id, self.model, choices=choices, usage=usage)


def response(core, requests: list[PreparedRequest], outputs: list[RequestOutput],
             states: list[RequestState]):
    """The whole response: every prompt's choices in order, the usage summed."""
    first = requests[0]
    choices = [c for r, out in zip(requests, outputs) for c in r.choices(core, out)]
    cls = ChatCompletion if first.kind == "chat" else Completion
    return cls(first.request_id, first.model, choices=choices, usage=usage(requests, states))


def prepare_chat(core, messages: list[dict], model: str | None, params: SamplingParams,
                 extra: dict[str, Any] | None = None) -> PreparedRequest:
    extra = extra or {}
    tools, choice = extra.get("tools"), extra.get("tool_choice")
    shown = tools if tools and choice != "none" else None
    template = core.tokenizer.chat_template
    source = template if isinstance(template, str) else str(template)
    messages, template_tools = tool_calls.template_messages(messages, shown, source)
    prompt = core.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tools=template_tools)
    ids = core.tokenizer.encode(prompt, add_special_tokens=False)  # the template has BOS
    return PreparedRequest("chat", new_id("chatcmpl"), model or core.config.model, prompt, ids,
                           params, logprobs=params.logprobs, tools=tools, tool_choice=choice)


def prepare_completion(core, prompt: str | list[int], model: str | None,
                       params: SamplingParams, index: int = 0,
                       request_id: str | None = None,
                       extra: dict[str, Any] | None = None) -> PreparedRequest:
    """One prompt; `index` and `request_id` place it among a request's several prompts."""
    extra = extra or {}
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        text, ids = None, prompt
    elif isinstance(prompt, str):
        text, ids = prompt, core.tokenizer.encode(prompt)
    else:
        raise InvalidRequestError("prompt must be a string or a list of token ids")
    return PreparedRequest("completion", request_id or new_id("cmpl"),
                           model or core.config.model, text, ids, params, index,
                           echo=bool(extra.get("echo")), logprobs=extra.get("logprobs"))


def submit(core, requests: list[PreparedRequest], sink: SyncSink | AsyncSink,
           stream: bool = False) -> list[list[RequestState]]:
    """Every prompt's samples, on one sink; if one cannot be submitted, none stays."""
    states: list[list[RequestState]] = []
    try:
        for r in requests:
            states.append(core.submit_samples(r.prompt_ids, r.params, sink, r.prompt,
                                              r.request_id, stream))
    except BaseException:
        for samples in states:
            for state in samples:
                core.abort(state)
        raise
    return states


def check_stream(requests: list[PreparedRequest]) -> None:
    if any(r.params.best_of is not None and r.params.best_of > r.params.n for r in requests):
        raise InvalidRequestError("best_of greater than n cannot be streamed")


def outputs(requests: list[PreparedRequest],
            results: list[list[RequestOutput]]) -> list[RequestOutput]:
    return [res[0] if len(res) == 1 else merge_samples(res, r.params)
            for r, res in zip(requests, results)]


def run(core, requests: list[PreparedRequest], stream: bool, include_usage: bool):
    """The sync front's way: wait in this thread."""
    if stream:
        check_stream(requests)
    sink = SyncSink()
    states = submit(core, requests, sink, stream)
    if stream:
        return ChunkStream(core, requests, states, sink, include_usage)
    flat = [s for samples in states for s in samples]
    try:
        results = [[s.result() for s in samples] for samples in states]
        return response(core, requests, outputs(requests, results), flat)
    finally:
        for state in flat:
            if not state.finished:
                core.abort(state)


async def run_async(core, requests: list[PreparedRequest], stream: bool, include_usage: bool):
    """The async front's way: wait on the event loop."""
    if stream:
        check_stream(requests)
    sink = AsyncSink(asyncio.get_running_loop())
    states = submit(core, requests, sink, stream)
    if stream:
        return ChunkStream(core, requests, states, sink, include_usage)
    flat = [s for samples in states for s in samples]
    try:
        results = [[await s.aresult() for s in samples] for samples in states]
        return response(core, requests, outputs(requests, results), flat)
    finally:
        for state in flat:
            if not state.finished:
                core.abort(state)


Run = Callable[[Any, list[PreparedRequest], bool, bool], Any]  # run or run_async


def _include_usage(extra: dict[str, Any]) -> bool:
    return bool((extra.get("stream_options") or {}).get("include_usage"))


def prompts_of(prompt: Any) -> list[str | list[int]]:
    """A completions request's prompts: one, or several (lm-eval batches them)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return list(prompt)
    return [prompt]


class Completions:
    """`engine.completions`: create() returns the response or a stream (awaitable ones from
    the async front)."""

    def __init__(self, core, run: Run):
        self._core, self._run = core, run

    def create(self, *, prompt: str | list, model: str | None = None,
               max_tokens: int | None = 16, temperature: float | None = None,
               top_p: float | None = None, seed: int | None = None,
               stop: str | list[str] | None = None, stream: bool = False,
               **extra: Any) -> Any | Awaitable[Any]:
        params = sampling_params("completion", max_tokens, temperature, top_p, seed, stop,
                                 extra)
        requests: list[PreparedRequest] = []
        for index, one in enumerate(prompts_of(prompt)):
            requests.append(prepare_completion(
                self._core, one, model, params, index,
                requests[0].request_id if requests else None, extra))
        return self._run(self._core, requests, stream, _include_usage(extra))


class ChatCompletions:
    """`engine.chat.completions`, as Completions."""

    def __init__(self, core, run: Run):
        self._core, self._run = core, run

    def create(self, *, messages: list[dict], model: str | None = None,
               max_tokens: int | None = None, temperature: float | None = None,
               top_p: float | None = None, seed: int | None = None,
               stop: str | list[str] | None = None, stream: bool = False,
               **extra: Any) -> Any | Awaitable[Any]:
        params = sampling_params("chat", max_tokens, temperature, top_p, seed, stop, extra)
        request = prepare_chat(self._core, messages, model, params, extra)
        return self._run(self._core, [request], stream, _include_usage(extra))


class Chat:
    def __init__(self, core, run: Run):
        self.completions = ChatCompletions(core, run)
