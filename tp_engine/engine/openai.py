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

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def choice_index(self, sample: int) -> int:
        return self.index * self.params.n + sample

    def choices(self, core, out: RequestOutput) -> list[ChatChoice | CompletionChoice]:
        """The finished request's choices, one per sample kept."""
        return [self._choice(core, out, sample) for sample in out.outputs]

    def _echoed(self, core, text: str, ids: list[int], entries: list | None,
                prompt_logprobs: list | None) -> tuple[str, list[int], list | None]:
        """Completions' echo: the prompt, and its logprobs when shown, before the output's."""
        text = (self.prompt or core.tokenizer.decode(self.prompt_ids)) + text
        if entries is not None and prompt_logprobs is not None:
            ids, entries = self.prompt_ids + ids, prompt_logprobs + entries
        return text, ids, entries

    def _choice(self, core, out: RequestOutput, sample: CompletionOutput):
        index = self.choice_index(sample.index)
        fmt = LogprobsFormat(core.tokenizer, self.logprobs or 0)
        if self.kind == "chat":
            content, calls, reason = sample.text, None, sample.finish_reason
            if self.uses_tools:
                content, found = tool_calls.parse_output(sample.text, self.tools,
                                                         self.tool_choice)
                if found:
                    calls, reason = found, "tool_calls"
            logprobs = None
            if self.logprobs is not None and sample.logprobs is not None:
                logprobs = fmt.chat(sample.token_ids, sample.logprobs)
            return ChatChoice(index, ChatMessage(content, tool_calls=calls), reason, logprobs)
        shown = sample.logprobs if self.logprobs is not None else None
        text, ids, entries = sample.text, sample.token_ids, shown
        if self.echo:
            text, ids, entries = self._echoed(core, text, ids, entries, out.prompt_logprobs)
        return CompletionChoice(index, text, sample.finish_reason,
                                None if entries is None else fmt.completion(ids, entries))

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
        text, ids, entries = delta.text, delta.token_ids, delta.logprobs if show else None
        if first and self.echo:
            text, ids, entries = self._echoed(core, text, ids, entries,
                                              state.output.prompt_logprobs)
        return CompletionChoice(index, text, delta.finish_reason,
                                None if entries is None else fmt.completion(ids, entries))

    def chunk(self, choices: list, usage: Usage | None = None):
        if self.kind == "chat":
            return ChatCompletionChunk(self.request_id, self.model, choices=choices,
                                       usage=usage)
        return Completion(self.request_id, self.model, choices=choices, usage=usage)


def response(core, requests: list[PreparedRequest], states: list[list[RequestState]]):
    """The whole response of finished requests: every prompt's choices in order (its samples
    merged, see merge_samples), the usage summed."""
    first = requests[0]
    choices = [c for r, samples in zip(requests, states)
               for c in r.choices(core, merge_samples([s.output for s in samples], r.params))]
    cls = ChatCompletion if first.kind == "chat" else Completion
    flat = [s for samples in states for s in samples]
    return cls(first.request_id, first.model, choices=choices, usage=usage(requests, flat))


def prepare_chat(core, messages: list[dict], model: str | None, params: SamplingParams,
                 extra: dict[str, Any] | None = None) -> PreparedRequest:
    extra = extra or {}
    tools, choice = extra.get("tools"), extra.get("tool_choice")
    request = PreparedRequest("chat", new_id("chatcmpl"), model or core.config.model, None, [],
                              params, logprobs=params.logprobs, tools=tools, tool_choice=choice)
    template = core.tokenizer.chat_template
    source = template if isinstance(template, str) else str(template)
    messages, template_tools = tool_calls.template_messages(
        messages, tools if request.uses_tools else None, source)
    request.prompt = core.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                        tools=template_tools)
    # the template has BOS
    request.prompt_ids = core.tokenizer.encode(request.prompt, add_special_tokens=False)
    return request


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
        for state in flat:
            state.result()
        return response(core, requests, states)
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
        for state in flat:
            await state.aresult()
        return response(core, requests, states)
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
