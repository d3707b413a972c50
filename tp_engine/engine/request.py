"""A request as its consumer sees it: the output so far, and the sink that wakes the consumer
(a plain queue for threads, an asyncio queue for coroutines).

The stream-back thread hands each request its new token ids; the text is made when the consumer
reads (detokenize on read). A consumer that reads every chunk pays what it did before, in its
own thread; one that reads only the end (generate, a batch job) decodes its tokens once, and the
stream-back thread, which serves every request, stays off the workers' cores. A request with
stop strings is detokenized as its tokens come, since its text decides when it stops."""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field

from tp_engine.engine.detokenizer import IncrementalDetokenizer
from tp_engine.engine.sampling_params import SamplingParams
from tp_engine.engine.tokenizer import Tokenizer

# a token's logprobs, vLLM's shape: {token id: logprob}, the chosen token first
TokenLogprobs = dict[int, float]


@dataclass
class CompletionOutput:
    """One sample of a request."""
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None

    def __post_init__(self) -> None:
        if self.logprobs is not None and self.cumulative_logprob is None:
            self.cumulative_logprob = sum(lps[t] for t, lps in zip(self.token_ids,
                                                                    self.logprobs))


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "abort"
    logprobs: list[TokenLogprobs] | None = None          # one per output token, when asked
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # None for the first token
    samples: list[CompletionOutput] = field(default_factory=list)  # when n > 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def outputs(self) -> list[CompletionOutput]:
        """Every sample (one when n == 1); the fields above are the first's."""
        return self.samples or [CompletionOutput(0, self.text, self.token_ids,
                                                 self.finish_reason, self.logprobs)]


def merge_samples(outputs: list[RequestOutput], params: SamplingParams) -> RequestOutput:
    """One request's samples as one output: with best_of, the n of highest cumulative logprob,
    best first (their logprobs dropped unless asked for); the top-level fields are the
    first sample's. A request of one sample is its output."""
    first = outputs[0]
    if len(outputs) == 1:
        return first
    samples = [CompletionOutput(i, o.text, o.token_ids, o.finish_reason, o.logprobs)
               for i, o in enumerate(outputs)]
    if params.best_of is not None and params.best_of > params.n:
        samples.sort(key=lambda c: c.cumulative_logprob or 0.0, reverse=True)
        samples = samples[:params.n]
        for index, sample in enumerate(samples):
            sample.index = index
            if params.logprobs is None:
                sample.logprobs = None
    best = samples[0]
    return RequestOutput(first.request_id, first.prompt, first.prompt_token_ids, best.text,
                         best.token_ids, best.finish_reason, best.logprobs,
                         first.prompt_logprobs, samples)


def token_dicts(tokens: list[int], entries: list) -> list[TokenLogprobs]:
    """The worker's [chosen logprob, top ids, their logprobs] per token as vLLM's dicts."""
    return [{token: chosen, **dict(zip(ids, lps))}
            for token, (chosen, ids, lps) in zip(tokens, entries)]


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    error: BaseException | None = None
    logprobs: list[TokenLogprobs] | None = None  # the new tokens', when asked for


class SyncSink:
    """Wakes a consumer thread."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[None] = queue.SimpleQueue()

    def wake(self) -> None:
        self._queue.put(None)

    def wait(self) -> None:
        self._queue.get()


class AsyncSink:
    """Wakes a coroutine in the consumer's event loop, from the stream-back thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[None] = asyncio.Queue()

    def wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, None)
        except RuntimeError:  # the consumer's loop is closed: nobody is waiting any more
            pass

    async def wait(self) -> None:
        await self._queue.get()


class RequestState:
    """Written by the stream-back thread (on_tokens) and by aborts (finish); read by the
    consumer with get() (a SyncSink) or aget() (an AsyncSink). One wake-up is outstanding at
    most: news that arrives before the consumer reads joins the same delta."""

    def __init__(self, seq_id: int, request_id: str, prompt: str | None, prompt_ids: list[int],
                 params: SamplingParams, tokenizer: Tokenizer, sink: SyncSink | AsyncSink):
        self.seq_id = seq_id
        self.params = params
        self.sink = sink
        self.output = RequestOutput(request_id, prompt, prompt_ids)
        self._detok = IncrementalDetokenizer(tokenizer)
        self._lock = threading.Lock()
        self._ids: list[int] = []   # received, not yet read
        self._text = ""              # their text, when made as they came (stop strings)
        self._finish: str | None = None
        self._error: BaseException | None = None
        self._woken = False
        self._held = ""  # text that may be the start of a stop string
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        self._logprobs: list = []  # received with _ids, not yet read
        self._prompt_logprobs: list = []
        self._discard = params.max_tokens == 0  # echo only: the one token drawn is not shown
        if params.logprobs is not None:
            self.output.logprobs = []
        if params.prompt_logprobs is not None:
            self.output.prompt_logprobs = [None]

    @property
    def finished(self) -> bool:
        """No more tokens will come (the consumer may not have read the end yet)."""
        return self._finish is not None

    def on_tokens(self, token_ids: list[int], finish_reason: str | None,
                  logprobs: list | None = None, prompt_logprobs: list | None = None) -> bool:
        """Take new tokens (and their logprobs, the worker's entries); return True when a
        stop string ended the request here (the caller then aborts its sequence)."""
        with self._lock:
            if self._finish is not None:
                return False
            if prompt_logprobs and self.output.prompt_logprobs is not None:
                made = len(self.output.prompt_logprobs) + len(self._prompt_logprobs)
                ids = self.output.prompt_token_ids[made:made + len(prompt_logprobs)]
                self._prompt_logprobs.extend(token_dicts(ids, prompt_logprobs))
            if self._discard:
                token_ids = []
            if logprobs and self.output.logprobs is not None:
                self._logprobs.extend(token_dicts(token_ids, logprobs))
            self._ids.extend(token_ids)
            stopped = False
            if self.params.stop:
                stopped = self._cut_stop(token_ids, finish_reason)
                finish_reason = "stop" if stopped else finish_reason
            self._finish = finish_reason
            self._wake()
            return stopped

    def finish(self, reason: str = "abort", error: BaseException | None = None) -> None:
        """End the request from outside the token stream (abort, failure, termination)."""
        with self._lock:
            if self._finish is None:
                self._finish, self._error = reason, error
                self._wake()

    def _wake(self) -> None:
        if not self._woken:
            self._woken = True
            self.sink.wake()

    def _cut_stop(self, token_ids: list[int], finish_reason: str | None) -> bool:
        """Detokenize now and look for the stop strings; hold back a tail that may be the
        start of one. True when one was found (the text is cut before it)."""
        text = self._held + self._detok.add(token_ids)
        if finish_reason is not None:
            text += self._detok.flush()
        cut = self._find_stop(text)
        if cut is not None:
            text = text[:cut]
        elif finish_reason is None and self._hold:
            keep = max(0, len(text) - self._hold)
            text, self._held = text[:keep], text[keep:]
        else:
            self._held = ""
        self._text += text
        return cut is not None

    def _find_stop(self, text: str) -> int | None:
        # a stop string may straddle the text already made and the new text
        made = self.output.text + self._text
        window_start = max(0, len(made) - self._hold)
        window = made[window_start:] + text
        hits = [h for h in (window.find(s) for s in self.params.stop) if h >= 0]
        if not hits:
            return None
        return max(0, min(hits) - (len(made) - window_start))

    def get(self) -> Delta:
        """Wait for news (a SyncSink's request)."""
        self.sink.wait()
        return self.take()

    async def aget(self) -> Delta:
        """Wait for news (an AsyncSink's request)."""
        await self.sink.wait()
        return self.take()

    def result(self) -> RequestOutput:
        """Wait for the end (a SyncSink's request); raises the request's error. What is
        already there is read before waiting: the samples of a request share a sink, and
        another's read may have taken this one's wake-up."""
        while not self._ended(self.take()):
            self.sink.wait()
        return self.output

    async def aresult(self) -> RequestOutput:
        """Wait for the end (an AsyncSink's request); raises the request's error."""
        while not self._ended(self.take()):
            await self.sink.wait()
        return self.output

    @staticmethod
    def _ended(delta: Delta) -> bool:
        if delta.error is not None:
            raise delta.error
        return delta.finish_reason is not None

    def take(self) -> Delta:
        """The news since the last read, as one delta (empty when there is none); the
        output grows by it."""
        with self._lock:
            self._woken = False
            ids, self._ids = self._ids, []
            if self.params.stop:
                text, self._text = self._text, ""
            elif self._error is None:
                text = self._detok.add(ids)
                if self._finish is not None:
                    text += self._detok.flush()
            else:
                text = ""
            out = self.output
            if out.finish_reason is None:
                out.token_ids.extend(ids)
                out.text += text
                out.finish_reason = self._finish
                if self._logprobs:
                    out.logprobs.extend(self._logprobs)
                if self._prompt_logprobs:
                    out.prompt_logprobs.extend(self._prompt_logprobs)
            logprobs = self._logprobs if out.logprobs is not None else None
            self._logprobs, self._prompt_logprobs = [], []
            return Delta(text, ids, self._finish, self._error, logprobs)


class Registry:
    """The requests in flight, by sequence id. Shared by callers, the stream-back thread and
    terminate(), hence the lock."""

    def __init__(self) -> None:
        self._states: dict[int, RequestState] = {}
        self._lock = threading.Lock()

    def add(self, state: RequestState) -> None:
        with self._lock:
            self._states[state.seq_id] = state

    def get(self, seq_id: int) -> RequestState | None:
        with self._lock:
            return self._states.get(seq_id)

    def remove(self, seq_id: int) -> RequestState | None:
        with self._lock:
            return self._states.pop(seq_id, None)

    def fail(self, error: BaseException, seq_ids: list[int] | None = None) -> None:
        """Finish with `error` the requests of `seq_ids` (None: all)."""
        with self._lock:
            if seq_ids is None:
                states, self._states = list(self._states.values()), {}
            else:
                states = [self._states.pop(i) for i in seq_ids if i in self._states]
        for state in states:
            state.finish("abort", error)

    def __len__(self) -> int:
        return len(self._states)
